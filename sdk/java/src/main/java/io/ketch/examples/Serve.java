package io.ketch.examples;

import io.ketch.Container;
import io.ketch.DType;
import io.ketch.Model;
import io.ketch.RefusedException;
import io.ketch.Value;
import java.util.ArrayList;
import java.util.List;

/**
 * Example container with three toy models, used by the cross-language tests.
 *
 * <pre>
 * java -cp ketch-sdk-0.1.0-all.jar io.ketch.examples.Serve --broker tcp://127.0.0.1:7000 \
 *      --name NAME --version V --kind sum|echo|fail|noop [--replica-id ID] [--dtype D] \
 *      [--credits N] [--max-batch N]
 * </pre>
 *
 * <ul>
 *   <li>{@code sum}: input FLOAT64 vector of any length, output the FLOAT64 scalar sum;
 *   <li>{@code echo}: input BYTES (or {@code --dtype string}, any dtype), echoed back as is;
 *   <li>{@code fail}: always throws {@code IllegalStateException("boom")};
 *   <li>{@code noop}: input FLOAT64 vector of any length, output the FLOAT64 scalar 0 (for benchmarks).
 * </ul>
 * Logs go to stderr. SIGTERM drains and says Goodbye; exit status 2 when the broker refuses.
 */
public final class Serve {
    private Serve() {}

    public static void main(String[] args) throws Exception {
        System.setProperty("java.util.logging.SimpleFormatter.format", "%1$tF %1$tT.%1$tL %4$s %5$s%6$s%n");
        String broker = "tcp://127.0.0.1:7000";
        String name = null;
        String version = "1";
        String kind = null;
        String replicaId = null;
        String dtypeName = null;
        long credits = 2;
        long maxBatch = 0;
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("-h") || a.equals("--help")) {
                usage(null);
            }
            if (i + 1 >= args.length) {
                usage("missing value after " + a);
            }
            String v = args[++i];
            switch (a) {
                case "--broker" -> broker = v;
                case "--name" -> name = v;
                case "--version" -> version = v;
                case "--kind" -> kind = v;
                case "--replica-id" -> replicaId = v;
                case "--dtype" -> dtypeName = v;
                case "--credits" -> credits = Long.parseLong(v);
                case "--max-batch" -> maxBatch = Long.parseLong(v);
                default -> usage("unknown option " + a);
            }
        }
        if (name == null || kind == null) {
            usage("--name and --kind are required");
        }
        Model model;
        DType dtype;
        switch (kind) {
            case "sum" -> {
                model = Serve::sum;
                dtype = DType.FLOAT64;
            }
            case "echo" -> {
                model = inputs -> new ArrayList<>(inputs);
                dtype = DType.BYTES;
            }
            case "noop" -> {
                Value zero = Value.scalar(0.0);
                model = inputs -> java.util.Collections.nCopies(inputs.size(), zero);
                dtype = DType.FLOAT64;
            }
            case "fail" -> {
                model = inputs -> {
                    throw new IllegalStateException("boom");
                };
                dtype = DType.FLOAT64;
            }
            default -> {
                usage("unknown kind " + kind + " (sum, echo, fail or noop)");
                return;
            }
        }
        if (dtypeName != null) {
            dtype = DType.fromName(dtypeName);
        }
        Container container = Container.builder(model)
                .broker(broker)
                .name(name)
                .version(version)
                .input(dtype, dtype.isText() ? new long[0] : new long[] {-1})
                .replicaId(replicaId)
                .credits(credits)
                .maxBatch(maxBatch)
                .build();
        System.err.println("serving " + name + " v" + version + " (" + kind + ") as " + container.replicaId()
                + " via " + broker);
        try {
            container.serve();  // SIGTERM / SIGINT: drain, Goodbye, return
        } catch (RefusedException e) {
            System.err.println("refused: " + e.getMessage());
            System.exit(2);
        }
    }

    /** One FLOAT64 scalar per input: the sum of its elements. */
    static List<Value> sum(List<Value> inputs) {
        List<Value> out = new ArrayList<>(inputs.size());
        for (Value v : inputs) {
            double s = 0;
            for (double x : v.asDoubles()) {
                s += x;
            }
            out.add(Value.scalar(s));
        }
        return out;
    }

    private static void usage(String error) {
        if (error != null) {
            System.err.println("error: " + error);
        }
        System.err.println("usage: Serve --broker ADDR --name NAME [--version V] --kind sum|echo|fail|noop"
                + " [--replica-id ID] [--dtype D] [--credits N] [--max-batch N]");
        System.exit(error == null ? 0 : 64);
    }
}
