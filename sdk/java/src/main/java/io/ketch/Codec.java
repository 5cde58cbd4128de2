package io.ketch;

import com.google.flatbuffers.FlatBufferBuilder;
import com.google.flatbuffers.Table;
import com.google.gson.JsonObject;
import java.nio.ByteBuffer;
import java.util.Arrays;
import java.util.List;
import java.util.Objects;
import ketch.wire.Envelope;

/**
 * Codec of the Ketch wire protocol (schemas/ketch.fbs, docs/protocol.md).
 *
 * <p>A message is {@code [header][payload...]}: the header is one flatbuffer whose root is an
 * {@code Envelope} (file identifier "KTCH") holding a protocol version and one body; payloads
 * are raw frames. {@link #decode} reads a header; the static builders write the messages a
 * container sends (and the ones tests play the broker with); {@link #toJson} and
 * {@link #fromJson} convert any body to and from the canonical JSON form of the golden
 * vectors in {@code schemas/vectors/} (driven by the generated {@link Schema}).
 *
 * <p>Fields are written in schema order, skipping absent strings and vectors and scalars equal
 * to their default, as the Python reference encoder does, so both produce the same bytes.
 */
public final class Codec {
    /**
     * The first protocol version: what a peer that names no versions speaks, and the stamp of
     * every message it defines.
     */
    public static final int PROTOCOL_VERSION = 1;
    /**
     * The protocol versions this SDK speaks, oldest first (protocol.md section 3): 2 adds the
     * negotiation itself ({@code Hello.versions}, {@code Welcome.version}) and {@code Paused}.
     */
    private static final int[] PROTOCOL_VERSIONS = {1, 2};
    /**
     * The item limit per message Ketch's senders keep to (the Python package's {@code MAX_ITEMS}):
     * the broker's Replies carry at most this many answers, and a client's Query as many queries.
     */
    public static final int MAX_ITEMS = 64;
    /** The flatbuffers file identifier of every header. */
    public static final String IDENTIFIER = "KTCH";

    private Codec() {}

    /** The protocol versions this SDK speaks, oldest first. */
    public static int[] protocolVersions() {
        return PROTOCOL_VERSIONS.clone();
    }

    /** Whether this SDK speaks protocol version {@code version}. */
    public static boolean speaks(int version) {
        for (int v : PROTOCOL_VERSIONS) {
            if (v == version) {
                return true;
            }
        }
        return false;
    }

    /** "1, 2": the versions spoken, as an error message names them. */
    static String spoken() {
        StringBuilder sb = new StringBuilder();
        for (int v : PROTOCOL_VERSIONS) {
            sb.append(sb.length() > 0 ? ", " : "").append(v);
        }
        return sb.toString();
    }

    /** The text of an UNSUPPORTED_VERSION answer to a message of {@code version}. */
    static String unsupported(int version) {
        return "protocol version " + version + " is not supported (speaks " + spoken() + ")";
    }

    /** A decoded header: protocol version, body type and the generated accessor of the body. */
    public record Message(int version, MessageType type, Table body) {
        /** The body as its generated class, e.g. {@code message.body(ketch.wire.Hello.class)}. */
        public <T extends Table> T body(Class<T> cls) {
            if (!cls.isInstance(body)) {
                throw new ProtocolException(ErrorCode.UNKNOWN_MESSAGE,
                        "expected " + cls.getSimpleName() + ", got " + type.wireName());
            }
            return cls.cast(body);
        }
    }

    // ---------------------------------------------------------------- decoding

    /**
     * Parses a header frame. Field access on the returned body is lazy: flatbuffers-java has
     * no verifier, so a corrupt buffer may still throw a RuntimeException when a field is read.
     *
     * @throws ProtocolException when the frame is not a Ketch envelope or its body type is unknown
     *     ({@code UNKNOWN_MESSAGE}; {@code UNSUPPORTED_VERSION} when its version is not spoken either)
     */
    public static Message decode(byte[] frame) {
        return decode(ByteBuffer.wrap(frame));
    }

    /** Parses a header frame held in {@code frame}'s remaining bytes. */
    public static Message decode(ByteBuffer frame) {
        ByteBuffer bb = frame.slice();
        if (bb.remaining() < 12 || !Envelope.EnvelopeBufferHasIdentifier(bb)) {
            throw new ProtocolException("header is not a Ketch envelope (missing KTCH identifier)");
        }
        try {
            Envelope env = Envelope.getRootAsEnvelope(bb);
            int version = env.version();
            int code = env.bodyType() & 0xFF;
            MessageType type = MessageType.fromCode(code);
            if (type == null) {
                throw speaks(version)
                        ? new ProtocolException(ErrorCode.UNKNOWN_MESSAGE,
                                "unknown message type " + code + " (protocol version " + version + ")")
                        : new ProtocolException(ErrorCode.UNSUPPORTED_VERSION, unsupported(version));
            }
            Table body = env.body(newBody(type));
            if (body == null) {
                throw new ProtocolException(type.wireName() + " without a body");
            }
            return new Message(version, type, body);
        } catch (ProtocolException e) {
            throw e;
        } catch (RuntimeException e) {
            throw new ProtocolException("header does not decode: " + e, e);
        }
    }

    static Table newBody(MessageType type) {
        return Schema.newBody(type.code());
    }

    /** A string field as the protocol reads it: absent is empty. */
    public static String str(String s) {
        return s == null ? "" : s;
    }

    // ---------------------------------------------------------------- JSON form

    /** A header frame as {@code {"type", "version", "body"}}, the canonical form of the JSON twins. */
    public static JsonObject toJson(byte[] frame) {
        return JsonForm.toJson(frame, decode(frame));
    }

    /** Inverse of {@link #toJson}: the header frame for {@code {"type", "version"?, "body"?}}. */
    public static byte[] fromJson(JsonObject message) {
        return JsonForm.fromJson(message);
    }

    // ---------------------------------------------------------------- builders

    /** Wraps a finished body table in the Envelope and returns the header bytes. */
    static byte[] finish(FlatBufferBuilder b, MessageType type, int body, int version) {
        Envelope.startEnvelope(b);
        Envelope.addVersion(b, version);
        Envelope.addBodyType(b, type.code());
        Envelope.addBody(b, body);
        Envelope.finishEnvelopeBuffer(b, Envelope.endEnvelope(b));
        return b.sizedByteArray();
    }

    /** Stamped with the version that brought the body ({@link MessageType#since()}). */
    static byte[] finish(FlatBufferBuilder b, MessageType type, int body) {
        return finish(b, type, body, type.since());
    }

    static int tensor(FlatBufferBuilder b, DType dtype, long[] shape) {
        int shapeOff = shape != null && shape.length > 0 ? ketch.wire.Tensor.createShapeVector(b, shape) : 0;
        ketch.wire.Tensor.startTensor(b);
        ketch.wire.Tensor.addDtype(b, dtype.code());
        if (shapeOff != 0) {
            ketch.wire.Tensor.addShape(b, shapeOff);
        }
        return ketch.wire.Tensor.endTensor(b);
    }

    static int string(FlatBufferBuilder b, String s) {
        return s == null || s.isEmpty() ? 0 : b.createString(s);
    }

    /**
     * Query: one or more items of one dtype and shape for {@code app}, item i's input in
     * payload frame i. {@code timeoutUs} 0 is the app's SLO.
     */
    public static byte[] query(String app, DType dtype, long[] shape, long[] requestIds, long timeoutUs, int priority,
                               String context) {
        FlatBufferBuilder b = new FlatBufferBuilder(128 + 8 * requestIds.length);
        int appOff = string(b, app);
        int shapeOff = shape.length > 0 ? ketch.wire.Query.createShapeVector(b, shape) : 0;
        int idsOff = requestIds.length > 0 ? ketch.wire.Query.createRequestIdsVector(b, requestIds) : 0;
        int contextOff = string(b, context);
        ketch.wire.Query.startQuery(b);
        if (appOff != 0) {
            ketch.wire.Query.addApp(b, appOff);
        }
        ketch.wire.Query.addDtype(b, dtype.code());
        if (shapeOff != 0) {
            ketch.wire.Query.addShape(b, shapeOff);
        }
        if (idsOff != 0) {
            ketch.wire.Query.addRequestIds(b, idsOff);
        }
        ketch.wire.Query.addTimeoutUs(b, timeoutUs);
        ketch.wire.Query.addPriority(b, (byte) priority);
        if (contextOff != 0) {
            ketch.wire.Query.addContext(b, contextOff);
        }
        return finish(b, MessageType.QUERY, ketch.wire.Query.endQuery(b));
    }

    /** Hello of a version-1 container: no versions named. */
    public static byte[] hello(String model, String modelVersion, DType dtype, long[] shape, String sdk,
                               String replicaId, long credits, long maxBatch, boolean deterministic, long pid,
                               String fingerprint) {
        return hello(model, modelVersion, dtype, shape, sdk, replicaId, credits, maxBatch, deterministic, pid,
                fingerprint, new int[0]);
    }

    /** Hello without a fingerprint, offering the protocol {@code versions} it speaks. */
    public static byte[] hello(String model, String modelVersion, DType dtype, long[] shape, String sdk,
                               String replicaId, long credits, long maxBatch, boolean deterministic, long pid,
                               int[] versions) {
        return hello(model, modelVersion, dtype, shape, sdk, replicaId, credits, maxBatch, deterministic, pid,
                "", versions);
    }

    /**
     * Hello: the first message of a container ({@code shape}: -1 is any size; {@code fingerprint}:
     * what it serves, "build:ID" or "sha256:HEX", or empty for none: the broker keys its cache on it),
     * offering the protocol {@code versions} it speaks; stamped with the lowest of them.
     */
    public static byte[] hello(String model, String modelVersion, DType dtype, long[] shape, String sdk,
                               String replicaId, long credits, long maxBatch, boolean deterministic, long pid,
                               String fingerprint, int[] versions) {
        FlatBufferBuilder b = new FlatBufferBuilder(256);
        int modelOff = string(b, model);
        int versionOff = string(b, modelVersion);
        int inputOff = tensor(b, dtype, shape);
        int sdkOff = string(b, sdk);
        int replicaOff = string(b, replicaId);
        int fingerprintOff = string(b, fingerprint);
        int versionsOff = versions.length > 0 ? ketch.wire.Hello.createVersionsVector(b, versions) : 0;
        ketch.wire.Hello.startHello(b);
        if (modelOff != 0) {
            ketch.wire.Hello.addModel(b, modelOff);
        }
        if (versionOff != 0) {
            ketch.wire.Hello.addModelVersion(b, versionOff);
        }
        ketch.wire.Hello.addInput(b, inputOff);
        if (sdkOff != 0) {
            ketch.wire.Hello.addSdk(b, sdkOff);
        }
        if (replicaOff != 0) {
            ketch.wire.Hello.addReplicaId(b, replicaOff);
        }
        ketch.wire.Hello.addCredits(b, credits);
        ketch.wire.Hello.addMaxBatch(b, maxBatch);
        ketch.wire.Hello.addDeterministic(b, deterministic);
        ketch.wire.Hello.addPid(b, pid);
        if (fingerprintOff != 0) {
            ketch.wire.Hello.addFingerprint(b, fingerprintOff);
        }
        if (versionsOff != 0) {
            ketch.wire.Hello.addVersions(b, versionsOff);
        }
        int lowest = versions.length > 0 ? Arrays.stream(versions).min().getAsInt() : PROTOCOL_VERSION;
        return finish(b, MessageType.HELLO, ketch.wire.Hello.endHello(b), lowest);
    }

    /** Welcome of a version-1 broker: no version named. */
    public static byte[] welcome(long heartbeatMs, long deadAfterMs) {
        return welcome(heartbeatMs, deadAfterMs, 0);
    }

    /** Welcome: the broker accepts a Hello and names the protocol {@code version} chosen (0: none). */
    public static byte[] welcome(long heartbeatMs, long deadAfterMs, int version) {
        FlatBufferBuilder b = new FlatBufferBuilder(64);
        ketch.wire.Welcome.startWelcome(b);
        ketch.wire.Welcome.addHeartbeatMs(b, heartbeatMs);
        ketch.wire.Welcome.addDeadAfterMs(b, deadAfterMs);
        ketch.wire.Welcome.addVersion(b, version);
        return finish(b, MessageType.WELCOME, ketch.wire.Welcome.endWelcome(b));
    }

    /** Paused (protocol 2): the broker's answer to {@code Ready{credits: 0}}; no batch follows. */
    public static byte[] paused(long inflight) {
        FlatBufferBuilder b = new FlatBufferBuilder(64);
        ketch.wire.Paused.startPaused(b);
        ketch.wire.Paused.addInflight(b, inflight);
        return finish(b, MessageType.PAUSED, ketch.wire.Paused.endPaused(b));
    }

    /** Ready: the container can hold {@code credits} batches (0 pauses dispatch). */
    public static byte[] ready(long credits) {
        FlatBufferBuilder b = new FlatBufferBuilder(64);
        ketch.wire.Ready.startReady(b);
        ketch.wire.Ready.addCredits(b, credits);
        return finish(b, MessageType.READY, ketch.wire.Ready.endReady(b));
    }

    /** Heartbeat; {@code busy} while a batch computes. */
    public static byte[] heartbeat(boolean busy) {
        FlatBufferBuilder b = new FlatBufferBuilder(64);
        ketch.wire.Heartbeat.startHeartbeat(b);
        ketch.wire.Heartbeat.addBusy(b, busy);
        return finish(b, MessageType.HEARTBEAT, ketch.wire.Heartbeat.endHeartbeat(b));
    }

    /** Goodbye: the container leaves. */
    public static byte[] goodbye(String reason) {
        FlatBufferBuilder b = new FlatBufferBuilder(64);
        int reasonOff = string(b, reason);
        ketch.wire.Goodbye.startGoodbye(b);
        if (reasonOff != 0) {
            ketch.wire.Goodbye.addReason(b, reasonOff);
        }
        return finish(b, MessageType.GOODBYE, ketch.wire.Goodbye.endGoodbye(b));
    }

    /** Shutdown: the broker asks a container to drain and leave. */
    public static byte[] shutdown(String reason) {
        FlatBufferBuilder b = new FlatBufferBuilder(64);
        int reasonOff = string(b, reason);
        ketch.wire.Shutdown.startShutdown(b);
        if (reasonOff != 0) {
            ketch.wire.Shutdown.addReason(b, reasonOff);
        }
        return finish(b, MessageType.SHUTDOWN, ketch.wire.Shutdown.endShutdown(b));
    }

    /** Error: a message-level error. */
    public static byte[] error(ErrorCode code, String message, long requestId, long retryAfterMs) {
        return error(code, message, requestId, retryAfterMs, PROTOCOL_VERSION);
    }

    static byte[] error(ErrorCode code, String message, long requestId, long retryAfterMs, int version) {
        FlatBufferBuilder b = new FlatBufferBuilder(128);
        int messageOff = string(b, message);
        ketch.wire.Error.startError(b);
        ketch.wire.Error.addCode(b, code.code());
        if (messageOff != 0) {
            ketch.wire.Error.addMessage(b, messageOff);
        }
        ketch.wire.Error.addRequestId(b, requestId);
        ketch.wire.Error.addRetryAfterMs(b, retryAfterMs);
        return finish(b, MessageType.ERROR, ketch.wire.Error.endError(b), version);
    }

    /**
     * PredictRequest: a batch for a container. {@code shapes} holds {@code ndim} entries per
     * item; the batch has {@code budgetsUs.length} items.
     */
    public static byte[] predictRequest(long batchId, String model, String modelVersion, DType dtype, int ndim,
                                        long[] shapes, long[] budgetsUs) {
        FlatBufferBuilder b = new FlatBufferBuilder(256);
        int modelOff = string(b, model);
        int versionOff = string(b, modelVersion);
        int shapesOff = shapes.length > 0 ? ketch.wire.PredictRequest.createShapesVector(b, shapes) : 0;
        int budgetsOff = budgetsUs.length > 0 ? ketch.wire.PredictRequest.createBudgetsUsVector(b, budgetsUs) : 0;
        ketch.wire.PredictRequest.startPredictRequest(b);
        ketch.wire.PredictRequest.addBatchId(b, batchId);
        if (modelOff != 0) {
            ketch.wire.PredictRequest.addModel(b, modelOff);
        }
        if (versionOff != 0) {
            ketch.wire.PredictRequest.addModelVersion(b, versionOff);
        }
        ketch.wire.PredictRequest.addDtype(b, dtype.code());
        ketch.wire.PredictRequest.addNdim(b, ndim);
        if (shapesOff != 0) {
            ketch.wire.PredictRequest.addShapes(b, shapesOff);
        }
        if (budgetsOff != 0) {
            ketch.wire.PredictRequest.addBudgetsUs(b, budgetsOff);
        }
        return finish(b, MessageType.PREDICT_REQUEST, ketch.wire.PredictRequest.endPredictRequest(b));
    }

    /** One Output of a PredictReply: OK with the tensor type of its payload, or ERROR with a code. */
    public record OutputItem(Status status, DType dtype, long[] shape, ErrorCode error, String message) {
        public OutputItem {
            Objects.requireNonNull(status, "status");
            Objects.requireNonNull(error, "error");
        }

        /** An OK output typing a payload. */
        public static OutputItem ok(DType dtype, long[] shape) {
            return new OutputItem(Status.OK, Objects.requireNonNull(dtype, "dtype"), shape, ErrorCode.NONE, "");
        }

        /** An ERROR output (its payload frame is empty). */
        public static OutputItem error(ErrorCode code, String message) {
            return new OutputItem(Status.ERROR, null, null, code, message);
        }
    }

    /**
     * PredictReply: one {@link OutputItem} per input, or {@code outputs} empty with {@code error}
     * and {@code message} for a whole-batch failure.
     */
    public static byte[] predictReply(long batchId, long computeUs, List<OutputItem> outputs, ErrorCode error,
                                      String message) {
        FlatBufferBuilder b = new FlatBufferBuilder(128 + 64 * outputs.size());
        int outputsOff = 0;
        if (!outputs.isEmpty()) {
            int[] offs = new int[outputs.size()];
            for (int i = 0; i < offs.length; i++) {
                offs[i] = output(b, outputs.get(i));
            }
            outputsOff = ketch.wire.PredictReply.createOutputsVector(b, offs);
        }
        int messageOff = string(b, message);
        ketch.wire.PredictReply.startPredictReply(b);
        ketch.wire.PredictReply.addBatchId(b, batchId);
        ketch.wire.PredictReply.addComputeUs(b, computeUs);
        if (outputsOff != 0) {
            ketch.wire.PredictReply.addOutputs(b, outputsOff);
        }
        ketch.wire.PredictReply.addError(b, error.code());
        if (messageOff != 0) {
            ketch.wire.PredictReply.addMessage(b, messageOff);
        }
        return finish(b, MessageType.PREDICT_REPLY, ketch.wire.PredictReply.endPredictReply(b));
    }

    private static int output(FlatBufferBuilder b, OutputItem item) {
        int tensorOff = item.dtype() != null ? tensor(b, item.dtype(), item.shape()) : 0;
        int messageOff = string(b, item.message());
        ketch.wire.Output.startOutput(b);
        ketch.wire.Output.addStatus(b, item.status().code());
        if (tensorOff != 0) {
            ketch.wire.Output.addOutput(b, tensorOff);
        }
        ketch.wire.Output.addError(b, item.error().code());
        if (messageOff != 0) {
            ketch.wire.Output.addMessage(b, messageOff);
        }
        return ketch.wire.Output.endOutput(b);
    }
}
