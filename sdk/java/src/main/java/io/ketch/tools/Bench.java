package io.ketch.tools;

import io.ketch.Client;
import io.ketch.Prediction;
import io.ketch.Value;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicLong;

/**
 * Closed-loop load from the Java client, for perf/sdks.py:
 *
 * <pre>
 * java -cp ketch-sdk-0.1.0-all.jar io.ketch.tools.Bench --frontend ADDR --app APP
 *      [--concurrency 1] [--duration 3] [--size 4] [--warmup 1] [--timeout-ms MS]
 * </pre>
 *
 * Keeps {@code concurrency} queries (float64 vectors of {@code size} zeros) in flight for
 * {@code duration} seconds, after {@code warmup} seconds of the same; concurrency 1 is one
 * blocking {@code predict} after another. Above 1, each answer's callback sends the next
 * query with {@code predictAsync}: the refills a reply's answers queue go out together (the
 * client sends queued queries of one app in one message, as {@code ketch bench} does). Without {@code --timeout-ms} the app's SLO applies,
 * as with {@code ketch bench}. Prints one JSON line:
 * {@code {"sent", "ok", "errors", "qps", "p50_ms", "p99_ms"}}.
 */
public final class Bench {
    private Bench() {}

    public static void main(String[] args) throws Exception {
        String frontend = "tcp://127.0.0.1:7001";
        String app = null;
        int concurrency = 1;
        double duration = 3;
        double warmup = 1;
        int size = 4;
        Duration timeout = null;
        for (int i = 0; i + 1 < args.length; i += 2) {
            switch (args[i]) {
                case "--frontend" -> frontend = args[i + 1];
                case "--app" -> app = args[i + 1];
                case "--concurrency" -> concurrency = Integer.parseInt(args[i + 1]);
                case "--duration" -> duration = Double.parseDouble(args[i + 1]);
                case "--warmup" -> warmup = Double.parseDouble(args[i + 1]);
                case "--size" -> size = Integer.parseInt(args[i + 1]);
                case "--timeout-ms" -> timeout = Duration.ofMillis(Long.parseLong(args[i + 1]));
                default -> throw new IllegalArgumentException("unknown option " + args[i]);
            }
        }
        if (app == null) {
            throw new IllegalArgumentException("--app is required");
        }
        Value input = Value.doubles(new double[size]);
        try (Client client = Client.builder(frontend).timeout(timeout).build()) {
            run(client, app, input, concurrency, warmup);
            long[] result = new long[3];
            List<Double> latencies = new ArrayList<>();
            long t0 = System.nanoTime();
            run(client, app, input, concurrency, duration, result, latencies);
            double elapsed = (System.nanoTime() - t0) / 1e9;
            double[] lat = latencies.stream().mapToDouble(Double::doubleValue).toArray();
            Arrays.sort(lat);
            System.out.printf("{\"sent\": %d, \"ok\": %d, \"errors\": %d, \"qps\": %.1f, \"p50_ms\": %.4f, \"p99_ms\": %.4f}%n",
                    result[0], result[1], result[2], result[1] / elapsed, quantile(lat, 0.5), quantile(lat, 0.99));
        }
    }

    private static void run(Client client, String app, Value input, int concurrency, double seconds) throws Exception {
        run(client, app, input, concurrency, seconds, new long[3], new ArrayList<>());
    }

    private static void run(Client client, String app, Value input, int concurrency, double seconds, long[] result,
                            List<Double> latencies) throws Exception {
        long end = System.nanoTime() + (long) (seconds * 1e9);
        if (concurrency == 1) {
            while (System.nanoTime() < end) {
                long s = System.nanoTime();
                result[0]++;
                try {
                    client.predict(app, input);
                    result[1]++;
                    latencies.add((System.nanoTime() - s) / 1e6);
                } catch (RuntimeException e) {
                    result[2]++;
                }
            }
            return;
        }
        AtomicLong sent = new AtomicLong();
        AtomicLong ok = new AtomicLong();
        AtomicLong errors = new AtomicLong();
        CountDownLatch done = new CountDownLatch(concurrency);
        List<Double> shared = java.util.Collections.synchronizedList(latencies);
        for (int k = 0; k < concurrency; k++) {
            loop(client, app, input, end, sent, ok, errors, shared, done);
        }
        done.await();
        result[0] = sent.get();
        result[1] = ok.get();
        result[2] = errors.get();
    }

    /** One in-flight slot: each answer sends the next query until the end. */
    private static void loop(Client client, String app, Value input, long end, AtomicLong sent, AtomicLong ok,
                             AtomicLong errors, List<Double> latencies, CountDownLatch done) {
        if (System.nanoTime() >= end) {
            done.countDown();
            return;
        }
        long s = System.nanoTime();
        sent.incrementAndGet();
        CompletableFuture<Prediction> f = client.predictAsync(app, input);
        f.whenComplete((p, e) -> {
            if (e == null) {
                ok.incrementAndGet();
                latencies.add((System.nanoTime() - s) / 1e6);
            } else {
                errors.incrementAndGet();
                if (e instanceof io.ketch.UnavailableException || e.getCause() instanceof io.ketch.UnavailableException) {
                    done.countDown();   // the client is gone: this slot ends
                    return;
                }
            }
            loop(client, app, input, end, sent, ok, errors, latencies, done);
        });
    }

    private static double quantile(double[] sorted, double q) {
        if (sorted.length == 0) {
            return Double.NaN;
        }
        return sorted[Math.min(sorted.length - 1, (int) Math.floor(q * (sorted.length - 1) + 0.5))];
    }
}
