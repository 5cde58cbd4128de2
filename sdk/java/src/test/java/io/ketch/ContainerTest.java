package io.ketch;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertInstanceOf;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.ketch.FakeBroker.Received;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Random;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import ketch.wire.Heartbeat;
import ketch.wire.Hello;
import ketch.wire.PredictReply;
import org.junit.jupiter.api.AfterEach;
import org.junit.jupiter.api.BeforeEach;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/** A real container against a fake broker ROUTER on a free loopback port. */
@Timeout(20)
class ContainerTest {
    private static final long WAIT_MS = 5000;

    private final Random random = new Random();
    private FakeBroker broker;
    private Container container;
    private CompletableFuture<Void> done;

    @BeforeEach
    void bind() {
        broker = new FakeBroker();
    }

    @AfterEach
    void tearDown() throws Exception {
        if (container != null) {
            container.stop();
            assertTrue(container.awaitTermination(Duration.ofSeconds(10)), "container did not stop");
        }
        broker.close();
    }

    private Container.Builder builder(Model model) {
        return Container.builder(model)
                .broker(broker.endpoint)
                .name("sum")
                .version("3")
                .input(DType.FLOAT64, -1)
                .replicaId("test/sum/0")
                .goodbyeLinger(Duration.ofMillis(200));
    }

    private void start(Container.Builder b) {
        container = b.build();
        done = new CompletableFuture<>();
        Thread t = new Thread(() -> {
            try {
                container.run();
                done.complete(null);
            } catch (Throwable e) {
                done.completeExceptionally(e);
            }
        }, "container-under-test");
        t.setDaemon(true);
        t.start();
    }

    /** Hello then Welcome; returns the Hello. */
    private Received handshake(long heartbeatMs, long deadAfterMs) {
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.welcome(heartbeatMs, deadAfterMs));
        return hello;
    }

    private double[] randomRow() {
        double[] r = new double[1 + random.nextInt(6)];
        for (int i = 0; i < r.length; i++) {
            r[i] = random.nextGaussian() * 100;
        }
        return r;
    }

    private void sendBatch(byte[] identity, long batchId, long[] budgets, double[]... rows) {
        long[] shapes = new long[rows.length];
        List<byte[]> payloads = new ArrayList<>();
        for (int i = 0; i < rows.length; i++) {
            shapes[i] = rows[i].length;
            payloads.add(Value.doubles(rows[i]).toByteArray());
        }
        broker.send(identity, Codec.predictRequest(batchId, "sum", "3", DType.FLOAT64, 1, shapes, budgets), payloads);
    }

    private void sendBatch(byte[] identity, long batchId, double[]... rows) {
        long[] budgets = new long[rows.length];
        Arrays.fill(budgets, 10_000_000);
        sendBatch(identity, batchId, budgets, rows);
    }

    /** A batch of one random row to {@code identity} is answered with its sum. */
    private void assertServes(byte[] identity, long batchId) {
        double[] row = randomRow();
        sendBatch(identity, batchId, row);
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(batchId, r.body(PredictReply.class).batchId());
        assertEquals(sum(row), Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
    }

    private static double sum(double[] xs) {
        double s = 0;
        for (double x : xs) {
            s += x;
        }
        return s;
    }

    private static List<Value> sums(List<Value> inputs) {
        List<Value> out = new ArrayList<>();
        for (Value v : inputs) {
            out.add(Value.scalar(sum(v.asDoubles())));
        }
        return out;
    }

    private static String message(ketch.wire.Error e) {
        return Codec.str(e.message());
    }

    // ---------------------------------------------------------------- tests

    @Test
    void helloCarriesTheContainersSettings() {
        start(builder(ContainerTest::sums).credits(3).maxBatch(16).deterministic(false));
        Received r = broker.expect(MessageType.HELLO, WAIT_MS);
        assertEquals(1, r.message().version());
        assertTrue(r.payloads().isEmpty());
        Hello h = r.body(Hello.class);
        assertEquals("sum", h.model());
        assertEquals("3", h.modelVersion());
        assertEquals(DType.FLOAT64.code(), h.input().dtype());
        assertEquals(1, h.input().shapeLength());
        assertEquals(-1, h.input().shape(0));
        assertEquals("java/0.1.0", h.sdk());
        assertEquals("test/sum/0", h.replicaId());
        assertEquals(3, h.credits());
        assertEquals(16, h.maxBatch());
        assertFalse(h.deterministic());
        assertEquals(ProcessHandle.current().pid() & 0xFFFFFFFFL, h.pid());
        assertEquals(2, h.versionsLength());
        assertEquals(List.of(1, 2), List.of(h.versions(0), h.versions(1)));
    }

    @Test
    void defaultReplicaIdIsHostModelIndex() {
        Container c = Container.builder(ContainerTest::sums).name("iris").input(DType.FLOAT64, 4).index(2).build();
        assertTrue(c.replicaId().endsWith("/iris/2"), c.replicaId());
        assertEquals(c.replicaId(), Container.builder(ContainerTest::sums).name("iris").input(DType.FLOAT64, 4)
                .index(2).build().replicaId());
    }

    @Test
    void aBatchGetsOneOutputPerInput() {
        start(builder(ContainerTest::sums));
        Received hello = handshake(1000, 10_000);
        double[][] rows = {randomRow(), randomRow(), randomRow(), randomRow()};
        long sent = System.nanoTime();
        sendBatch(hello.identity(), 9_007_199_254_740_991L, rows);
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        long roundTripUs = (System.nanoTime() - sent) / 1000;
        PredictReply p = r.body(PredictReply.class);
        assertEquals(9_007_199_254_740_991L, p.batchId());
        assertEquals(ErrorCode.NONE.code(), p.error());
        assertEquals(rows.length, p.outputsLength());
        assertEquals(rows.length, r.payloads().size());
        assertTrue(p.computeUs() <= roundTripUs, "compute_us " + p.computeUs() + " > round trip " + roundTripUs);
        for (int i = 0; i < rows.length; i++) {
            assertEquals(Status.OK.code(), p.outputs(i).status());
            assertEquals(DType.FLOAT64.code(), p.outputs(i).output().dtype());
            assertEquals(0, p.outputs(i).output().shapeLength());
            Value v = Value.of(DType.FLOAT64, new long[0], r.payloads().get(i));
            assertEquals(sum(rows[i]), v.asDoubles()[0], "item " + i);
        }
        assertTrue(container.isReady());

        // an item whose budget already ran out is answered DEADLINE, the rest computed
        double[] keep = randomRow();
        sendBatch(hello.identity(), 2, new long[] {0, 10_000_000}, randomRow(), keep);
        p = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS).body(PredictReply.class);
        assertEquals(2, p.outputsLength());
        assertEquals(ErrorCode.DEADLINE.code(), p.outputs(0).error());
        assertEquals(Status.OK.code(), p.outputs(1).status());
    }

    @Test
    void heartbeatsFlowWhileTheModelComputes() throws Exception {
        CountDownLatch started = new CountDownLatch(1);
        CountDownLatch release = new CountDownLatch(1);
        start(builder(inputs -> {
            started.countDown();
            assertTrue(release.await(WAIT_MS, TimeUnit.MILLISECONDS));
            return sums(inputs);
        }));
        Received hello = handshake(50, 10_000);
        double[] row = randomRow();
        sendBatch(hello.identity(), 1, row);
        assertTrue(started.await(WAIT_MS, TimeUnit.MILLISECONDS));
        int busy = 0;
        while (busy < 3) {
            Received r = broker.recv(WAIT_MS);
            assertEquals(MessageType.HEARTBEAT, r.type(), "only heartbeats while the model computes");
            if (r.body(Heartbeat.class).busy()) {
                busy++;
            } else {
                assertEquals(0, busy, "an idle heartbeat while the model computes");
            }
        }
        release.countDown();
        Received reply = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        PredictReply p = reply.body(PredictReply.class);
        assertTrue(p.computeUs() >= 50_000, "compute_us " + p.computeUs() + " should span the heartbeats");
        assertEquals(sum(row), Value.of(DType.FLOAT64, new long[0], reply.payloads().get(0)).asDoubles()[0]);
        Received idle = broker.recv(WAIT_MS);
        assertEquals(MessageType.HEARTBEAT, idle.type());
        assertFalse(idle.body(Heartbeat.class).busy());
    }

    @Test
    void aThrowingModelFailsTheWholeBatchAndServingGoesOn() {
        start(builder(inputs -> {
            double first = inputs.get(0).asDoubles()[0];
            if (first < 0) {
                throw new IllegalStateException("negative input");
            }
            if (first == 7) {
                return List.of();
            }
            return sums(inputs);
        }));
        Received hello = handshake(1000, 10_000);

        sendBatch(hello.identity(), 1, new double[] {-1, 2}, randomRow());
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        PredictReply p = r.body(PredictReply.class);
        assertEquals(1, p.batchId());
        assertEquals(0, p.outputsLength());
        assertEquals(ErrorCode.MODEL_ERROR.code(), p.error());
        assertEquals("IllegalStateException: negative input", p.message());
        assertTrue(r.payloads().isEmpty(), "a failed batch has no payload frames");

        sendBatch(hello.identity(), 2, new double[] {7}, randomRow());
        p = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS).body(PredictReply.class);
        assertEquals(2, p.batchId());
        assertEquals(ErrorCode.MODEL_ERROR.code(), p.error());
        assertEquals("IllegalStateException: model returned 0 outputs for 2 inputs", p.message());

        double[] row = {1, 2, 3.5};
        sendBatch(hello.identity(), 3, row);
        r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        p = r.body(PredictReply.class);
        assertEquals(3, p.batchId());
        assertEquals(Status.OK.code(), p.outputs(0).status());
        assertEquals(6.5, Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
    }

    @Test
    void shutdownAnswersEveryBatchSentBeforeItThenSaysGoodbye() throws Exception {
        CountDownLatch started = new CountDownLatch(1);
        CountDownLatch release = new CountDownLatch(1);
        start(builder(inputs -> {
            started.countDown();
            assertTrue(release.await(WAIT_MS, TimeUnit.MILLISECONDS));
            return sums(inputs);
        }));
        Received hello = handshake(1000, 10_000);
        sendBatch(hello.identity(), 41, randomRow(), randomRow());
        assertTrue(started.await(WAIT_MS, TimeUnit.MILLISECONDS));
        sendBatch(hello.identity(), 42, randomRow());       // held while 41 computes
        broker.send(hello.identity(), Codec.shutdown("test over"));
        release.countDown();
        List<Long> answered = new ArrayList<>();
        boolean readyZero = false;
        while (true) {
            Received r = broker.recvSkipping(WAIT_MS, MessageType.HEARTBEAT);
            if (r.type() == MessageType.PREDICT_REPLY) {
                assertFalse(readyZero && answered.size() == 2, "a reply after both batches were answered");
                answered.add(r.body(PredictReply.class).batchId());
            } else if (r.type() == MessageType.READY) {
                assertEquals(0, r.body(ketch.wire.Ready.class).credits());
                readyZero = true;
            } else {
                assertEquals(MessageType.GOODBYE, r.type());
                assertEquals("drained", r.body(ketch.wire.Goodbye.class).reason());
                break;
            }
        }
        assertTrue(readyZero, "Ready{credits: 0} before the Goodbye");
        assertEquals(List.of(41L, 42L), answered, "every batch sent before the Shutdown is answered before Goodbye");
        done.get(WAIT_MS, TimeUnit.MILLISECONDS);
    }

    @Test
    void aBatchArrivingJustAfterReadyZeroIsStillAnswered() throws Exception {
        start(builder(ContainerTest::sums));
        // a version-2 broker: the drain ends on its Paused (with a version-1 one, a quiet spell
        // of 50 ms, which a loaded machine can outlast between the Ready and this test's batch)
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.welcome(1000, 10_000, 2));
        sendBatch(hello.identity(), 1, randomRow());
        broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        container.stop();
        assertEquals(0, broker.expect(MessageType.READY, WAIT_MS).body(ketch.wire.Ready.class).credits());
        // the broker had sent this one before it read the Ready: it is answered, then Goodbye
        sendBatch(hello.identity(), 2, new double[] {1, 2});
        broker.send(hello.identity(), Codec.paused(1));
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(2, r.body(PredictReply.class).batchId());
        assertEquals(3.0, Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
        assertEquals("stopped", broker.expect(MessageType.GOODBYE, WAIT_MS).body(ketch.wire.Goodbye.class).reason());
        done.get(WAIT_MS, TimeUnit.MILLISECONDS);
    }

    @Test
    void stopSaysReadyZeroThenGoodbye() throws Exception {
        start(builder(ContainerTest::sums));
        Received hello = handshake(1000, 10_000);
        sendBatch(hello.identity(), 1, randomRow());  // a round trip: the Welcome has been taken
        broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        container.stop();
        assertEquals(0, broker.expect(MessageType.READY, WAIT_MS).body(ketch.wire.Ready.class).credits());
        assertEquals("stopped", broker.expect(MessageType.GOODBYE, WAIT_MS).body(ketch.wire.Goodbye.class).reason());
        done.get(WAIT_MS, TimeUnit.MILLISECONDS);
        assertFalse(container.isReady());
    }

    @Test
    void stopBeforeTheWelcomeSaysGoodbyeAtOnce() throws Exception {
        start(builder(ContainerTest::sums));
        broker.expect(MessageType.HELLO, WAIT_MS);
        container.stop();
        assertEquals("stopped", broker.expect(MessageType.GOODBYE, WAIT_MS).body(ketch.wire.Goodbye.class).reason());
        done.get(WAIT_MS, TimeUnit.MILLISECONDS);
    }

    @Test
    void stopBeforeRunReturnsAtOnce() throws Exception {
        Container c = builder(ContainerTest::sums).build();
        c.stop();
        c.run();
        assertTrue(c.awaitTermination(Duration.ZERO));
    }

    @Test
    void sendHelloFirstMakesTheContainerSayHelloAgain() throws Exception {
        CountDownLatch started = new CountDownLatch(1);
        CountDownLatch release = new CountDownLatch(1);
        start(builder(inputs -> {
            started.countDown();
            assertTrue(release.await(WAIT_MS, TimeUnit.MILLISECONDS));
            return sums(inputs);
        }));
        Received hello = handshake(1000, 10_000);
        sendBatch(hello.identity(), 1, randomRow());
        assertTrue(started.await(WAIT_MS, TimeUnit.MILLISECONDS));

        // as if the broker restarted: it no longer knows this peer. Batch 1, computing meanwhile,
        // is answered when it ends (the broker discards that late reply: it re-queued the batch)
        broker.send(hello.identity(), Codec.error(ErrorCode.BAD_MESSAGE, "send Hello first", 0, 0));
        release.countDown();
        Received again = broker.recvSkipping(WAIT_MS, MessageType.HEARTBEAT, MessageType.PREDICT_REPLY);
        assertEquals(MessageType.HELLO, again.type());
        assertEquals("test/sum/0", again.body(Hello.class).replicaId());
        assertArrayEquals(hello.identity(), again.identity(), "same socket");
        broker.send(again.identity(), Codec.welcome(1000, 10_000));

        double[] row = randomRow();
        sendBatch(again.identity(), 2, row);
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(2, r.body(PredictReply.class).batchId());
        assertEquals(sum(row), Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
    }

    @Test
    void aSilentBrokerMakesTheContainerReconnect() {
        start(builder(ContainerTest::sums).reconnectBackoff(Duration.ofMillis(20), Duration.ofMillis(200)));
        Received first = handshake(50, 300);
        // say nothing: after 300 ms of silence the container opens a new socket and says Hello again
        Received again = broker.expect(MessageType.HELLO, WAIT_MS);
        assertNotEquals(Arrays.toString(first.identity()), Arrays.toString(again.identity()), "a new socket");
        assertEquals("test/sum/0", again.body(Hello.class).replicaId());
        broker.send(again.identity(), Codec.welcome(1000, 10_000));
        assertServes(again.identity(), 5);
    }

    @Test
    void noWelcomeMeansANewConnection() {
        start(builder(ContainerTest::sums).helloTimeout(Duration.ofMillis(200))
                .reconnectBackoff(Duration.ofMillis(20), Duration.ofMillis(100)));
        Received first = broker.expect(MessageType.HELLO, WAIT_MS);
        Received again = broker.expect(MessageType.HELLO, WAIT_MS);
        assertNotEquals(Arrays.toString(first.identity()), Arrays.toString(again.identity()));
    }

    @Test
    void unsupportedVersionStopsTheContainer() throws Exception {
        start(builder(ContainerTest::sums));
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.error(ErrorCode.UNSUPPORTED_VERSION, "speaks 2", 0, 0));
        ExecutionException e = org.junit.jupiter.api.Assertions.assertThrows(ExecutionException.class,
                () -> done.get(WAIT_MS, TimeUnit.MILLISECONDS));
        RefusedException refused = assertInstanceOf(RefusedException.class, e.getCause());
        assertEquals(ErrorCode.UNSUPPORTED_VERSION, refused.code());
    }

    @Test
    void conflictAnsweringTheHelloMeansHelloAgainLaterNotTheEnd() {
        // the replica id is still live on the broker (a quick restart), or other code serves the version
        start(builder(ContainerTest::sums).reconnectBackoff(Duration.ofMillis(20), Duration.ofMillis(100)));
        Received first = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(first.identity(), Codec.error(ErrorCode.CONFLICT, "replica id live on another connection", 0, 0));
        Received again = broker.expect(MessageType.HELLO, WAIT_MS);
        assertNotEquals(Arrays.toString(first.identity()), Arrays.toString(again.identity()), "a new socket");
        assertFalse(done.isDone(), "the container did not end");
        broker.send(again.identity(), Codec.welcome(1000, 10_000));
        assertServes(again.identity(), 1);
    }

    @Test
    void invalidAnsweringTheHelloEndsTheContainer() throws Exception {
        start(builder(ContainerTest::sums));
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.error(ErrorCode.INVALID, "send Hello first: model name", 0, 0));
        ExecutionException e = org.junit.jupiter.api.Assertions.assertThrows(ExecutionException.class,
                () -> done.get(WAIT_MS, TimeUnit.MILLISECONDS));
        assertEquals(ErrorCode.INVALID, assertInstanceOf(RefusedException.class, e.getCause()).code());
    }

    @Test
    void badMessageBeforeTheWelcomeIsNotARefusalWhateverItsText() {
        start(builder(ContainerTest::sums));
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.error(ErrorCode.BAD_MESSAGE, "heartbeat from an unknown peer", 0, 0));
        broker.send(hello.identity(), Codec.welcome(1000, 10_000));
        assertServes(hello.identity(), 1);
        assertFalse(done.isDone());
    }

    /** A model of a named class of its own. */
    static final class Doubler implements Model {
        @Override
        public List<Value> predict(List<Value> inputs) {
            List<Value> out = new ArrayList<>();
            for (Value v : inputs) {
                out.add(Value.scalar(2 * sum(v.asDoubles())));
            }
            return out;
        }
    }

    @Test
    void helloCarriesTheFingerprintOfTheModelsCode() {
        start(builder(new Doubler()));
        String sent = broker.expect(MessageType.HELLO, WAIT_MS).body(Hello.class).fingerprint();
        assertTrue(sent.matches("sha256:[0-9a-f]{32}"), sent);
        assertEquals(sent, Container.fingerprint(new Doubler(), null), "the same code, the same fingerprint");
        // a lambda or method reference: the digest of the class that wrote it, never empty
        String lambda = Container.fingerprint((Model) ContainerTest::sums, null);
        assertTrue(lambda.matches("sha256:[0-9a-f]{32}"), lambda);
        assertEquals(lambda, Container.fingerprint((Model) inputs -> inputs, null));
        assertNotEquals(sent, lambda, "other code, another fingerprint");
    }

    @Test
    void aBuildIdIsTheFingerprintAndMustBeSayable() {
        assertEquals("build:2026-11-30.1", Container.fingerprint(new Doubler(), "2026-11-30.1"));
        assertEquals(Container.fingerprint(new Doubler(), null), Container.fingerprint(new Doubler(), ""));
        for (String bad : new String[] {"with space", "x".repeat(123), "caf\u00e9", "tab\t"}) {
            org.junit.jupiter.api.Assertions.assertThrows(IllegalArgumentException.class,
                    () -> Container.fingerprint(new Doubler(), bad), bad);
        }
        assertEquals(128, Container.fingerprint(new Doubler(), "x".repeat(122)).length());
    }

    @Test
    void badMessagesFromTheBrokerAreAnsweredWithErrors() {
        start(builder(ContainerTest::sums));
        Received hello = handshake(1000, 10_000);
        byte[] id = hello.identity();

        broker.send(id, Codec.fromJson(com.google.gson.JsonParser.parseString(
                "{\"type\": \"Query\", \"body\": {\"app\": \"x\"}}").getAsJsonObject()));
        ketch.wire.Error e = broker.expect(MessageType.ERROR, WAIT_MS).body(ketch.wire.Error.class);
        assertEquals(ErrorCode.UNKNOWN_MESSAGE.code(), e.code());

        broker.send(id, Codec.fromJson(com.google.gson.JsonParser.parseString(
                "{\"type\": \"Shutdown\", \"version\": 3}").getAsJsonObject()));
        e = broker.expect(MessageType.ERROR, WAIT_MS).body(ketch.wire.Error.class);
        assertEquals(ErrorCode.UNSUPPORTED_VERSION.code(), e.code());
        assertEquals("protocol version 3 is not supported (speaks 1, 2)", message(e));

        broker.send(id, new byte[] {1, 2, 3});
        e = broker.expect(MessageType.ERROR, WAIT_MS).body(ketch.wire.Error.class);
        assertEquals(ErrorCode.BAD_MESSAGE.code(), e.code());

        // the version-3 Shutdown was not acted on: the container still serves
        sendBatch(id, 6, new double[] {2, 2});
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(4.0, Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
    }

    // ---------------------------------------------------------------- versions (protocol.md section 3)

    @Test
    void aNewerBrokersMessagesAreReadOrAnsweredAndServingGoesOn() {
        start(builder(ContainerTest::sums));
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        byte[] id = hello.identity();
        // a broker of version 3 chooses 2 and appends a field to its Welcome
        broker.send(id, Golden.bin("newer/welcome"));
        // a batch with fields appended to its tables (and to the Envelope): read as usual
        broker.send(id, Golden.bin("newer/predict_request"), Golden.payloads("newer/predict_request"));
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(42, r.body(PredictReply.class).batchId());
        assertEquals(4.0, Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
        assertEquals(-4.0, Value.of(DType.FLOAT64, new long[0], r.payloads().get(1)).asDoubles()[0]);
        assertEquals(2, container.protocol());
        // a message type this SDK does not know, of a version it speaks
        broker.send(id, Golden.bin("newer/unknown_body"));
        ketch.wire.Error e = broker.expect(MessageType.ERROR, WAIT_MS).body(ketch.wire.Error.class);
        assertEquals(ErrorCode.UNKNOWN_MESSAGE.code(), e.code());
        // and one of a version it does not speak
        broker.send(id, Codec.fromJson(com.google.gson.JsonParser.parseString(
                "{\"type\": \"Heartbeat\", \"version\": 3}").getAsJsonObject()));
        e = broker.expect(MessageType.ERROR, WAIT_MS).body(ketch.wire.Error.class);
        assertEquals(ErrorCode.UNSUPPORTED_VERSION.code(), e.code());
        double[] row = randomRow();
        sendBatch(id, 7, row);
        r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(sum(row), Value.of(DType.FLOAT64, new long[0], r.payloads().get(0)).asDoubles()[0]);
    }

    @Test
    void withAVersion2BrokerTheDrainEndsOnPaused() throws Exception {
        start(builder(ContainerTest::sums));
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.welcome(1000, 10_000, 2));
        sendBatch(hello.identity(), 1, randomRow());  // a round trip: the Welcome has been taken
        broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        container.stop();
        assertEquals(0, broker.expect(MessageType.READY, WAIT_MS).body(ketch.wire.Ready.class).credits());
        // no Goodbye on a quiet spell: it waits for the broker's word (longer than the 50 ms spell)
        Received early = broker.poll(300);
        assertTrue(early == null || early.type() == MessageType.HEARTBEAT, "before Paused: " + early);
        double[] row = new double[] {1, 2};
        sendBatch(hello.identity(), 2, row);  // sent before the broker read the Ready
        broker.send(hello.identity(), Codec.paused(1));
        Received r = broker.expect(MessageType.PREDICT_REPLY, WAIT_MS);
        assertEquals(2, r.body(PredictReply.class).batchId());
        assertEquals("stopped", broker.expect(MessageType.GOODBYE, WAIT_MS).body(ketch.wire.Goodbye.class).reason());
        done.get(WAIT_MS, TimeUnit.MILLISECONDS);
    }

    @Test
    void aWelcomeChoosingAVersionNotOfferedIsARefusal() throws Exception {
        start(builder(ContainerTest::sums));
        Received hello = broker.expect(MessageType.HELLO, WAIT_MS);
        broker.send(hello.identity(), Codec.welcome(1000, 10_000, 7));
        ExecutionException e = org.junit.jupiter.api.Assertions.assertThrows(ExecutionException.class,
                () -> done.get(WAIT_MS, TimeUnit.MILLISECONDS));
        assertEquals(ErrorCode.UNSUPPORTED_VERSION, assertInstanceOf(RefusedException.class, e.getCause()).code());
    }
}
