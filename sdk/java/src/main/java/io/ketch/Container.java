package io.ketch;

import java.io.IOException;
import java.lang.System.Logger.Level;
import java.net.InetAddress;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.ReentrantLock;
import ketch.wire.PredictRequest;
import ketch.wire.Welcome;
import org.zeromq.SocketType;
import org.zeromq.ZMQ;

/**
 * A model container: serves one {@link Model} to a Ketch broker (protocol.md section 5).
 *
 * <pre>{@code
 * Container c = Container.builder(inputs -> ...)
 *         .broker("tcp://127.0.0.1:7000").name("sum").version("1")
 *         .input(DType.FLOAT64, -1)
 *         .build();
 * c.serve();   // run() with SIGTERM and SIGINT handled: drains, says Goodbye, returns
 * }</pre>
 *
 * <p><b>Threads.</b> {@link #run()} is the I/O loop: it owns the DEALER socket, polls it with
 * a timeout equal to the next deadline (heartbeat, broker silence, Hello timeout, reconnect,
 * drain; at most 100 ms, so that {@link #stop()} is seen soon), and computes each batch where
 * it was received, with no hand-off between threads on the query's path (as the Python
 * runtime does). While a batch computes, the socket is lent to a heartbeat thread under a
 * lock (a ZeroMQ socket may move between threads across a full memory barrier), which sends
 * {@code Heartbeat{busy: true}} whenever nothing else went out for {@code heartbeat_ms}, so a
 * long batch is never taken for death.
 *
 * <p><b>Lifecycle.</b>
 * <pre>
 *  CONNECTING --Welcome--> READY --Shutdown / stop()--> DRAINING --Paused (v2) / quiet 50 ms (v1)--> Goodbye, DONE
 *      |  ^                  |
 *      |  +--- BACKOFF <-----+  broker silent past dead_after_ms (or no Welcome in time, or an
 *      |                        Error CONFLICT answering the Hello): close the socket, wait,
 *      |                        new socket, Hello again
 *      +-- Error UNSUPPORTED_VERSION (or another Error answering the Hello) --> DONE, run() throws RefusedException
 *  READY --Error BAD_MESSAGE (whatever its text)--> Hello again on the same socket --> CONNECTING
 * </pre>
 * Draining: {@code Ready{credits: 0}} goes out at once; batches that arrive afterwards (the
 * broker sent them before it read the Ready) are computed and answered as usual; Goodbye goes
 * out once the broker's {@code Paused} has come (protocol 2: every batch it sent arrives
 * before it), or, with a version-1 broker, once no batch has arrived for 50 ms, so nothing the
 * broker sent is handed back.
 *
 * <p><b>Versions.</b> The Hello offers every protocol version this SDK speaks
 * ({@link Codec#protocolVersions()}); the Welcome names the one chosen (none: 1). A message of
 * a version not spoken is answered {@code UNSUPPORTED_VERSION}, one of an unknown type (a newer
 * broker's) {@code UNKNOWN_MESSAGE}; fields a newer broker appends to a table are skipped.
 */
public final class Container {
    /** The sdk string sent in Hello. */
    public static final String SDK = "java/0.1.0";

    /** A draining container says Goodbye after this long without a batch (the Python runtime's figure). */
    static final long DRAIN_QUIET_NS = 50_000_000L;
    /** The longest poll, so that a stop() from another thread is seen soon. */
    private static final long MAX_POLL_MS = 100;
    /** Messages handled per wake-up before the clock, the stop flag and the heartbeat are looked at. */
    private static final int BURST = 64;

    private static final System.Logger DEFAULT_LOG = System.getLogger(Container.class.getName());

    enum State { CONNECTING, READY, DRAINING, BACKOFF, DONE }

    // ------------------------------------------------------------ configuration

    private final Model model;
    private final String broker;
    private final String name;
    private final String version;
    private final DType inputDtype;
    private final long[] inputShape;
    private final String replicaId;
    private final long credits;
    private final long maxBatch;
    private final boolean deterministic;
    private final long helloTimeoutMs;
    private final long reconnectMinMs;
    private final long reconnectMaxMs;
    private final long drainTimeoutMs;
    private final long goodbyeLingerMs;
    private final BatchRunner runner;
    private final System.Logger logger;
    private final String fingerprint;

    // ------------------------------------------------------------ shared with other threads

    private final AtomicBoolean started = new AtomicBoolean();
    private final CountDownLatch finished = new CountDownLatch(1);
    /** Held by whichever thread uses the socket: the I/O loop, or the heartbeat thread during a batch. */
    private final ReentrantLock socketLock = new ReentrantLock();
    private final AtomicLong batchesDone = new AtomicLong();
    private volatile boolean stopRequested;
    private volatile boolean computing;
    private volatile long lastSendNs;
    private volatile long heartbeatMs;
    private volatile State publicState = State.CONNECTING;

    // ------------------------------------------------------------ owned by the I/O loop

    private ZMQ.Context ctx;
    private ZMQ.Socket socket;
    private State state = State.CONNECTING;
    private long lastRecvNs;
    private long lastBatchNs;
    private long helloSentNs;
    private long deadAfterMs;
    private long backoffMs;
    private long reconnectAtNs;
    private long drainStartNs;
    private boolean pausedSeen;
    private int protocol = Codec.PROTOCOL_VERSION;
    private boolean stopHandled;
    private String goodbyeReason = "drained";
    private RefusedException refusal;
    private final byte[] heartbeatIdle = Codec.heartbeat(false);
    private final byte[] heartbeatBusy = Codec.heartbeat(true);

    private Container(Builder b) {
        this.model = b.model;
        this.broker = b.broker;
        this.name = b.name;
        this.version = b.version;
        this.inputDtype = b.inputDtype;
        this.inputShape = b.inputShape.clone();
        this.replicaId = b.replicaId != null ? b.replicaId : defaultReplicaId(b.name, b.index);
        this.credits = b.credits;
        this.maxBatch = b.maxBatch;
        this.deterministic = b.deterministic;
        this.helloTimeoutMs = b.helloTimeout.toMillis();
        this.reconnectMinMs = b.reconnectMin.toMillis();
        this.reconnectMaxMs = b.reconnectMax.toMillis();
        this.drainTimeoutMs = b.drainTimeout.toMillis();
        this.goodbyeLingerMs = b.goodbyeLinger.toMillis();
        this.runner = new BatchRunner(model, b.skipExpired, System::nanoTime);
        this.logger = b.logger != null ? b.logger : DEFAULT_LOG;
        this.fingerprint = fingerprint(model);
    }

    /** A builder for a container serving {@code model}. */
    public static Builder builder(Model model) {
        return new Builder(model);
    }

    /** The replica id sent in Hello (stable across reconnects). */
    public String replicaId() {
        return replicaId;
    }

    /** The broker backend address this container connects to. */
    public String broker() {
        return broker;
    }

    /** True once the broker has welcomed this container and until it starts draining. */
    public boolean isReady() {
        return publicState == State.READY;
    }

    /** Batches answered so far (whole-batch failures included). */
    public long batches() {
        return batchesDone.get();
    }

    /** The protocol version the broker chose in its last Welcome (1 before any). */
    public int protocol() {
        return protocol;
    }

    /**
     * {@code hostname/model/index}, the default replica id: the same for every start of the
     * same replica on the same host.
     */
    /**
     * What this container serves, sent in Hello (the broker keys its cache on it): "build:" and
     * $KETCH_BUILD_ID when set, else "sha256:" and a digest of the model's class file (for a
     * lambda or method reference, the class that defines it; changes in other classes or in
     * weights need a build id). Empty when neither can be had.
     */
    static String fingerprint(Object model) {
        return fingerprint(model, System.getenv("KETCH_BUILD_ID"));
    }

    static String fingerprint(Object model, String build) {
        if (build != null && !build.isEmpty()) {
            String text = "build:" + build;
            if (text.length() > 128 || !text.chars().allMatch(c -> c > 0x20 && c < 0x7f)) {
                throw new IllegalArgumentException("KETCH_BUILD_ID " + (build.length() > 40
                        ? build.substring(0, 40) + "..." : build)
                        + ": at most 122 printable ASCII characters, no space");
            }
            return text;
        }
        Class<?> cls = model.getClass();
        if (cls.isHidden()) {  // a lambda or method reference: a nestmate of the class that wrote it
            cls = cls.getNestHost();
        }
        try (java.io.InputStream in = cls.getResourceAsStream("/" + cls.getName().replace('.', '/') + ".class")) {
            if (in == null) {
                return "";
            }
            byte[] digest = java.security.MessageDigest.getInstance("SHA-256").digest(in.readAllBytes());
            return "sha256:" + java.util.HexFormat.of().formatHex(digest, 0, 16);
        } catch (IOException | java.security.NoSuchAlgorithmException e) {
            return "";
        }
    }

    static String defaultReplicaId(String model, int index) {
        String host = System.getenv("HOSTNAME");
        try {
            host = InetAddress.getLocalHost().getHostName();
        } catch (IOException | RuntimeException e) {
            // fall back to $HOSTNAME below
        }
        if (host == null || host.isEmpty()) {
            host = "localhost";
        }
        return host + "/" + model + "/" + index;
    }

    // ------------------------------------------------------------ public control

    /**
     * Asks the container to stop: it sends {@code Ready{credits: 0}}, finishes the batches the
     * broker sent it, sends Goodbye and {@link #run()} returns. Safe to call from any thread
     * (a signal handler included), more than once, and before {@code run()} (which then
     * returns at once). Does not wait; see {@link #awaitTermination}.
     */
    public void stop() {
        stopRequested = true;
    }

    /** Waits until {@link #run()} has returned; true if it did within {@code timeout}. */
    public boolean awaitTermination(Duration timeout) throws InterruptedException {
        return finished.await(timeout.toNanos(), TimeUnit.NANOSECONDS);
    }

    /**
     * {@link #run()} with SIGTERM and SIGINT handled: either signal calls {@link #stop()}, so the
     * container drains and says Goodbye, and this method returns normally. The signals are
     * caught before the JVM starts its shutdown (no shutdown hook is involved), so logging
     * still works while the container drains. Where the JVM offers no signal handling
     * ({@code sun.misc.Signal} missing), a shutdown hook stops the container and waits for it.
     *
     * @throws RefusedException when the broker refuses the Hello
     */
    public void serve() {
        if (!Signals.install(this::stop)) {
            Thread hook = new Thread(() -> {
                stop();
                try {
                    awaitTermination(Duration.ofMillis(drainTimeoutMs + goodbyeLingerMs + 1000));
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }, "ketch-shutdown-" + name);
            Runtime.getRuntime().addShutdownHook(hook);
        }
        run();
    }

    // ------------------------------------------------------------ the I/O loop

    /**
     * Connects, says Hello and serves batches until the broker sends Shutdown or {@link #stop()}
     * is called; then drains, says Goodbye and returns. Reconnects by itself when the broker goes
     * silent.
     *
     * @throws RefusedException when the broker refuses the Hello (for example UNSUPPORTED_VERSION)
     * @throws IllegalStateException when called twice
     */
    public void run() {
        if (!started.compareAndSet(false, true)) {
            throw new IllegalStateException("Container.run() may be called once");
        }
        Thread beat = null;
        socketLock.lock();
        try {
            ctx = ZMQ.context(1);
            if (stopRequested) {
                state = State.DONE;
            } else {
                beat = new Thread(this::beat, "ketch-heartbeat-" + name);
                beat.setDaemon(true);
                beat.start();
                connect();
            }
            while (state != State.DONE) {
                long now = System.nanoTime();
                long timeout = pollTimeoutMs(now);
                if (socket == null) {
                    sleepMs(timeout);
                } else {
                    // a blocking receive with a timeout: one wait on the socket's mailbox, where
                    // a Poller would set up a selector for every call
                    socket.setReceiveTimeOut((int) Math.min(timeout, Integer.MAX_VALUE));
                    byte[] header = socket.recv(0);
                    if (header != null) {
                        receive(header);
                    }
                }
                if (stopRequested && !stopHandled && state != State.DONE) {
                    beginDrain("stopped");
                }
                timers(System.nanoTime());
            }
        } finally {
            setState(State.DONE);
            socketLock.unlock();
            if (beat != null) {
                beat.interrupt();
                try {
                    beat.join(1000);
                } catch (InterruptedException e) {
                    Thread.currentThread().interrupt();
                }
            }
            close();
            finished.countDown();
        }
        if (refusal != null) {
            throw refusal;
        }
    }

    private static void sleepMs(long ms) {
        try {
            Thread.sleep(Math.max(1, ms));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    /** The heartbeat thread: speaks for the container while the I/O thread computes a batch. */
    private void beat() {
        while (publicState != State.DONE) {
            long hb = heartbeatMs > 0 ? heartbeatMs : 1000;
            try {
                Thread.sleep(Math.max(5, Math.min(hb / 2, 500)));
            } catch (InterruptedException e) {
                return;
            }
            if (!computing || System.nanoTime() - lastSendNs < hb * 1_000_000) {
                continue;
            }
            socketLock.lock();
            try {
                if (computing && socket != null && publicState != State.DONE) {
                    send(heartbeatBusy, List.of());
                }
            } finally {
                socketLock.unlock();
            }
        }
    }

    private void close() {
        if (socket != null) {
            closeSocket(0);
        }
        if (ctx != null) {
            ctx.close();  // waits for the linger of a Goodbye, if one was sent
        }
    }

    /** New DEALER socket, Hello, state CONNECTING. */
    private void connect() {
        socket = ctx.socket(SocketType.DEALER);
        socket.setLinger(0);
        socket.setReconnectIVL(100);
        socket.setReconnectIVLMax(Math.max(100, (int) reconnectMaxMs));
        socket.connect(broker);
        lastRecvNs = System.nanoTime();
        sendHello();
    }

    private void sendHello() {
        long pid = ProcessHandle.current().pid();
        send(Codec.hello(name, version, inputDtype, inputShape, SDK, replicaId, credits, maxBatch, deterministic,
                pid & 0xFFFFFFFFL, fingerprint, Codec.protocolVersions()), List.of());
        helloSentNs = System.nanoTime();
        pausedSeen = false;
        setState(State.CONNECTING);
        log(Level.INFO, "hello sent to " + broker);
    }

    private void closeSocket(long lingerMs) {
        if (socket != null) {
            socket.setLinger(lingerMs);
            socket.close();
            socket = null;
        }
    }

    /** Broker silent or no Welcome: drop the socket and try again after a backoff. */
    private void reconnectLater(String why) {
        closeSocket(0);
        long delay = backoffMs == 0 ? reconnectMinMs : backoffMs;
        backoffMs = Math.min(Math.max(delay * 2, 1), reconnectMaxMs);
        reconnectAtNs = System.nanoTime() + delay * 1_000_000;
        setState(State.BACKOFF);
        log(Level.WARNING, why + "; reconnecting in " + delay + " ms");
    }

    private void setState(State s) {
        state = s;
        publicState = s;
    }

    private long pollTimeoutMs(long now) {
        long due = now + MAX_POLL_MS * 1_000_000;
        switch (state) {
            case CONNECTING -> due = Math.min(due, helloSentNs + helloTimeoutMs * 1_000_000);
            case READY, DRAINING -> {
                if (heartbeatMs > 0) {
                    due = Math.min(due, lastSendNs + heartbeatMs * 1_000_000);
                }
                if (state == State.READY && deadAfterMs > 0) {
                    due = Math.min(due, lastRecvNs + deadAfterMs * 1_000_000 + 1);
                }
                if (state == State.DRAINING) {
                    due = Math.min(due, waitsForPaused(now) ? drainStartNs + pausedWaitNs()
                            : Math.max(drainStartNs, lastBatchNs) + DRAIN_QUIET_NS);
                }
            }
            case BACKOFF -> due = Math.min(due, reconnectAtNs);
            default -> due = now;
        }
        return Math.max(0, (due - now + 999_999) / 1_000_000);
    }

    private void timers(long now) {
        switch (state) {
            case CONNECTING -> {
                if (now - helloSentNs >= helloTimeoutMs * 1_000_000) {
                    reconnectLater("no Welcome within " + helloTimeoutMs + " ms");
                }
            }
            case READY, DRAINING -> {
                if (state == State.DRAINING) {
                    if (pausedSeen || (!waitsForPaused(now)
                            && now - Math.max(drainStartNs, lastBatchNs) >= DRAIN_QUIET_NS)) {
                        finish();
                        return;
                    }
                    if (now - drainStartNs >= drainTimeoutMs * 1_000_000) {
                        log(Level.WARNING, "drain timeout: the broker still sends batches after "
                                + drainTimeoutMs + " ms");
                        finish();
                        return;
                    }
                }
                if (state == State.READY && deadAfterMs > 0 && now - lastRecvNs > deadAfterMs * 1_000_000) {
                    reconnectLater("broker silent for " + deadAfterMs + " ms");
                    return;
                }
                if (heartbeatMs > 0 && now - lastSendNs >= heartbeatMs * 1_000_000) {
                    send(heartbeatIdle, List.of());
                }
            }
            case BACKOFF -> {
                if (now >= reconnectAtNs) {
                    connect();
                }
            }
            default -> { }
        }
    }

    /**
     * Whether a draining container waits for the broker's Paused: with a broker that chose
     * protocol 2, until the dead interval has passed without it (then the quiet spell decides).
     */
    private boolean waitsForPaused(long now) {
        return protocol >= MessageType.PAUSED.since() && !pausedSeen && now - drainStartNs < pausedWaitNs();
    }

    private long pausedWaitNs() {
        return (deadAfterMs > 0 ? deadAfterMs : 5000) * 1_000_000;
    }

    /** Handles {@code first} and up to BURST - 1 more messages that are already waiting. */
    private void receive(byte[] first) {
        byte[] header = first;
        for (int k = 0; k < BURST && socket != null; k++) {
            if (k > 0) {
                header = socket.recv(ZMQ.DONTWAIT);
                if (header == null) {
                    return;
                }
            }
            List<byte[]> payloads = List.of();
            if (socket.hasReceiveMore()) {
                payloads = new ArrayList<>();
                do {
                    payloads.add(socket.recv(0));
                } while (socket.hasReceiveMore());
            }
            lastRecvNs = System.nanoTime();
            try {
                handle(header, payloads);
            } catch (ProtocolException e) {
                log(Level.WARNING, "bad message from the broker: " + e.getMessage());
                send(Codec.error(e.code(), e.getMessage(), 0, 0), List.of());
            } catch (RuntimeException e) {  // a corrupt flatbuffer read lazily
                log(Level.WARNING, "bad message from the broker: " + e);
                send(Codec.error(ErrorCode.BAD_MESSAGE, "header does not decode: " + BatchRunner.describe(e), 0, 0),
                        List.of());
            }
            if (state == State.DONE || state == State.BACKOFF) {
                return;
            }
        }
    }

    private void handle(byte[] header, List<byte[]> payloads) {
        Codec.Message m = Codec.decode(header);
        if (!Codec.speaks(m.version())) {
            String text = Codec.unsupported(m.version());
            if (m.type() == MessageType.ERROR) {
                log(Level.WARNING, "ignoring an Error of " + text);
            } else {
                log(Level.WARNING, "ignoring " + m.type().wireName() + ": " + text);
                send(Codec.error(ErrorCode.UNSUPPORTED_VERSION, text, 0, 0), List.of());
            }
            return;
        }
        switch (m.type()) {
            case WELCOME -> onWelcome(m.body(Welcome.class));
            case HEARTBEAT -> { }
            case PREDICT_REQUEST -> onPredictRequest(m.body(PredictRequest.class), payloads);
            case SHUTDOWN -> {
                String reason = Codec.str(m.body(ketch.wire.Shutdown.class).reason());
                log(Level.INFO, "shutdown from the broker: " + reason);
                beginDrain("drained");
            }
            case ERROR -> onError(m.body(ketch.wire.Error.class));
            case PAUSED -> {
                if (state == State.DRAINING) {
                    pausedSeen = true;
                    log(Level.INFO, "paused by the broker: every batch it sent has arrived ("
                            + m.body(ketch.wire.Paused.class).inflight() + " in flight when it read the Ready)");
                }
            }
            default -> throw new ProtocolException(ErrorCode.UNKNOWN_MESSAGE,
                    m.type().wireName() + " is not valid from the broker to a container");
        }
    }

    private void onWelcome(Welcome w) {
        int chosen = w.version() > 0 ? w.version() : Codec.PROTOCOL_VERSION;  // a version-1 broker names none
        if (!Codec.speaks(chosen)) {
            refuse(ErrorCode.UNSUPPORTED_VERSION, "the broker chose protocol version " + chosen
                    + ", which this container does not speak (it offered " + Codec.spoken() + ")");
            return;
        }
        protocol = chosen;
        heartbeatMs = w.heartbeatMs() > 0 ? Math.max(10, w.heartbeatMs()) : 1000;
        deadAfterMs = w.deadAfterMs() > 0 ? Math.max(2 * heartbeatMs, w.deadAfterMs()) : 5000;
        if (state == State.CONNECTING) {
            backoffMs = 0;
            setState(stopHandled ? State.DRAINING : State.READY);
            log(Level.INFO, "welcomed: protocol " + protocol + ", heartbeat " + heartbeatMs + " ms, dead after "
                    + deadAfterMs + " ms");
            if (stopHandled) {  // a new registration while draining: say it again
                send(Codec.ready(0), List.of());
            } else if (stopRequested) {
                beginDrain("stopped");
            }
        }
    }

    /** Computes the batch here, with the socket lent to the heartbeat thread meanwhile. */
    private void onPredictRequest(PredictRequest req, List<byte[]> payloads) {
        long received = System.nanoTime();
        BatchRunner.Job job = BatchRunner.parse(0, req, payloads, received);
        BatchRunner.Result r;
        computing = true;
        socketLock.unlock();
        try {
            r = runner.run(job);
        } catch (RuntimeException | Error e) {  // an SDK bug: still answer the batch
            byte[] h = Codec.predictReply(job.batchId(), 0, List.of(), ErrorCode.INTERNAL, BatchRunner.describe(e));
            r = new BatchRunner.Result(job.seq(), job.batchId(), h, List.of(), true);
        } finally {
            socketLock.lock();
            computing = false;
        }
        batchesDone.incrementAndGet();
        lastBatchNs = System.nanoTime();
        if (r.failed()) {
            log(Level.WARNING, "batch " + Long.toUnsignedString(job.batchId()) + " failed: "
                    + Codec.str(Codec.decode(r.header()).body(ketch.wire.PredictReply.class).message()));
        }
        send(r.header(), r.payloads());
    }

    private void onError(ketch.wire.Error e) {
        ErrorCode code;
        try {
            code = ErrorCode.fromCode(e.code());
        } catch (IllegalArgumentException ex) {
            code = ErrorCode.INTERNAL;
        }
        String text = Codec.str(e.message());
        if (code == ErrorCode.UNSUPPORTED_VERSION) {
            refuse(code, text);
        } else if (code == ErrorCode.BAD_MESSAGE && (state == State.READY || state == State.DRAINING)) {
            log(Level.WARNING, "broker says '" + text + "': saying Hello again");
            sendHello();
        } else if (state == State.CONNECTING) {
            if (code == ErrorCode.BAD_MESSAGE) {  // answers a message sent before the Hello in flight
                log(Level.DEBUG, "broker says '" + text + "' to a message sent before the Hello in flight");
            } else if (code == ErrorCode.CONFLICT) {  // not now: the id is live elsewhere, or other code
                reconnectLater("hello refused for now: " + code + ": " + text);
            } else {
                refuse(code, text);
            }
        } else {
            log(Level.WARNING, "error from the broker: " + code + ": " + text);
        }
    }

    private void refuse(ErrorCode code, String text) {
        log(Level.ERROR, "the broker refused this container: " + code + ": " + text);
        refusal = new RefusedException(code, "broker refused " + replicaId + ": " + code + ": " + text);
        closeSocket(0);
        setState(State.DONE);
    }

    /** Shutdown or stop(): Ready{0}, answer what the broker already sent, then Goodbye. */
    private void beginDrain(String reason) {
        stopHandled = true;
        goodbyeReason = reason;
        switch (state) {
            case READY -> {
                send(Codec.ready(0), List.of());
                drainStartNs = System.nanoTime();
                setState(State.DRAINING);
                log(Level.INFO, "draining: Ready{credits: 0} sent, answering the batches already sent ("
                        + batchesDone.get() + " answered so far)");
            }
            case CONNECTING -> finish();
            case BACKOFF -> setState(State.DONE);
            default -> { }
        }
    }

    private void finish() {
        send(Codec.goodbye(goodbyeReason), List.of());
        log(Level.INFO, "drained: goodbye (" + goodbyeReason + ") after " + batchesDone.get() + " batch(es)");
        closeSocket(goodbyeLingerMs);
        setState(State.DONE);
    }

    /** Sends {@code [header][payloads...]} without blocking; a full queue drops the message. */
    private void send(byte[] header, List<byte[]> payloads) {
        if (socket == null) {
            return;
        }
        boolean ok = socket.send(header, payloads.isEmpty() ? ZMQ.DONTWAIT : ZMQ.DONTWAIT | ZMQ.SNDMORE);
        if (!ok) {
            log(Level.WARNING, "send queue full: dropped a message to the broker");
            return;
        }
        int n = payloads.size();
        for (int i = 0; i < n; i++) {
            socket.send(payloads.get(i), i == n - 1 ? 0 : ZMQ.SNDMORE);
        }
        lastSendNs = System.nanoTime();
    }

    private void log(Level level, String msg) {
        logger.log(level, "[ketch " + name + " " + replicaId + "] " + msg);
    }

    // ------------------------------------------------------------ builder

    /** Settings of a {@link Container}; only the broker address, name and input type have no default. */
    public static final class Builder {
        private final Model model;
        private String broker = "tcp://127.0.0.1:7000";
        private String name;
        private String version = "1";
        private DType inputDtype;
        private long[] inputShape = new long[0];
        private String replicaId;
        private int index;
        private long credits = 2;
        private long maxBatch;
        private boolean deterministic = true;
        private boolean skipExpired = true;
        private Duration helloTimeout = Duration.ofSeconds(5);
        private Duration reconnectMin = Duration.ofMillis(100);
        private Duration reconnectMax = Duration.ofSeconds(5);
        private Duration drainTimeout = Duration.ofSeconds(60);
        private Duration goodbyeLinger = Duration.ofSeconds(1);
        private System.Logger logger;

        private Builder(Model model) {
            this.model = Objects.requireNonNull(model, "model");
        }

        /** The broker's backend address (default {@code tcp://127.0.0.1:7000}). */
        public Builder broker(String address) {
            this.broker = Objects.requireNonNull(address, "address");
            return this;
        }

        /** The model name (required). */
        public Builder name(String name) {
            this.name = Objects.requireNonNull(name, "name");
            return this;
        }

        /** The model version (default "1"). */
        public Builder version(String version) {
            this.version = Objects.requireNonNull(version, "version");
            return this;
        }

        /** The per-item input type; {@code -1} in the shape is any size; text kinds have no shape. */
        public Builder input(DType dtype, long... shape) {
            if (dtype.isText() && shape.length > 0) {
                throw new IllegalArgumentException(dtype + " inputs have an empty shape");
            }
            this.inputDtype = dtype;
            this.inputShape = shape.clone();
            return this;
        }

        /** The replica id, stable across restarts (default {@code hostname/name/index}). */
        public Builder replicaId(String replicaId) {
            this.replicaId = replicaId;
            return this;
        }

        /** The replica index used in the default replica id (default 0). */
        public Builder index(int index) {
            this.index = index;
            return this;
        }

        /** Batches the container holds at once (default 2). */
        public Builder credits(long credits) {
            this.credits = checkU32("credits", credits);
            return this;
        }

        /** Largest batch accepted; 0 (default) is no limit of its own. */
        public Builder maxBatch(long maxBatch) {
            this.maxBatch = checkU32("maxBatch", maxBatch);
            return this;
        }

        /** False turns the broker's prediction cache off for this model (default true). */
        public Builder deterministic(boolean deterministic) {
            this.deterministic = deterministic;
            return this;
        }

        /** Answer items whose budget ran out with ERROR/DEADLINE instead of computing them (default true). */
        public Builder skipExpired(boolean skipExpired) {
            this.skipExpired = skipExpired;
            return this;
        }

        /** How long to wait for Welcome before trying a new connection (default 5 s). */
        public Builder helloTimeout(Duration d) {
            this.helloTimeout = positive("helloTimeout", d);
            return this;
        }

        /** First and largest wait before reconnecting; doubles in between (default 100 ms to 5 s). */
        public Builder reconnectBackoff(Duration min, Duration max) {
            this.reconnectMin = positive("reconnect min", min);
            this.reconnectMax = positive("reconnect max", max);
            if (max.compareTo(min) < 0) {
                throw new IllegalArgumentException("reconnect max below min");
            }
            return this;
        }

        /** Longest a drain may last while the broker keeps sending batches (default 60 s). */
        public Builder drainTimeout(Duration d) {
            this.drainTimeout = positive("drainTimeout", d);
            return this;
        }

        /** How long the last messages (Goodbye) may take to leave when closing (default 1 s). */
        public Builder goodbyeLinger(Duration d) {
            this.goodbyeLinger = Objects.requireNonNull(d, "goodbyeLinger");
            return this;
        }

        /** Where lifecycle lines go (default {@code System.getLogger("io.ketch.Container")}). */
        public Builder logger(System.Logger logger) {
            this.logger = Objects.requireNonNull(logger, "logger");
            return this;
        }

        public Container build() {
            if (name == null || name.isEmpty()) {
                throw new IllegalStateException("a container needs a model name");
            }
            if (inputDtype == null) {
                throw new IllegalStateException("a container needs an input dtype");
            }
            return new Container(this);
        }

        private static long checkU32(String what, long v) {
            if (v < 0 || v > 0xFFFFFFFFL) {
                throw new IllegalArgumentException(what + " must fit in 32 unsigned bits, not " + v);
            }
            return v;
        }

        private static Duration positive(String what, Duration d) {
            if (d.isNegative() || d.isZero()) {
                throw new IllegalArgumentException(what + " must be positive");
            }
            return d;
        }
    }
}
