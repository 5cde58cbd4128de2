package io.ketch;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.ketch.FakeBroker.Received;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import ketch.wire.Query;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/**
 * The client against a fake frontend (a ROUTER on a free loopback port) that answers as a test
 * says: the protocol cases a real broker cannot be made to produce on demand (late, split and
 * reordered replies, every error code). tests/integration/test_cross_language.py runs the
 * client against a real broker.
 */
@Timeout(30)
class ClientTest {
    private static final long WAIT_MS = 5000;

    private final Random random = new Random();
    private FakeBroker broker;
    private Client client;

    @BeforeEach
    void bind() {
        broker = new FakeBroker();
        client = Client.builder(broker.endpoint).build();
    }

    @AfterEach
    void tearDown() {
        client.close();
        broker.close();
    }

    private static long[] ids(Received q) {
        Query body = q.body(Query.class);
        long[] ids = new long[body.requestIdsLength()];
        for (int i = 0; i < ids.length; i++) {
            ids[i] = body.requestIds(i);
        }
        return ids;
    }

    private static JsonObject ok(long id, String dtype) {
        JsonObject item = JsonParser.parseString("{\"status\": \"OK\", \"model\": \"m\", \"model_version\": \"7\","
                + " \"latency_us\": 1500, \"models_answered\": [\"m\"], \"output\": {\"dtype\": \"" + dtype
                + "\", \"shape\": []}}").getAsJsonObject();
        item.addProperty("request_id", id);
        return item;
    }

    private static JsonObject error(long id, String code, String message) {
        JsonObject item = new JsonObject();
        item.addProperty("request_id", id);
        item.addProperty("status", "ERROR");
        item.addProperty("error", code);
        item.addProperty("message", message);
        return item;
    }

    private static byte[] reply(JsonObject... items) {
        JsonArray array = new JsonArray();
        for (JsonObject item : items) {
            array.add(item);
        }
        JsonObject body = new JsonObject();
        body.add("items", array);
        JsonObject msg = new JsonObject();
        msg.addProperty("type", "Reply");
        msg.add("body", body);
        return Codec.fromJson(msg);
    }

    private static byte[] f64(double v) {
        return Value.scalar(v).toByteArray();
    }

    @Test
    void predictSendsAQueryAndReturnsThePrediction() throws Exception {
        double[] x = {random.nextGaussian(), random.nextGaussian(), 3};
        CompletableFuture<Prediction> f = client.predictAsync("sum", Value.doubles(x), Duration.ofSeconds(10));
        Received q = broker.expect(MessageType.QUERY, WAIT_MS);
        Query body = q.body(Query.class);
        assertEquals("sum", body.app());
        assertEquals(DType.FLOAT64.code(), body.dtype());
        assertEquals(1, body.shapeLength());
        assertEquals(3, body.shape(0));
        assertEquals(10_000_000, body.timeoutUs());
        assertEquals(1, body.requestIdsLength());
        assertArrayEquals(Value.doubles(x).toByteArray(), q.payloads().get(0));
        broker.send(q.identity(), reply(ok(body.requestIds(0), "FLOAT64")), f64(x[0] + x[1] + 3));
        Prediction p = f.get(WAIT_MS, TimeUnit.MILLISECONDS);
        assertEquals(x[0] + x[1] + 3, p.output().asDoubles()[0]);
        assertEquals("m", p.model());
        assertEquals("7", p.version());
        assertEquals(1.5, p.brokerLatencyMs());
        assertEquals(List.of("m"), p.modelsAnswered());
        assertFalse(p.isDefault());
        assertEquals(body.requestIds(0), p.requestId());
        assertTrue(p.latencyMs() > 0);
    }

    @Test
    void errorsAreTypedByCode() throws Exception {
        CompletableFuture<Prediction> a = client.predictAsync("fail", Value.scalar(1), null);
        CompletableFuture<Prediction> b = client.predictAsync("nope", Value.scalar(1), null);
        CompletableFuture<Prediction> c = client.predictAsync("busy", Value.scalar(1), null);
        CompletableFuture<Prediction> d = client.predictAsync("odd", Value.scalar(1), null);
        long[] id = new long[4];
        byte[] peer = null;
        for (int i = 0; i < 4; i++) {
            Received q = broker.expect(MessageType.QUERY, WAIT_MS);
            id[i] = ids(q)[0];
            peer = q.identity();
            assertEquals(0, q.body(Query.class).timeoutUs(), "no timeout: the app's SLO");
        }
        JsonObject busy = error(id[2], "OVERLOADED", "queue full");
        busy.addProperty("retry_after_ms", 40);
        broker.send(peer, reply(error(id[0], "MODEL_ERROR", "ValueError: boom"),
                error(id[1], "UNKNOWN_APP", "no app 'nope'"), busy), new byte[0], new byte[0], new byte[0]);
        broker.send(peer, Codec.error(ErrorCode.BAD_INPUT, "wrong shape", id[3], 0));
        RequestException.ModelError e1 = assertInstanceOf(RequestException.ModelError.class, cause(a));
        assertEquals("ValueError: boom", e1.getMessage());
        assertEquals(ErrorCode.MODEL_ERROR, e1.code());
        assertEquals(id[0], e1.requestId());
        assertInstanceOf(RequestException.UnknownApp.class, cause(b));
        RequestException.Overloaded e3 = assertInstanceOf(RequestException.Overloaded.class, cause(c));
        assertEquals(40, e3.retryAfterMs());
        assertInstanceOf(RequestException.BadInput.class, cause(d));
        // the blocking call throws the same class
        Future<?> blocking = Executors.newSingleThreadExecutor().submit(() -> client.predict("fail", Value.scalar(2)));
        Received q = broker.expect(MessageType.QUERY, WAIT_MS);
        broker.send(q.identity(), reply(error(ids(q)[0], "MODEL_ERROR", "boom")), new byte[0]);
        Exception thrown = assertThrows(java.util.concurrent.ExecutionException.class,
                () -> blocking.get(WAIT_MS, TimeUnit.MILLISECONDS));
        assertInstanceOf(RequestException.ModelError.class, thrown.getCause());
    }

    private static Throwable cause(CompletableFuture<Prediction> f) {
        CompletionException e = assertThrows(CompletionException.class, f::join);
        return e.getCause();
    }

    @Test
    void aDefaultAnswerSaysSo() {
        CompletableFuture<Prediction> f = client.predictAsync("slow", Value.string("héllo"), Duration.ofSeconds(10));
        Received q = broker.expect(MessageType.QUERY, WAIT_MS);
        assertEquals(DType.STRING.code(), q.body(Query.class).dtype());
        JsonObject item = ok(ids(q)[0], "JSON");
        item.addProperty("status", "DEFAULT");
        item.addProperty("message", "deadline: no model answered in 50 ms");
        broker.send(q.identity(), reply(item), "{\"label\": null}".getBytes(java.nio.charset.StandardCharsets.UTF_8));
        Prediction p = f.join();
        assertTrue(p.isDefault());
        assertEquals("deadline: no model answered in 50 ms", p.defaultExplanation());
        assertEquals("{\"label\": null}", p.output().asJson());
    }

    @Test
    void noAnswerTimesOutAndALateReplyIsIgnored() {
        long start = System.nanoTime();
        KetchTimeoutException e = assertThrows(KetchTimeoutException.class,
                () -> client.predict("sum", Value.scalar(1), Duration.ofMillis(100)));
        long tookMs = (System.nanoTime() - start) / 1_000_000;
        assertTrue(tookMs >= 100 + Client.GRACE_MS, "waited " + tookMs + " ms");
        assertTrue(e.getMessage().contains("no answer"), e.getMessage());
        Received late = broker.expect(MessageType.QUERY, WAIT_MS);
        broker.send(late.identity(), reply(ok(ids(late)[0], "FLOAT64")), f64(1));
        assertEquals(0, client.outstanding());
        // still serving: the next query is answered
        CompletableFuture<Prediction> f = client.predictAsync("sum", Value.scalar(2), Duration.ofSeconds(10));
        Received q = broker.expect(MessageType.QUERY, WAIT_MS);
        broker.send(q.identity(), reply(ok(ids(q)[0], "FLOAT64")), f64(2));
        assertEquals(2.0, f.join().output().asDoubles()[0]);
    }

    @Test
    void predictManyKeepsInputOrderWhateverOrderRepliesComeIn() {
        int n = 150;
        List<Value> xs = new ArrayList<>();
        for (int i = 0; i < n; i++) {
            xs.add(i % 50 == 7 ? Value.doubles(new double[] {i, 1}) : Value.scalar(i));   // a second shape now and then
        }
        Client small = Client.builder(broker.endpoint).chunk(16).window(40).build();
        AtomicBoolean stop = new AtomicBoolean();
        Thread answering = new Thread(() -> {
            List<long[]> held = new ArrayList<>();
            List<byte[]> identities = new ArrayList<>();
            List<List<byte[]>> inputs = new ArrayList<>();
            while (!stop.get()) {
                Received q = broker.poll(20);
                if (q != null) {
                    held.add(ids(q));
                    identities.add(q.identity());
                    inputs.add(q.payloads());
                    assertTrue(q.payloads().size() <= 16, "chunk of 16 at most");
                }
                if (!held.isEmpty() && (q == null || held.size() >= 3)) {   // answer held queries backwards, one by one
                    List<Integer> order = new ArrayList<>();
                    for (int k = 0; k < held.size(); k++) {
                        order.add(k);
                    }
                    Collections.shuffle(order, random);
                    for (int k : order) {
                        long[] ids = held.get(k);
                        for (int j = ids.length - 1; j >= 0; j--) {
                            double[] in = Value.of(DType.FLOAT64, new long[] {inputs.get(k).get(j).length / 8},
                                    inputs.get(k).get(j)).asDoubles();
                            broker.send(identities.get(k), reply(ok(ids[j], "FLOAT64")), f64(in[0] * 10));
                        }
                    }
                    held.clear();
                    identities.clear();
                    inputs.clear();
                }
            }
        });
        answering.start();
        try {
            List<Prediction> out = small.predictMany("sum", xs, Duration.ofSeconds(10));
            assertEquals(n, out.size());
            for (int i = 0; i < n; i++) {
                assertEquals(i * 10.0, out.get(i).output().asDoubles()[0], "item " + i);
            }
        } finally {
            stop.set(true);
            small.close();
        }
        try {
            answering.join(WAIT_MS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    @Test
    void manyThreadsShareOneClient() throws Exception {
        AtomicBoolean stop = new AtomicBoolean();
        Thread echo = new Thread(() -> {   // answers each query with its own input doubled
            while (!stop.get()) {
                Received q = broker.poll(20);
                if (q == null) {
                    continue;
                }
                long[] ids = ids(q);
                for (int j = 0; j < ids.length; j++) {
                    double v = Value.of(DType.FLOAT64, new long[0], q.payloads().get(j)).asDoubles()[0];
                    broker.send(q.identity(), reply(ok(ids[j], "FLOAT64")), f64(2 * v));
                }
            }
        });
        echo.start();
        ExecutorService pool = Executors.newFixedThreadPool(8);
        try {
            List<Future<Integer>> done = new ArrayList<>();
            for (int t = 0; t < 8; t++) {
                done.add(pool.submit(() -> {
                    Random r = new Random();
                    for (int i = 0; i < 50; i++) {
                        double v = r.nextGaussian();
                        assertEquals(2 * v, client.predict("echo", Value.scalar(v), Duration.ofSeconds(5))
                                .output().asDoubles()[0]);
                    }
                    return 50;
                }));
            }
            int total = 0;
            for (Future<Integer> f : done) {
                total += f.get(20, TimeUnit.SECONDS);
            }
            assertEquals(400, total);
        } finally {
            stop.set(true);
            pool.shutdownNow();
            echo.join(WAIT_MS);
        }
    }

    @Test
    void closingFailsWhatIsWaitingAndWhatComesAfter() {
        CompletableFuture<Prediction> waiting = client.predictAsync("sum", Value.scalar(1), Duration.ofSeconds(30));
        broker.expect(MessageType.QUERY, WAIT_MS);
        client.close();
        assertInstanceOf(UnavailableException.class, cause(waiting));
        assertThrows(UnavailableException.class, () -> client.predict("sum", Value.scalar(1)));
    }

    @Test
    void queriesQueuedTogetherGoOutInOneMessageUpToChunk() throws Exception {
        // the callbacks of a future run on the I/O thread: the queries they queue while it
        // dispatches a reply are all waiting when it next sends, as a client's refills are
        List<CompletableFuture<Prediction>> refills = Collections.synchronizedList(new ArrayList<>());
        CompletableFuture<Prediction> first = client.predictAsync("sum", Value.scalar(1));
        CompletableFuture<Void> queued = first.thenRun(() -> {
            for (int i = 0; i < 70; i++) {
                refills.add(client.predictAsync("sum", Value.scalar(i)));
            }
            refills.add(client.predictAsync("other", Value.scalar(0)));   // another app: its own message
            refills.add(client.predictAsync("sum", Value.scalar(70)));
        });
        Received q = broker.expect(MessageType.QUERY, WAIT_MS);
        broker.send(q.identity(), reply(ok(ids(q)[0], "FLOAT64")), f64(1));
        queued.get(WAIT_MS, TimeUnit.MILLISECONDS);
        List<Integer> sizes = new ArrayList<>();
        List<String> apps = new ArrayList<>();
        int total = 0;
        while (total < 72) {
            Received m = broker.expect(MessageType.QUERY, WAIT_MS);
            long[] ids = ids(m);
            sizes.add(ids.length);
            apps.add(m.body(Query.class).app());
            assertEquals(ids.length, m.payloads().size());
            total += ids.length;
            for (int k = 0; k < ids.length; k++) {   // each payload answered as its own id's
                double in = Value.of(DType.FLOAT64, new long[0], m.payloads().get(k)).asDoubles()[0];
                broker.send(m.identity(), reply(ok(ids[k], "FLOAT64")), f64(in * 10));
            }
        }
        assertEquals(List.of(64, 6, 1, 1), sizes, "64 at most, in order, apps apart");
        assertEquals(List.of("sum", "sum", "other", "sum"), apps);
        for (int i = 0; i < 70; i++) {
            assertEquals(i * 10.0, refills.get(i).get(WAIT_MS, TimeUnit.MILLISECONDS).output().asDoubles()[0]);
        }
        assertEquals(700.0, refills.get(71).get(WAIT_MS, TimeUnit.MILLISECONDS).output().asDoubles()[0]);
    }
}
