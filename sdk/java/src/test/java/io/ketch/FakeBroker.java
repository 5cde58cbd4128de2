package io.ketch;

import static org.junit.jupiter.api.Assertions.fail;

import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import org.zeromq.SocketType;
import org.zeromq.ZMQ;

/**
 * The broker's backend side for container tests: a ROUTER bound to a free loopback port.
 * Every receive polls with a timeout, so a lost message fails the test instead of hanging.
 */
final class FakeBroker implements AutoCloseable {
    /** One message from a container: its ROUTER identity, decoded header and payload frames. */
    record Received(byte[] identity, Codec.Message message, byte[] header, List<byte[]> payloads) {
        MessageType type() {
            return message.type();
        }

        <T extends com.google.flatbuffers.Table> T body(Class<T> cls) {
            return message.body(cls);
        }
    }

    private final ZMQ.Context ctx = ZMQ.context(1);
    private final ZMQ.Socket router = ctx.socket(SocketType.ROUTER);
    private final ZMQ.Poller poller = ctx.poller(1);
    final String endpoint;

    FakeBroker() {
        router.setLinger(0);
        router.bind("tcp://127.0.0.1:*");
        endpoint = router.getLastEndpoint();
        poller.register(router, ZMQ.Poller.POLLIN);
    }

    /** The next message, or null after {@code timeoutMs}. */
    Received poll(long timeoutMs) {
        long deadline = System.nanoTime() + timeoutMs * 1_000_000;
        while (!hasMessage()) {
            long left = (deadline - System.nanoTime() + 999_999) / 1_000_000;
            if (left <= 0) {
                return null;
            }
            poller.poll(left);
        }
        byte[] identity = router.recv(0);
        List<byte[]> frames = new ArrayList<>();
        while (router.hasReceiveMore()) {
            frames.add(router.recv(0));
        }
        if (frames.isEmpty()) {
            fail("a message without a header frame");
        }
        byte[] header = frames.get(0);
        return new Received(identity, Codec.decode(header), header, frames.subList(1, frames.size()));
    }

    private boolean hasMessage() {
        return (router.getEvents() & ZMQ.Poller.POLLIN) != 0;
    }

    /** The next message, failing the test after {@code timeoutMs}. */
    Received recv(long timeoutMs) {
        Received r = poll(timeoutMs);
        if (r == null) {
            fail("no message from the container within " + timeoutMs + " ms");
        }
        return r;
    }

    /** The next message not of the {@code skip} types (heartbeats, usually). */
    Received recvSkipping(long timeoutMs, MessageType... skip) {
        Set<MessageType> skipped = Set.of(skip);
        long deadline = System.nanoTime() + timeoutMs * 1_000_000;
        while (true) {
            long left = Math.max(1, (deadline - System.nanoTime()) / 1_000_000);
            Received r = recv(left);
            if (!skipped.contains(r.type())) {
                return r;
            }
        }
    }

    /** The next message, which must be of type {@code type} once heartbeats are skipped. */
    Received expect(MessageType type, long timeoutMs) {
        Received r = recvSkipping(timeoutMs, MessageType.HEARTBEAT);
        if (r.type() != type) {
            fail("expected " + type.wireName() + ", got " + r.type().wireName() + ": " + Codec.toJson(r.header()));
        }
        return r;
    }

    void send(byte[] identity, byte[] header, byte[]... payloads) {
        router.send(identity, ZMQ.SNDMORE);
        router.send(header, payloads.length == 0 ? 0 : ZMQ.SNDMORE);
        for (int i = 0; i < payloads.length; i++) {
            router.send(payloads[i], i == payloads.length - 1 ? 0 : ZMQ.SNDMORE);
        }
    }

    void send(byte[] identity, byte[] header, List<byte[]> payloads) {
        send(identity, header, payloads.toArray(new byte[0][]));
    }

    @Override
    public void close() {
        poller.close();
        router.close();
        ctx.close();
    }
}
