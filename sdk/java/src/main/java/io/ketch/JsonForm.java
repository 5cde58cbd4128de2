package io.ketch;

import com.google.flatbuffers.FlatBufferBuilder;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.math.BigInteger;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Set;
import ketch.wire.Feedback;
import ketch.wire.Goodbye;
import ketch.wire.Heartbeat;
import ketch.wire.Hello;
import ketch.wire.Output;
import ketch.wire.PredictReply;
import ketch.wire.PredictRequest;
import ketch.wire.Query;
import ketch.wire.Ready;
import ketch.wire.Reply;
import ketch.wire.ReplyItem;
import ketch.wire.Shutdown;
import ketch.wire.Tensor;
import ketch.wire.Welcome;

/**
 * The canonical JSON form of a message, as in the golden vectors' twins:
 * {@code {"type": "Hello", "version": 1, "body": {...}}} where the body lists every field of
 * the table in schema order with its decoded value: enums by name, absent sub-tables
 * {@code null}, absent strings {@code ""}, absent vectors {@code []}, absent scalars their
 * schema default. Unsigned 64-bit fields are written as unsigned numbers.
 *
 * <p>The reader ({@link #toJson}) and the writer ({@link #fromJson}) each handle one table per
 * method, fields in schema order. The writer takes the same form, with any field left out
 * meaning "absent"; it writes children first, then adds the fields in schema order, skipping
 * empty strings, empty vectors and default scalars, like the Python reference encoder.
 */
final class JsonForm {
    private JsonForm() {}

    // ================================================================ reading

    static JsonObject toJson(Codec.Message m) {
        JsonObject out = new JsonObject();
        out.addProperty("type", m.type().wireName());
        out.addProperty("version", m.version());
        out.add("body", body(m));
        return out;
    }

    private static JsonObject body(Codec.Message m) {
        return switch (m.type()) {
            case QUERY -> query((Query) m.body());
            case REPLY -> reply((Reply) m.body());
            case FEEDBACK -> feedback((Feedback) m.body());
            case HELLO -> hello((Hello) m.body());
            case WELCOME -> welcome((Welcome) m.body());
            case READY -> ready((Ready) m.body());
            case HEARTBEAT -> heartbeat((Heartbeat) m.body());
            case PREDICT_REQUEST -> predictRequest((PredictRequest) m.body());
            case PREDICT_REPLY -> predictReply((PredictReply) m.body());
            case GOODBYE -> reason(((Goodbye) m.body()).reason());
            case SHUTDOWN -> reason(((Shutdown) m.body()).reason());
            case ERROR -> error((ketch.wire.Error) m.body());
        };
    }

    private static JsonElement tensor(Tensor t) {
        if (t == null) {
            return JsonNull.INSTANCE;
        }
        JsonObject o = new JsonObject();
        o.add("dtype", enumName(ketch.wire.DType.names, t.dtype()));
        JsonArray shape = new JsonArray();
        for (int i = 0; i < t.shapeLength(); i++) {
            shape.add(t.shape(i));
        }
        o.add("shape", shape);
        return o;
    }

    private static JsonObject query(Query q) {
        JsonObject o = new JsonObject();
        o.addProperty("app", Codec.str(q.app()));
        o.add("dtype", enumName(ketch.wire.DType.names, q.dtype()));
        JsonArray shape = new JsonArray();
        for (int i = 0; i < q.shapeLength(); i++) {
            shape.add(q.shape(i));
        }
        o.add("shape", shape);
        JsonArray ids = new JsonArray();
        for (int i = 0; i < q.requestIdsLength(); i++) {
            ids.add(u64(q.requestIds(i)));
        }
        o.add("request_ids", ids);
        o.addProperty("timeout_us", q.timeoutUs());
        o.addProperty("priority", q.priority());
        o.addProperty("context", Codec.str(q.context()));
        return o;
    }

    private static JsonObject replyItem(ReplyItem r) {
        JsonObject o = new JsonObject();
        o.add("request_id", u64(r.requestId()));
        o.add("status", enumName(ketch.wire.Status.names, r.status()));
        o.add("output", tensor(r.output()));
        o.add("error", enumName(ketch.wire.ErrorCode.names, r.error()));
        o.addProperty("message", Codec.str(r.message()));
        o.addProperty("model", Codec.str(r.model()));
        o.addProperty("model_version", Codec.str(r.modelVersion()));
        o.addProperty("latency_us", r.latencyUs());
        o.addProperty("confidence", (double) r.confidence());
        JsonArray answered = new JsonArray();
        for (int i = 0; i < r.modelsAnsweredLength(); i++) {
            answered.add(r.modelsAnswered(i));
        }
        o.add("models_answered", answered);
        JsonArray missing = new JsonArray();
        for (int i = 0; i < r.modelsMissingLength(); i++) {
            missing.add(r.modelsMissing(i));
        }
        o.add("models_missing", missing);
        o.addProperty("retry_after_ms", r.retryAfterMs());
        return o;
    }

    private static JsonObject reply(Reply r) {
        JsonObject o = new JsonObject();
        JsonArray items = new JsonArray();
        for (int i = 0; i < r.itemsLength(); i++) {
            items.add(replyItem(r.items(i)));
        }
        o.add("items", items);
        return o;
    }

    private static JsonObject feedback(Feedback f) {
        JsonObject o = new JsonObject();
        o.addProperty("app", Codec.str(f.app()));
        o.add("request_id", u64(f.requestId()));
        o.add("query_id", u64(f.queryId()));
        o.add("input", tensor(f.input()));
        o.add("label", tensor(f.label()));
        o.addProperty("context", Codec.str(f.context()));
        return o;
    }

    private static JsonObject hello(Hello h) {
        JsonObject o = new JsonObject();
        o.addProperty("model", Codec.str(h.model()));
        o.addProperty("model_version", Codec.str(h.modelVersion()));
        o.add("input", tensor(h.input()));
        o.addProperty("sdk", Codec.str(h.sdk()));
        o.addProperty("replica_id", Codec.str(h.replicaId()));
        o.addProperty("credits", h.credits());
        o.addProperty("max_batch", h.maxBatch());
        o.addProperty("deterministic", h.deterministic());
        o.addProperty("pid", h.pid());
        o.addProperty("fingerprint", Codec.str(h.fingerprint()));
        return o;
    }

    private static JsonObject welcome(Welcome w) {
        JsonObject o = new JsonObject();
        o.addProperty("heartbeat_ms", w.heartbeatMs());
        o.addProperty("dead_after_ms", w.deadAfterMs());
        return o;
    }

    private static JsonObject ready(Ready r) {
        JsonObject o = new JsonObject();
        o.addProperty("credits", r.credits());
        return o;
    }

    private static JsonObject heartbeat(Heartbeat h) {
        JsonObject o = new JsonObject();
        o.addProperty("busy", h.busy());
        return o;
    }

    private static JsonObject predictRequest(PredictRequest p) {
        JsonObject o = new JsonObject();
        o.add("batch_id", u64(p.batchId()));
        o.addProperty("model", Codec.str(p.model()));
        o.addProperty("model_version", Codec.str(p.modelVersion()));
        o.add("dtype", enumName(ketch.wire.DType.names, p.dtype()));
        o.addProperty("ndim", p.ndim());
        JsonArray shapes = new JsonArray();
        for (int i = 0; i < p.shapesLength(); i++) {
            shapes.add(p.shapes(i));
        }
        o.add("shapes", shapes);
        JsonArray budgets = new JsonArray();
        for (int i = 0; i < p.budgetsUsLength(); i++) {
            budgets.add(p.budgetsUs(i));
        }
        o.add("budgets_us", budgets);
        return o;
    }

    private static JsonObject output(Output out) {
        JsonObject o = new JsonObject();
        o.add("status", enumName(ketch.wire.Status.names, out.status()));
        o.add("output", tensor(out.output()));
        o.add("error", enumName(ketch.wire.ErrorCode.names, out.error()));
        o.addProperty("message", Codec.str(out.message()));
        return o;
    }

    private static JsonObject predictReply(PredictReply p) {
        JsonObject o = new JsonObject();
        o.add("batch_id", u64(p.batchId()));
        o.addProperty("compute_us", p.computeUs());
        JsonArray outputs = new JsonArray();
        for (int i = 0; i < p.outputsLength(); i++) {
            outputs.add(output(p.outputs(i)));
        }
        o.add("outputs", outputs);
        o.add("error", enumName(ketch.wire.ErrorCode.names, p.error()));
        o.addProperty("message", Codec.str(p.message()));
        return o;
    }

    private static JsonObject reason(String reason) {
        JsonObject o = new JsonObject();
        o.addProperty("reason", Codec.str(reason));
        return o;
    }

    private static JsonObject error(ketch.wire.Error e) {
        JsonObject o = new JsonObject();
        o.add("code", enumName(ketch.wire.ErrorCode.names, e.code()));
        o.addProperty("message", Codec.str(e.message()));
        o.add("request_id", u64(e.requestId()));
        o.addProperty("retry_after_ms", e.retryAfterMs());
        return o;
    }

    /** An enum value by name; a code this schema does not name stays a number. */
    private static JsonPrimitive enumName(String[] names, int code) {
        return code >= 0 && code < names.length ? new JsonPrimitive(names[code]) : new JsonPrimitive(code);
    }

    /** An unsigned 64-bit value held in a long. */
    static JsonPrimitive u64(long v) {
        return v >= 0 ? new JsonPrimitive(v) : new JsonPrimitive(new BigInteger(Long.toUnsignedString(v)));
    }

    // ================================================================ writing

    static byte[] fromJson(JsonObject message) {
        Fields m = new Fields("message", message, "type", "version", "body", "payloads");
        String typeName = m.requiredString("type");
        MessageType type = MessageType.fromWireName(typeName);
        int version = (int) m.unsigned("version", 16, Codec.PROTOCOL_VERSION);
        JsonObject bodyJson = m.object("body");
        JsonObject fields = bodyJson == null ? new JsonObject() : bodyJson;
        Fields f = new Fields(typeName, fields, Schema.FIELDS.get(type.wireName()));
        FlatBufferBuilder b = new FlatBufferBuilder(256);
        int body = switch (type) {
            case QUERY -> query(b, f);
            case REPLY -> reply(b, f);
            case FEEDBACK -> feedback(b, f);
            case HELLO -> hello(b, f);
            case WELCOME -> welcome(b, f);
            case READY -> ready(b, f);
            case HEARTBEAT -> heartbeat(b, f);
            case PREDICT_REQUEST -> predictRequest(b, f);
            case PREDICT_REPLY -> predictReply(b, f);
            case GOODBYE -> goodbye(b, f);
            case SHUTDOWN -> shutdown(b, f);
            case ERROR -> error(b, f);
        };
        return Codec.finish(b, type, body, version);
    }


    private static Fields sub(String table, JsonElement e) {
        if (e == null || e.isJsonNull()) {
            return null;
        }
        if (!e.isJsonObject()) {
            throw new IllegalArgumentException(table + " must be an object, not " + e);
        }
        return new Fields(table, e.getAsJsonObject(), Schema.FIELDS.get(table));
    }

    private static int tensor(FlatBufferBuilder b, Fields t) {
        if (t == null) {
            return 0;
        }
        long[] shape = t.longs("shape");
        int shapeOff = shape.length > 0 ? Tensor.createShapeVector(b, shape) : 0;
        Tensor.startTensor(b);
        Tensor.addDtype(b, t.enumCode("dtype", ketch.wire.DType.names, 8));
        if (shapeOff != 0) {
            Tensor.addShape(b, shapeOff);
        }
        return Tensor.endTensor(b);
    }

    private static int strings(FlatBufferBuilder b, String[] values) {
        if (values.length == 0) {
            return 0;
        }
        int[] offs = new int[values.length];
        for (int i = 0; i < values.length; i++) {
            offs[i] = b.createString(values[i]);
        }
        return ReplyItem.createModelsAnsweredVector(b, offs);
    }

    private static int query(FlatBufferBuilder b, Fields f) {
        int app = Codec.string(b, f.string("app"));
        long[] shapeV = f.longs("shape");
        int shape = shapeV.length > 0 ? Query.createShapeVector(b, shapeV) : 0;
        long[] idsV = f.u64s("request_ids");
        int ids = idsV.length > 0 ? Query.createRequestIdsVector(b, idsV) : 0;
        int context = Codec.string(b, f.string("context"));
        Query.startQuery(b);
        if (app != 0) {
            Query.addApp(b, app);
        }
        Query.addDtype(b, f.enumCode("dtype", ketch.wire.DType.names, 8));
        if (shape != 0) {
            Query.addShape(b, shape);
        }
        if (ids != 0) {
            Query.addRequestIds(b, ids);
        }
        Query.addTimeoutUs(b, f.unsigned("timeout_us", 32, 0));
        Query.addPriority(b, (byte) f.signed("priority", 8, 0));
        if (context != 0) {
            Query.addContext(b, context);
        }
        return Query.endQuery(b);
    }

    private static int replyItem(FlatBufferBuilder b, Fields f) {
        int output = tensor(b, sub("Tensor", f.element("output")));
        int message = Codec.string(b, f.string("message"));
        int model = Codec.string(b, f.string("model"));
        int modelVersion = Codec.string(b, f.string("model_version"));
        int answered = strings(b, f.strings("models_answered"));
        int missing = strings(b, f.strings("models_missing"));
        ReplyItem.startReplyItem(b);
        ReplyItem.addRequestId(b, f.u64("request_id"));
        ReplyItem.addStatus(b, f.enumCode("status", ketch.wire.Status.names, 8));
        if (output != 0) {
            ReplyItem.addOutput(b, output);
        }
        ReplyItem.addError(b, f.enumCode("error", ketch.wire.ErrorCode.names, 16));
        if (message != 0) {
            ReplyItem.addMessage(b, message);
        }
        if (model != 0) {
            ReplyItem.addModel(b, model);
        }
        if (modelVersion != 0) {
            ReplyItem.addModelVersion(b, modelVersion);
        }
        ReplyItem.addLatencyUs(b, f.unsigned("latency_us", 32, 0));
        ReplyItem.addConfidence(b, f.float32("confidence", 1.0f));
        if (answered != 0) {
            ReplyItem.addModelsAnswered(b, answered);
        }
        if (missing != 0) {
            ReplyItem.addModelsMissing(b, missing);
        }
        ReplyItem.addRetryAfterMs(b, f.unsigned("retry_after_ms", 32, 0));
        return ReplyItem.endReplyItem(b);
    }

    private static int reply(FlatBufferBuilder b, Fields f) {
        JsonArray itemsJson = f.array("items");
        int items = 0;
        if (itemsJson.size() > 0) {
            int[] offs = new int[itemsJson.size()];
            for (int i = 0; i < offs.length; i++) {
                offs[i] = replyItem(b, sub("ReplyItem", itemsJson.get(i)));
            }
            items = Reply.createItemsVector(b, offs);
        }
        Reply.startReply(b);
        if (items != 0) {
            Reply.addItems(b, items);
        }
        return Reply.endReply(b);
    }

    private static int feedback(FlatBufferBuilder b, Fields f) {
        int app = Codec.string(b, f.string("app"));
        int input = tensor(b, sub("Tensor", f.element("input")));
        int label = tensor(b, sub("Tensor", f.element("label")));
        int context = Codec.string(b, f.string("context"));
        Feedback.startFeedback(b);
        if (app != 0) {
            Feedback.addApp(b, app);
        }
        Feedback.addRequestId(b, f.u64("request_id"));
        Feedback.addQueryId(b, f.u64("query_id"));
        if (input != 0) {
            Feedback.addInput(b, input);
        }
        if (label != 0) {
            Feedback.addLabel(b, label);
        }
        if (context != 0) {
            Feedback.addContext(b, context);
        }
        return Feedback.endFeedback(b);
    }

    private static int hello(FlatBufferBuilder b, Fields f) {
        int model = Codec.string(b, f.string("model"));
        int modelVersion = Codec.string(b, f.string("model_version"));
        int input = tensor(b, sub("Tensor", f.element("input")));
        int sdk = Codec.string(b, f.string("sdk"));
        int replica = Codec.string(b, f.string("replica_id"));
        int fingerprint = Codec.string(b, f.string("fingerprint"));
        Hello.startHello(b);
        if (model != 0) {
            Hello.addModel(b, model);
        }
        if (modelVersion != 0) {
            Hello.addModelVersion(b, modelVersion);
        }
        if (input != 0) {
            Hello.addInput(b, input);
        }
        if (sdk != 0) {
            Hello.addSdk(b, sdk);
        }
        if (replica != 0) {
            Hello.addReplicaId(b, replica);
        }
        Hello.addCredits(b, f.unsigned("credits", 32, 2));
        Hello.addMaxBatch(b, f.unsigned("max_batch", 32, 0));
        Hello.addDeterministic(b, f.bool("deterministic", true));
        Hello.addPid(b, f.unsigned("pid", 32, 0));
        if (fingerprint != 0) {
            Hello.addFingerprint(b, fingerprint);
        }
        return Hello.endHello(b);
    }

    private static int welcome(FlatBufferBuilder b, Fields f) {
        Welcome.startWelcome(b);
        Welcome.addHeartbeatMs(b, f.unsigned("heartbeat_ms", 32, 0));
        Welcome.addDeadAfterMs(b, f.unsigned("dead_after_ms", 32, 0));
        return Welcome.endWelcome(b);
    }

    private static int ready(FlatBufferBuilder b, Fields f) {
        Ready.startReady(b);
        Ready.addCredits(b, f.unsigned("credits", 32, 0));
        return Ready.endReady(b);
    }

    private static int heartbeat(FlatBufferBuilder b, Fields f) {
        Heartbeat.startHeartbeat(b);
        Heartbeat.addBusy(b, f.bool("busy", false));
        return Heartbeat.endHeartbeat(b);
    }

    private static int predictRequest(FlatBufferBuilder b, Fields f) {
        int model = Codec.string(b, f.string("model"));
        int modelVersion = Codec.string(b, f.string("model_version"));
        long[] shapesV = f.longs("shapes");
        int shapes = shapesV.length > 0 ? PredictRequest.createShapesVector(b, shapesV) : 0;
        long[] budgetsV = f.u32s("budgets_us");
        int budgets = budgetsV.length > 0 ? PredictRequest.createBudgetsUsVector(b, budgetsV) : 0;
        PredictRequest.startPredictRequest(b);
        PredictRequest.addBatchId(b, f.u64("batch_id"));
        if (model != 0) {
            PredictRequest.addModel(b, model);
        }
        if (modelVersion != 0) {
            PredictRequest.addModelVersion(b, modelVersion);
        }
        PredictRequest.addDtype(b, f.enumCode("dtype", ketch.wire.DType.names, 8));
        PredictRequest.addNdim(b, (int) f.unsigned("ndim", 8, 0));
        if (shapes != 0) {
            PredictRequest.addShapes(b, shapes);
        }
        if (budgets != 0) {
            PredictRequest.addBudgetsUs(b, budgets);
        }
        return PredictRequest.endPredictRequest(b);
    }

    private static int output(FlatBufferBuilder b, Fields f) {
        int tensor = tensor(b, sub("Tensor", f.element("output")));
        int message = Codec.string(b, f.string("message"));
        Output.startOutput(b);
        Output.addStatus(b, f.enumCode("status", ketch.wire.Status.names, 8));
        if (tensor != 0) {
            Output.addOutput(b, tensor);
        }
        Output.addError(b, f.enumCode("error", ketch.wire.ErrorCode.names, 16));
        if (message != 0) {
            Output.addMessage(b, message);
        }
        return Output.endOutput(b);
    }

    private static int predictReply(FlatBufferBuilder b, Fields f) {
        JsonArray outputsJson = f.array("outputs");
        int outputs = 0;
        if (outputsJson.size() > 0) {
            int[] offs = new int[outputsJson.size()];
            for (int i = 0; i < offs.length; i++) {
                offs[i] = output(b, sub("Output", outputsJson.get(i)));
            }
            outputs = PredictReply.createOutputsVector(b, offs);
        }
        int message = Codec.string(b, f.string("message"));
        PredictReply.startPredictReply(b);
        PredictReply.addBatchId(b, f.u64("batch_id"));
        PredictReply.addComputeUs(b, f.unsigned("compute_us", 32, 0));
        if (outputs != 0) {
            PredictReply.addOutputs(b, outputs);
        }
        PredictReply.addError(b, f.enumCode("error", ketch.wire.ErrorCode.names, 16));
        if (message != 0) {
            PredictReply.addMessage(b, message);
        }
        return PredictReply.endPredictReply(b);
    }

    private static int goodbye(FlatBufferBuilder b, Fields f) {
        int reason = Codec.string(b, f.string("reason"));
        Goodbye.startGoodbye(b);
        if (reason != 0) {
            Goodbye.addReason(b, reason);
        }
        return Goodbye.endGoodbye(b);
    }

    private static int shutdown(FlatBufferBuilder b, Fields f) {
        int reason = Codec.string(b, f.string("reason"));
        Shutdown.startShutdown(b);
        if (reason != 0) {
            Shutdown.addReason(b, reason);
        }
        return Shutdown.endShutdown(b);
    }

    private static int error(FlatBufferBuilder b, Fields f) {
        int message = Codec.string(b, f.string("message"));
        ketch.wire.Error.startError(b);
        ketch.wire.Error.addCode(b, f.enumCode("code", ketch.wire.ErrorCode.names, 16));
        if (message != 0) {
            ketch.wire.Error.addMessage(b, message);
        }
        ketch.wire.Error.addRequestId(b, f.u64("request_id"));
        ketch.wire.Error.addRetryAfterMs(b, f.unsigned("retry_after_ms", 32, 0));
        return ketch.wire.Error.endError(b);
    }

    /** Typed, range-checked reads of one JSON object; absent and null fields take the default. */
    private static final class Fields {
        private final String table;
        private final JsonObject o;

        Fields(String table, JsonObject o, String... known) {
            this.table = table;
            this.o = o;
            Set<String> unknown = new HashSet<>(o.keySet());
            unknown.removeAll(Arrays.asList(known));
            if (!unknown.isEmpty()) {
                throw new IllegalArgumentException(table + " has no field(s) " + unknown);
            }
        }

        JsonElement element(String name) {
            JsonElement e = o.get(name);
            return e == null || e.isJsonNull() ? null : e;
        }

        private IllegalArgumentException bad(String name, Object value, String why) {
            return new IllegalArgumentException(table + "." + name + " = " + value + ": " + why);
        }

        private BigInteger integer(String name, JsonElement e) {
            try {
                return e.getAsJsonPrimitive().getAsBigDecimal().toBigIntegerExact();
            } catch (RuntimeException ex) {
                throw bad(name, e, "not an integer");
            }
        }

        String requiredString(String name) {
            JsonElement e = element(name);
            if (e == null) {
                throw bad(name, null, "missing");
            }
            return e.getAsString();
        }

        String string(String name) {
            JsonElement e = element(name);
            if (e == null) {
                return null;
            }
            if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
                throw bad(name, e, "not a string");
            }
            return e.getAsString();
        }

        JsonObject object(String name) {
            JsonElement e = element(name);
            if (e == null) {
                return null;
            }
            if (!e.isJsonObject()) {
                throw bad(name, e, "not an object");
            }
            return e.getAsJsonObject();
        }

        JsonArray array(String name) {
            JsonElement e = element(name);
            if (e == null) {
                return new JsonArray();
            }
            if (!e.isJsonArray()) {
                throw bad(name, e, "not a list");
            }
            return e.getAsJsonArray();
        }

        long unsigned(String name, int bits, long dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            BigInteger v = integer(name, e);
            if (v.signum() < 0 || v.bitLength() > bits) {
                throw bad(name, e, "out of range for u" + bits);
            }
            return v.longValue();
        }

        long signed(String name, int bits, long dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            BigInteger v = integer(name, e);
            if (v.bitLength() > bits - 1) {
                throw bad(name, e, "out of range for i" + bits);
            }
            return v.longValue();
        }

        long u64(String name) {
            return unsigned(name, 64, 0);
        }

        boolean bool(String name, boolean dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isBoolean()) {
                throw bad(name, e, "not a boolean");
            }
            return e.getAsBoolean();
        }

        float float32(String name, float dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            try {
                return (float) e.getAsDouble();
            } catch (RuntimeException ex) {
                throw bad(name, e, "not a number");
            }
        }

        /** An enum given by name, or by its number. */
        int enumCode(String name, String[] names, int bits) {
            JsonElement e = element(name);
            if (e == null) {
                return 0;
            }
            if (e.isJsonPrimitive() && e.getAsJsonPrimitive().isString()) {
                int i = Arrays.asList(names).indexOf(e.getAsString());
                if (i < 0) {
                    throw bad(name, e, "not one of " + Arrays.toString(names));
                }
                return i;
            }
            return (int) unsigned(name, bits, 0);
        }

        private long[] integers(String name, int bits, boolean signed) {
            JsonArray a = array(name);
            long[] out = new long[a.size()];
            for (int i = 0; i < out.length; i++) {
                BigInteger v = integer(name, a.get(i));
                boolean ok = signed ? v.bitLength() <= bits - 1 : v.signum() >= 0 && v.bitLength() <= bits;
                if (!ok) {
                    throw bad(name + "[" + i + "]", v, "out of range");
                }
                out[i] = v.longValue();
            }
            return out;
        }

        long[] longs(String name) {
            return integers(name, 64, true);
        }

        long[] u64s(String name) {
            return integers(name, 64, false);
        }

        long[] u32s(String name) {
            return integers(name, 32, false);
        }

        String[] strings(String name) {
            JsonArray a = array(name);
            String[] out = new String[a.size()];
            for (int i = 0; i < out.length; i++) {
                JsonElement e = a.get(i);
                if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
                    throw bad(name + "[" + i + "]", e, "not a string");
                }
                out[i] = e.getAsString();
            }
            return out;
        }
    }
}
