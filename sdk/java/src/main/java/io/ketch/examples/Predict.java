package io.ketch.examples;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import io.ketch.Client;
import io.ketch.DType;
import io.ketch.KetchException;
import io.ketch.Prediction;
import io.ketch.Value;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;

/**
 * Example client: asks an app for predictions and prints one JSON line per input.
 *
 * <pre>
 * java -cp ketch-sdk-0.1.0-all.jar io.ketch.examples.Predict --frontend tcp://127.0.0.1:7001 \
 *      --app APP (--doubles "1,2;3,4,5" | --string TEXT) [--timeout-ms MS] [--async]
 * </pre>
 *
 * {@code --doubles} holds float64 vectors separated by {@code ;}: one input sends one
 * {@code predict}, several one {@code predictMany} (or {@code predictManyAsync} with
 * {@code --async}, which reports each input's own outcome). A line is
 * {@code {"ok": true, "request_id", "output", "model", "version", "default"}} or
 * {@code {"ok": false, "error": CODE, "class": SIMPLE_CLASS_NAME, "message"}}. The exit status
 * is 0 when every input was answered with a prediction, 1 otherwise.
 */
public final class Predict {
    private Predict() {}

    public static void main(String[] args) {
        String frontend = "tcp://127.0.0.1:7001";
        String app = null;
        String doubles = null;
        String text = null;
        Duration timeout = null;
        boolean async = false;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--async")) {
                async = true;
                continue;
            }
            if (i + 1 >= args.length) {
                usage("missing value after " + a);
            }
            String v = args[++i];
            switch (a) {
                case "--frontend" -> frontend = v;
                case "--app" -> app = v;
                case "--doubles" -> doubles = v;
                case "--string" -> text = v;
                case "--timeout-ms" -> timeout = Duration.ofMillis(Long.parseLong(v));
                default -> usage("unknown option " + a);
            }
        }
        if (app == null || (doubles == null) == (text == null)) {
            usage("--app and one of --doubles or --string are required");
        }
        List<Value> inputs = new ArrayList<>();
        if (text != null) {
            inputs.add(Value.string(text));
        } else {
            for (String vec : doubles.split(";")) {
                String[] parts = vec.trim().split(",");
                double[] xs = new double[parts.length];
                for (int k = 0; k < xs.length; k++) {
                    xs[k] = Double.parseDouble(parts[k].trim());
                }
                inputs.add(Value.doubles(xs));
            }
        }
        boolean allOk = true;
        String appName = app;
        try (Client client = Client.builder(frontend).timeout(timeout).build()) {
            List<CompletableFuture<Prediction>> futures = new ArrayList<>();
            if (inputs.size() == 1 && !async) {
                futures.add(attempt(() -> client.predict(appName, inputs.get(0))));
            } else if (async) {
                futures.addAll(client.predictManyAsync(app, inputs, timeout));
            } else {
                try {
                    for (Prediction p : client.predictMany(app, inputs)) {
                        futures.add(CompletableFuture.completedFuture(p));
                    }
                } catch (KetchException e) {
                    futures.add(CompletableFuture.failedFuture(e));
                }
            }
            for (CompletableFuture<Prediction> f : futures) {
                allOk &= line(f);
            }
        }
        System.exit(allOk ? 0 : 1);
    }

    private interface Call {
        Prediction run();
    }

    private static CompletableFuture<Prediction> attempt(Call call) {
        try {
            return CompletableFuture.completedFuture(call.run());
        } catch (KetchException e) {
            return CompletableFuture.failedFuture(e);
        }
    }

    private static boolean line(CompletableFuture<Prediction> f) {
        JsonObject out = new JsonObject();
        try {
            Prediction p = f.join();
            out.addProperty("ok", true);
            out.addProperty("request_id", p.requestId());
            Value v = p.output();
            if (v == null) {
                out.add("output", null);
            } else if (v.dtype().isText()) {
                out.addProperty("output", v.dtype() == DType.BYTES ? new String(v.asBytes(),
                        java.nio.charset.StandardCharsets.ISO_8859_1) : v.asString());
            } else {
                JsonArray xs = new JsonArray();
                for (double x : v.asDoubles()) {
                    xs.add(x);
                }
                out.add("output", xs);
            }
            out.addProperty("model", p.model());
            out.addProperty("version", p.version());
            out.addProperty("default", p.isDefault());
        } catch (CompletionException e) {
            Throwable cause = e.getCause();
            out.addProperty("ok", false);
            if (cause instanceof KetchException k) {
                out.addProperty("error", k.code().name());
            }
            out.addProperty("class", cause.getClass().getSimpleName());
            out.addProperty("message", cause.getMessage());
        }
        System.out.println(out);
        return out.get("ok").getAsBoolean();
    }

    private static void usage(String error) {
        System.err.println("error: " + error);
        System.err.println("usage: Predict --frontend ADDR --app APP (--doubles \"1,2;3\" | --string TEXT)"
                + " [--timeout-ms MS] [--async]");
        System.exit(64);
    }
}
