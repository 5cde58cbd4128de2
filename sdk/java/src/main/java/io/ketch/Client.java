package io.ketch;

import java.lang.System.Logger.Level;
import java.time.Duration;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.Objects;
import java.util.PriorityQueue;
import java.util.concurrent.CancellationException;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CompletionException;
import java.util.concurrent.ConcurrentHashMap;
import java.util.concurrent.ConcurrentLinkedQueue;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.locks.LockSupport;
import ketch.wire.Reply;
import ketch.wire.ReplyItem;
import ketch.wire.Tensor;
import org.zeromq.SocketType;
import org.zeromq.ZMQ;

/**
 * A client of the broker's frontend (protocol.md section 4): a JVM service asks Ketch for
 * predictions natively, over one DEALER socket.
 *
 * <pre>{@code
 * try (Client client = Client.builder("tcp://127.0.0.1:7001").timeout(Duration.ofMillis(100)).build()) {
 *     Prediction p = client.predict("iris", Value.doubles(new double[] {5.1, 3.5, 1.4, 0.2}));
 *     List<Prediction> many = client.predictMany("iris", inputs);          // pipelined, in input order
 *     client.predictAsync("iris", x).thenAccept(q -> System.out.println(q.output().asString()));
 * } catch (RequestException.ModelError e) {          // typed errors, as in the Python SDK
 *     ...
 * }
 * }</pre>
 *
 * <p><b>Threads.</b> A client is thread-safe: any number of threads may call it at once. One
 * I/O thread owns the socket; callers hand it their queries through a queue and unpark it.
 * With nothing outstanding it sleeps until a caller comes; with queries outstanding it waits
 * for replies in a blocking receive of at most 1 ms at a time, so a query queued meanwhile
 * goes out within a millisecond. (JeroMQ's {@code Poller}, and a selector on the socket's
 * ZMQ_FD, both cost a busy loop or about 0.3 ms of CPU per wake-up.) Futures are completed
 * on the I/O thread: callbacks attached with the non-async {@code CompletableFuture} methods
 * run there and should be short.
 *
 * <p><b>Queries per message.</b> The I/O thread sends the queries waiting in its queue
 * together: consecutive ones for the same app, of one dtype and shape and with the same
 * timeout, go in one multi-id {@code Query} (at most {@code chunk}, default 64: the
 * protocol's {@code MAX_ITEMS}), whichever calls and threads they came from, as the Python
 * clients do. The broker then handles one message for many queries: the queries that many
 * threads (or the callbacks of a reply's futures) refill go out as one message.
 *
 * <p><b>Time limits.</b> A query with a timeout is sent with it ({@code Query.timeout_us}): the
 * broker answers by then (a prediction, the app's default or DEADLINE); the client waits
 * that long plus 500 ms before it gives up with {@link KetchTimeoutException}. Without a
 * timeout the app's SLO applies and the client waits up to 10 s. A reply that arrives for a
 * query that has timed out is ignored.
 *
 * <p><b>Errors.</b> An explicit error answer completes the query with the
 * {@link RequestException} subclass of its code ({@link RequestException.ModelError},
 * {@link RequestException.UnknownApp}, {@link RequestException.Overloaded} with
 * {@code retryAfterMs()}, ...); the blocking methods throw it.
 */
public final class Client implements AutoCloseable {
    /** Wait past a query's own timeout before calling the broker silent (the Python client's figure). */
    static final long GRACE_MS = 500;
    /** How long to wait when the app's SLO applies. */
    static final long NO_TIMEOUT_WAIT_MS = 10_000;
    /** While queries are outstanding, the I/O thread waits for replies this long at a time. */
    static final int RECV_SLICE_MS = 1;

    private static final System.Logger LOG = System.getLogger(Client.class.getName());
    private static final byte[][] NO_PAYLOADS = new byte[0][];

    private record Pending(CompletableFuture<Prediction> future, long sentNs) {}

    /** Queries of one call, of one app, dtype, shape and timeout, queued for the I/O thread. */
    private record Outgoing(String app, DType dtype, long[] shape, long timeoutUs, long[] ids, byte[][] payloads,
                            long deadlineNs) {
        boolean joins(Outgoing o) {
            return o.timeoutUs == timeoutUs && o.dtype == dtype && o.app.equals(app) && Arrays.equals(o.shape, shape);
        }
    }

    /** One Query message as sent: its header, payloads, and each id with its deadline. */
    private record Message(byte[] header, byte[][] payloads, long[] ids, long[] deadlinesNs) {}

    private final String address;
    private final Duration defaultTimeout;
    private final int chunk;
    private final int window;
    private final AtomicLong nextId = new AtomicLong();
    private final ConcurrentHashMap<Long, Pending> pending = new ConcurrentHashMap<>();
    private final ConcurrentLinkedQueue<Outgoing> outbox = new ConcurrentLinkedQueue<>();
    private final ZMQ.Context ctx;
    private final ZMQ.Socket socket;   // the I/O thread's once it starts
    private final Thread io;
    private volatile boolean closing;
    private volatile Throwable failure;

    private Client(Builder b) {
        this.address = b.address;
        this.defaultTimeout = b.timeout;
        this.chunk = b.chunk;
        this.window = b.window;
        this.ctx = ZMQ.context(1);
        this.socket = ctx.socket(SocketType.DEALER);
        socket.setLinger(0);
        socket.connect(address);
        this.io = new Thread(this::loop, "ketch-client-" + address);
        io.setDaemon(true);
        io.start();
    }

    /** A client of the frontend at {@code address} (e.g. {@code tcp://127.0.0.1:7001}) with default settings. */
    public static Client connect(String address) {
        return builder(address).build();
    }

    /** Settings of a client of the frontend at {@code address}. */
    public static Builder builder(String address) {
        return new Builder(address);
    }

    /** The frontend address. */
    public String address() {
        return address;
    }

    // ------------------------------------------------------------ predictions

    /** One prediction, with the client's default timeout; throws the query's error. */
    public Prediction predict(String app, Value input) {
        return predict(app, input, defaultTimeout);
    }

    /**
     * One prediction. {@code timeout} (null: the app's SLO) is sent with the query.
     *
     * @throws RequestException the broker's or the model's error, by code
     * @throws KetchTimeoutException no answer in time
     * @throws UnavailableException the client is closed
     */
    public Prediction predict(String app, Value input, Duration timeout) {
        return await(predictAsync(app, input, timeout));
    }

    /** One prediction, completed on the I/O thread; the default timeout applies. */
    public CompletableFuture<Prediction> predictAsync(String app, Value input) {
        return predictAsync(app, input, defaultTimeout);
    }

    /** One prediction, completed (normally or with a {@link KetchException}) on the I/O thread. */
    public CompletableFuture<Prediction> predictAsync(String app, Value input, Duration timeout) {
        Objects.requireNonNull(input, "input");
        return submit(app, List.of(input), timeout).get(0);
    }

    /** Predictions for many inputs with the default timeout; see {@link #predictMany(String, List, Duration)}. */
    public List<Prediction> predictMany(String app, List<Value> inputs) {
        return predictMany(app, inputs, defaultTimeout);
    }

    /**
     * Predictions for many inputs, pipelined on this client's socket, in input order: runs of
     * inputs of one dtype and shape go {@code chunk} to a message, with at most {@code window}
     * queries of this call outstanding. Throws the first error in input order once every
     * query is answered; {@link #predictManyAsync} gives each query's own outcome.
     */
    public List<Prediction> predictMany(String app, List<Value> inputs, Duration timeout) {
        List<CompletableFuture<Prediction>> futures = new ArrayList<>(inputs.size());
        int waited = 0;
        for (int start = 0; start < inputs.size(); start += chunk) {
            int end = Math.min(inputs.size(), start + chunk);
            while (futures.size() - waited + (end - start) > window) {   // at most `window` in flight
                futures.get(waited++).handle((p, e) -> null).join();
            }
            futures.addAll(submit(app, inputs.subList(start, end), timeout));
        }
        List<Prediction> out = new ArrayList<>(futures.size());
        RuntimeException first = null;
        for (CompletableFuture<Prediction> f : futures) {
            try {
                out.add(await(f));
            } catch (RuntimeException e) {
                if (first == null) {
                    first = e;
                }
                out.add(null);
            }
        }
        if (first != null) {
            throw first;
        }
        return out;
    }

    /** One future per input, in input order, all sent at once (no window). */
    public List<CompletableFuture<Prediction>> predictManyAsync(String app, List<Value> inputs, Duration timeout) {
        return submit(app, inputs, timeout);
    }

    /** Queries are outstanding on this client (sent or queued, not yet answered). */
    public int outstanding() {
        return pending.size();
    }

    private List<CompletableFuture<Prediction>> submit(String app, List<Value> inputs, Duration timeout) {
        Objects.requireNonNull(app, "app");
        long timeoutUs = 0;
        long waitMs = NO_TIMEOUT_WAIT_MS;
        if (timeout != null) {
            if (timeout.isNegative() || timeout.isZero()) {
                throw new IllegalArgumentException("timeout must be positive");
            }
            timeoutUs = Math.min(timeout.toNanos() / 1000, 0xFFFFFFFFL);
            waitMs = timeout.toMillis() + GRACE_MS;
        }
        List<CompletableFuture<Prediction>> futures = new ArrayList<>(inputs.size());
        if (closing || failure != null) {
            UnavailableException e = unavailable();
            for (int i = 0; i < inputs.size(); i++) {
                futures.add(CompletableFuture.failedFuture(e));
            }
            return futures;
        }
        int i = 0;
        while (i < inputs.size()) {
            Value first = inputs.get(i);
            int j = i + 1;
            while (j < inputs.size() && j - i < chunk && sameType(first, inputs.get(j))) {
                j++;
            }
            long[] ids = new long[j - i];
            byte[][] payloads = new byte[j - i][];
            long now = System.nanoTime();
            for (int k = i; k < j; k++) {
                long id = nextId.incrementAndGet();
                ids[k - i] = id;
                payloads[k - i] = inputs.get(k).payloadArray();
                CompletableFuture<Prediction> f = new CompletableFuture<>();
                pending.put(id, new Pending(f, now));
                futures.add(f);
            }
            outbox.add(new Outgoing(app, first.dtype(), first.shape(), timeoutUs, ids, payloads,
                    now + waitMs * 1_000_000));
            i = j;
        }
        LockSupport.unpark(io);
        if (closing) {   // closed meanwhile: the I/O thread may have finished before seeing these
            failAll(unavailable());
        }
        return futures;
    }

    private static boolean sameType(Value a, Value b) {
        return a.dtype() == b.dtype() && Arrays.equals(a.shape(), b.shape());
    }

    private UnavailableException unavailable() {
        Throwable f = failure;
        return f == null ? new UnavailableException("the client of " + address + " is closed")
                : new UnavailableException("the client of " + address + " failed: " + f, f);
    }

    private static Prediction await(CompletableFuture<Prediction> f) {
        try {
            return f.get();
        } catch (ExecutionException | CompletionException e) {
            Throwable cause = e.getCause();
            if (cause instanceof RuntimeException r) {
                throw r;
            }
            if (cause instanceof java.lang.Error err) {
                throw err;
            }
            throw new KetchException(ErrorCode.INTERNAL, String.valueOf(cause), cause);
        } catch (CancellationException e) {
            throw new UnavailableException("the query was cancelled", e);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new UnavailableException("interrupted while waiting for the broker", e);
        }
    }

    // ------------------------------------------------------------ closing

    /** Stops the I/O thread and closes the socket; queries still waiting fail with {@link UnavailableException}. */
    @Override
    public void close() {
        closing = true;
        LockSupport.unpark(io);
        if (Thread.currentThread() != io) {
            try {
                io.join(5000);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }
        failAll(unavailable());
    }

    private void failAll(KetchException e) {
        outbox.clear();
        for (Long id : List.copyOf(pending.keySet())) {
            Pending p = pending.remove(id);
            if (p != null) {
                p.future().completeExceptionally(e);
            }
        }
    }

    // ------------------------------------------------------------ the I/O thread

    private void loop() {
        PriorityQueue<long[]> deadlines = new PriorityQueue<>((a, b) -> Long.compare(a[0], b[0]));
        ArrayDeque<Message> stalled = new ArrayDeque<>();
        int timeoutSet = -2;
        try {
            while (!closing) {
                boolean blocked = send(stalled, deadlines);
                receive(ZMQ.DONTWAIT);
                long now = System.nanoTime();
                long next = expire(deadlines, now);
                if (!outbox.isEmpty()) {
                    continue;
                }
                if (pending.isEmpty() && stalled.isEmpty()) {
                    LockSupport.parkNanos(this, 1_000_000_000L);   // idle: a caller unparks this thread
                    continue;
                }
                // queries outstanding: wait for their replies in short slices, so that a query
                // another caller queues meanwhile goes out within a slice
                int waitMs = blocked ? 1 : (int) Math.max(1, Math.min(RECV_SLICE_MS, (next - now) / 1_000_000));
                if (waitMs != timeoutSet) {
                    socket.setReceiveTimeOut(waitMs);
                    timeoutSet = waitMs;
                }
                receive(0);
            }
        } catch (Throwable t) {   // a socket failure: every caller hears of it
            failure = t;
            LOG.log(Level.ERROR, "ketch client of " + address + " failed: " + t);
        } finally {
            closing = true;
            failAll(unavailable());
            socket.close();
            ctx.close();
        }
    }

    /** Sends what callers queued; true when the socket would block (some left for later). */
    private boolean send(ArrayDeque<Message> stalled, PriorityQueue<long[]> deadlines) {
        Message m;
        while ((m = stalled.isEmpty() ? next() : stalled.poll()) != null) {
            boolean ok = socket.send(m.header(), ZMQ.DONTWAIT | (m.payloads().length > 0 ? ZMQ.SNDMORE : 0));
            if (!ok) {
                stalled.addFirst(m);
                return true;
            }
            byte[][] payloads = m.payloads();
            for (int i = 0; i < payloads.length; i++) {
                socket.send(payloads[i], i == payloads.length - 1 ? 0 : ZMQ.SNDMORE);
            }
            long[] ids = m.ids();
            for (int i = 0; i < ids.length; i++) {
                deadlines.add(new long[] {m.deadlinesNs()[i], ids[i]});
            }
        }
        return false;
    }

    /**
     * The next Query message: the first queued call's queries and those of the calls queued
     * after it that join it (same app, dtype, shape and timeout), up to {@code chunk} ids; a
     * call that would take it past {@code chunk} starts the next message. Null when none.
     */
    private Message next() {
        Outgoing first = outbox.poll();
        if (first == null) {
            return null;
        }
        Outgoing more = outbox.peek();
        if (more == null || !first.joins(more) || first.ids().length + more.ids().length > chunk) {
            return message(first.app(), first.dtype(), first.shape(), first.timeoutUs(), List.of(first),
                    first.ids().length);
        }
        List<Outgoing> parts = new ArrayList<>();
        parts.add(first);
        int n = first.ids().length;
        while ((more = outbox.peek()) != null && first.joins(more) && n + more.ids().length <= chunk) {
            parts.add(outbox.poll());
            n += more.ids().length;
        }
        return message(first.app(), first.dtype(), first.shape(), first.timeoutUs(), parts, n);
    }

    private static Message message(String app, DType dtype, long[] shape, long timeoutUs, List<Outgoing> parts,
                                   int n) {
        long[] ids = new long[n];
        long[] deadlines = new long[n];
        byte[][] payloads = new byte[n][];
        int k = 0;
        for (Outgoing o : parts) {
            System.arraycopy(o.ids(), 0, ids, k, o.ids().length);
            System.arraycopy(o.payloads(), 0, payloads, k, o.ids().length);
            Arrays.fill(deadlines, k, k + o.ids().length, o.deadlineNs());
            k += o.ids().length;
        }
        return new Message(Codec.query(app, dtype, shape, ids, timeoutUs, 0, ""), payloads, ids, deadlines);
    }

    /** Takes every message waiting; with flags 0, waits up to the receive timeout for the first. */
    private void receive(int flags) {
        int f = flags;
        while (true) {
            byte[] header = socket.recv(f);
            if (header == null) {
                return;
            }
            f = ZMQ.DONTWAIT;
            byte[][] payloads = NO_PAYLOADS;
            if (socket.hasReceiveMore()) {
                List<byte[]> more = new ArrayList<>();
                do {
                    more.add(socket.recv(0));
                } while (socket.hasReceiveMore());
                payloads = more.toArray(NO_PAYLOADS);
            }
            try {
                dispatch(header, payloads, System.nanoTime());
            } catch (RuntimeException e) {  // a reply that does not decode: its queries time out
                LOG.log(Level.WARNING, "ketch client of " + address + ": a reply does not decode: " + e);
            }
        }
    }

    /** Times out what is due; returns the next deadline (or a second from now). */
    private long expire(PriorityQueue<long[]> deadlines, long now) {
        while (!deadlines.isEmpty() && deadlines.peek()[0] <= now) {
            long id = deadlines.poll()[1];
            Pending p = pending.remove(id);
            if (p != null) {
                long waited = (now - p.sentNs()) / 1_000_000;
                p.future().completeExceptionally(new KetchTimeoutException(
                        "no answer from the broker at " + address + " within " + waited + " ms"));
            }
        }
        return deadlines.isEmpty() ? now + 1_000_000_000L : deadlines.peek()[0];
    }

    private void dispatch(byte[] header, byte[][] payloads, long now) {
        Codec.Message m = Codec.decode(header);
        if (m.type() == MessageType.ERROR) {
            ketch.wire.Error e = m.body(ketch.wire.Error.class);
            long rid = e.requestId();
            Pending p = rid != 0 ? pending.remove(rid) : null;
            String text = Codec.str(e.message());
            if (p != null) {
                p.future().completeExceptionally(RequestException.forCode(e.code(), text, rid, e.retryAfterMs()));
            } else {
                LOG.log(Level.WARNING, "ketch client of " + address + ": error from the broker: "
                        + RequestException.forCode(e.code(), text, rid, 0).code() + ": " + text);
            }
            return;
        }
        if (!Codec.speaks(m.version()) || m.type() != MessageType.REPLY) {
            LOG.log(Level.WARNING, "ketch client of " + address + ": ignoring " + m.type().wireName()
                    + " of protocol version " + m.version());
            return;
        }
        Reply reply = m.body(Reply.class);
        int n = reply.itemsLength();
        ReplyItem item = new ReplyItem();
        Tensor tensor = new Tensor();
        for (int i = 0; i < n; i++) {
            reply.items(item, i);
            long rid = item.requestId();
            Pending p = pending.remove(rid);
            if (p == null) {
                continue;   // timed out, or not ours
            }
            Prediction prediction = answer(item, tensor, i < payloads.length ? payloads[i] : new byte[0],
                    (now - p.sentNs()) / 1e6, rid, p);
            if (prediction != null) {
                p.future().complete(prediction);
            }
        }
    }

    /** The prediction of one item, or null once its error has completed the future. */
    private static Prediction answer(ReplyItem item, Tensor tensor, byte[] payload, double latencyMs, long rid,
                                     Pending p) {
        String message = Codec.str(item.message());
        int status = item.status();
        if (status == Status.ERROR.code()) {
            p.future().completeExceptionally(RequestException.forCode(item.error(), message, rid, item.retryAfterMs()));
            return null;
        }
        Value value = null;
        if (item.output(tensor) != null) {
            long[] shape = new long[tensor.shapeLength()];
            for (int d = 0; d < shape.length; d++) {
                shape[d] = tensor.shape(d);
            }
            try {
                value = Value.wrap(DType.fromCode(tensor.dtype()), shape, payload);
            } catch (IllegalArgumentException e) {
                p.future().completeExceptionally(new ProtocolException("the answer to request " + rid
                        + " does not fit its type: " + e.getMessage()));
                return null;
            }
        }
        List<String> answered = new ArrayList<>(item.modelsAnsweredLength());
        for (int k = 0; k < item.modelsAnsweredLength(); k++) {
            answered.add(item.modelsAnswered(k));
        }
        List<String> missing = new ArrayList<>(item.modelsMissingLength());
        for (int k = 0; k < item.modelsMissingLength(); k++) {
            missing.add(item.modelsMissing(k));
        }
        boolean isDefault = status == Status.DEFAULT.code();
        return new Prediction(value, isDefault, isDefault ? message : "", Codec.str(item.model()),
                Codec.str(item.modelVersion()), latencyMs, item.latencyUs() / 1000.0, item.confidence(), answered,
                missing, rid);
    }

    // ------------------------------------------------------------ builder

    /** Settings of a {@link Client}. */
    public static final class Builder {
        private final String address;
        private Duration timeout;
        private int chunk = Codec.MAX_ITEMS;
        private int window = 512;

        private Builder(String address) {
            this.address = Objects.requireNonNull(address, "address");
        }

        /** Default time limit of each query, sent to the broker (default none: the app's SLO). */
        public Builder timeout(Duration timeout) {
            if (timeout != null && (timeout.isNegative() || timeout.isZero())) {
                throw new IllegalArgumentException("timeout must be positive");
            }
            this.timeout = timeout;
            return this;
        }

        /**
         * Queries per Query message at most (default 64, the protocol's {@code MAX_ITEMS}): runs of
         * {@code predictMany} and the queries of calls queued together are sent that many to a message.
         */
        public Builder chunk(int chunk) {
            if (chunk < 1) {
                throw new IllegalArgumentException("chunk must be at least 1");
            }
            this.chunk = chunk;
            return this;
        }

        /** Queries of one {@code predictMany} call in flight at once (default 512). */
        public Builder window(int window) {
            if (window < 1) {
                throw new IllegalArgumentException("window must be at least 1");
            }
            this.window = window;
            return this;
        }

        /** Connects (lazily: ZeroMQ connects in the background) and starts the I/O thread. */
        public Client build() {
            return new Client(this);
        }
    }
}
