package io.ketch.tools;

import io.ketch.Container;
import io.ketch.DType;
import io.ketch.Model;
import io.ketch.RefusedException;
import java.io.File;
import java.io.IOException;
import java.lang.reflect.Constructor;
import java.net.URL;
import java.net.URLClassLoader;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardCopyOption;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * The entry point of Ketch's Java model image: serves the {@link Model} class that the
 * environment names, as one replica of the broker at {@code KETCH_BACKEND}.
 *
 * <pre>
 * KETCH_MODEL_CLASS      class implementing io.ketch.Model (required); constructed with the
 *                        String $KETCH_MODEL when it has such a constructor, else with none
 * KETCH_MODEL            the model's file or folder, handed to that constructor
 * KETCH_MODEL_CLASSPATH  jars and folders holding the class, ':'-separated; DIR/* is every
 *                        jar in DIR (default in the image: /models/*)
 * KETCH_MODEL_NAME       model name (required); KETCH_MODEL_VERSION (default 1)
 * KETCH_INPUT_TYPE       input dtype (default float64); KETCH_INPUT_SHAPE (default -1; "" for none)
 * KETCH_BACKEND          broker backend address (default tcp://127.0.0.1:7000)
 * KETCH_CREDITS, KETCH_MAX_BATCH, KETCH_NONDETERMINISTIC (true/1)
 * KETCH_REPLICA_ID       default host/name/version/random
 * KETCH_STATUS_FILE      the status file docker/ketch-probe reads (ready, connecting, draining)
 * </pre>
 *
 * SIGTERM drains (no new batches, held ones answered, Goodbye) and exits 0; exit status 2
 * when the broker refuses the container, 64 for a configuration error.
 */
public final class Launch {
    private Launch() {}

    public static void main(String[] args) throws Exception {
        System.setProperty("java.util.logging.SimpleFormatter.format", "%1$tF %1$tT.%1$tL %4$s %5$s%6$s%n");
        Map<String, String> env = System.getenv();
        String className = required(env, "KETCH_MODEL_CLASS");
        String name = required(env, "KETCH_MODEL_NAME");
        String modelPath = env.getOrDefault("KETCH_MODEL", "");
        Model model;
        DType dtype;
        long[] shape;
        try {
            ClassLoader loader = classLoader(env.getOrDefault("KETCH_MODEL_CLASSPATH", ""));
            model = instantiate(Class.forName(className, true, loader), modelPath);
            dtype = DType.fromName(env.getOrDefault("KETCH_INPUT_TYPE", "float64"));
            shape = parseShape(env.getOrDefault("KETCH_INPUT_SHAPE", dtype.isText() ? "" : "-1"));
        } catch (ReflectiveOperationException | IllegalArgumentException | IOException e) {
            System.err.println("error: " + e);
            System.exit(64);
            return;
        }
        Container container = Container.builder(model)
                .broker(env.getOrDefault("KETCH_BACKEND", "tcp://127.0.0.1:7000"))
                .name(name)
                .version(env.getOrDefault("KETCH_MODEL_VERSION", "1"))
                .input(dtype, shape)
                .replicaId(replicaId(env, name))
                .credits(Long.parseLong(env.getOrDefault("KETCH_CREDITS", "2")))
                .maxBatch(Long.parseLong(env.getOrDefault("KETCH_MAX_BATCH", "0")))
                .deterministic(!isTrue(env.get("KETCH_NONDETERMINISTIC")))
                .build();
        StatusWriter status = new StatusWriter(env.get("KETCH_STATUS_FILE"), container);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            // SIGTERM: drain, then exit 0 (the JVM would say 143) or 1 if the drain timed out
            status.stopping = true;
            container.stop();
            boolean drained = false;
            try {
                drained = container.awaitTermination(Duration.ofSeconds(60));
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
            status.finish();
            Runtime.getRuntime().halt(drained ? 0 : 1);
        }, "ketch-shutdown"));
        System.err.println("serving " + name + " (" + className + ") as " + container.replicaId()
                + " via " + container.broker());
        status.start();
        try {
            container.run();
        } catch (RefusedException e) {
            System.err.println("refused: " + e.getMessage());
            System.exit(2);
        } finally {
            status.finish();
        }
    }

    private static String required(Map<String, String> env, String key) {
        String v = env.get(key);
        if (v == null || v.isBlank()) {
            System.err.println("error: set " + key + " (see io.ketch.tools.Launch)");
            System.exit(64);
        }
        return v;
    }

    /**
     * $KETCH_REPLICA_ID, else host/name/version/random: containers on the host's network share
     * its hostname, so the default must tell them apart.
     */
    static String replicaId(Map<String, String> env, String name) {
        String id = env.get("KETCH_REPLICA_ID");
        if (id != null && !id.isBlank()) {
            return id;
        }
        String host = env.getOrDefault("HOSTNAME", "localhost");
        try {
            host = java.net.InetAddress.getLocalHost().getHostName();
        } catch (IOException | RuntimeException e) {
            // keep $HOSTNAME
        }
        String suffix = Integer.toHexString(new java.security.SecureRandom().nextInt(1 << 24) | (1 << 24)).substring(1);
        return host + "/" + name + "/" + env.getOrDefault("KETCH_MODEL_VERSION", "1") + "/" + suffix;
    }

    private static boolean isTrue(String v) {
        return v != null && (v.equals("1") || v.equalsIgnoreCase("true") || v.equalsIgnoreCase("yes"));
    }

    static long[] parseShape(String text) {
        String t = text.trim();
        if (t.isEmpty()) {
            return new long[0];
        }
        String[] parts = t.split("[,x]");
        long[] out = new long[parts.length];
        for (int i = 0; i < parts.length; i++) {
            out[i] = Long.parseLong(parts[i].trim());
        }
        return out;
    }

    static ClassLoader classLoader(String classpath) throws IOException {
        List<URL> urls = new ArrayList<>();
        for (String entry : classpath.split(":")) {
            if (entry.isBlank()) {
                continue;
            }
            if (entry.endsWith("/*")) {
                File[] jars = new File(entry.substring(0, entry.length() - 2))
                        .listFiles((d, n) -> n.endsWith(".jar"));
                if (jars != null) {
                    java.util.Arrays.sort(jars);
                    for (File jar : jars) {
                        urls.add(jar.toURI().toURL());
                    }
                }
            } else {
                urls.add(new File(entry).toURI().toURL());
            }
        }
        return new URLClassLoader(urls.toArray(new URL[0]), Launch.class.getClassLoader());
    }

    static Model instantiate(Class<?> cls, String modelPath) throws ReflectiveOperationException {
        if (!Model.class.isAssignableFrom(cls)) {
            throw new IllegalArgumentException(cls.getName() + " does not implement io.ketch.Model");
        }
        if (!modelPath.isEmpty()) {
            try {
                Constructor<?> c = cls.getConstructor(String.class);
                return (Model) c.newInstance(modelPath);
            } catch (NoSuchMethodException e) {
                // no (String) constructor: the class finds its model itself
            }
        }
        return (Model) cls.getConstructor().newInstance();
    }

    /** Keeps $KETCH_STATUS_FILE: the container's state, rewritten every second. */
    static final class StatusWriter extends Thread {
        private final Path path;
        private final Container container;
        volatile boolean stopping;
        private volatile boolean done;

        StatusWriter(String file, Container container) {
            super("ketch-status");
            setDaemon(true);
            this.path = file == null || file.isBlank() ? null : Path.of(file);
            this.container = container;
        }

        @Override
        public void run() {
            if (path == null) {
                return;
            }
            Path tmp = path.resolveSibling("." + path.getFileName() + ".tmp");
            while (!done) {
                String state = container.isReady() ? "ready" : stopping ? "draining" : "connecting";
                try {
                    Files.writeString(tmp, state + "\n", StandardCharsets.UTF_8);
                    Files.move(tmp, path, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
                } catch (IOException e) {
                    System.err.println("cannot write the status file " + path + ": " + e.getMessage());
                }
                try {
                    Thread.sleep(1000);
                } catch (InterruptedException e) {
                    return;
                }
            }
        }

        void finish() {
            done = true;
            interrupt();
            if (path != null) {
                try {
                    join(2000);
                    Files.deleteIfExists(path);
                } catch (IOException | InterruptedException e) {
                    // leaving: a stale file only reads "not ready"
                }
            }
        }
    }
}
