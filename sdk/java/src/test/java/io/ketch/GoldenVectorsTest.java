package io.ketch;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.google.gson.JsonObject;
import java.util.EnumSet;
import java.util.List;
import java.util.Set;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.params.ParameterizedTest;
import org.junit.jupiter.params.provider.MethodSource;

/** Every SDK must read every golden vector; the Java encoder's output must read back the same. */
@Timeout(20)
class GoldenVectorsTest {
    static List<String> names() {
        return Golden.names();
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("names")
    void goldenVectorDecodesToItsTwin(String name) {
        JsonObject decoded = Codec.toJson(Golden.bin(name));
        Golden.assertJsonEquals(Golden.header(name), decoded, name);
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("names")
    void javaEncodingOfTheTwinDecodesBackEqual(String name) {
        byte[] encoded = Codec.fromJson(Golden.twin(name));
        Golden.assertJsonEquals(Golden.header(name), Codec.toJson(encoded), name);
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("names")
    void javaEncodingIsByteForByteTheReference(String name) {
        // Not required by the protocol (only the Python encoder must be byte-exact), but the Java
        // codec writes fields in the same order and skips the same defaults, so it holds today.
        assertArrayEquals(Golden.bin(name), Codec.fromJson(Golden.twin(name)), name);
    }

    static List<String> newerNames() {
        return Golden.newerNames();
    }

    @ParameterizedTest(name = "{0}")
    @MethodSource("newerNames")
    void aNewerPeersMessageDecodesToWhatThisSchemaKnows(String name) {
        JsonObject twin = Golden.header(name);
        if (twin.has("error")) {   // a message type this schema does not know
            ProtocolException e = assertThrows(ProtocolException.class, () -> Codec.decode(Golden.bin(name)));
            assertEquals(ErrorCode.valueOf(twin.get("error").getAsString()), e.code(), name);
        } else {
            Golden.assertJsonEquals(twin, Codec.toJson(Golden.bin(name)), name);
        }
    }

    @Test
    void vectorsCoverEveryBodyType() {
        Set<MessageType> seen = EnumSet.noneOf(MessageType.class);
        for (String name : Golden.names()) {
            seen.add(Codec.decode(Golden.bin(name)).type());
        }
        assertEquals(EnumSet.allOf(MessageType.class), seen);
    }

    @Test
    void typedBuildersMatchTheVectors() {
        assertArrayEquals(Golden.bin("hello"), Codec.hello("iris-svm", "2", DType.FLOAT64, new long[] {-1, 4},
                "python/0.1.0", "host-a/iris-svm/0", 3, 64, false, 4242, "sha256:9f86d081884c7d659a2feaa0c55ad015"));
        assertArrayEquals(Golden.bin("hello_defaults"), Codec.hello("echo", "1", DType.BYTES, new long[0],
                "java/0.1.0", "r1", 2, 0, true, 0, ""));
        assertArrayEquals(Golden.bin("welcome"), Codec.welcome(1000, 5000));
        assertArrayEquals(Golden.bin("welcome_v2"), Codec.welcome(250, 2000, 2));
        assertArrayEquals(Golden.bin("hello_v2"), Codec.hello("iris-svm", "2", DType.FLOAT64, new long[] {4},
                "r/0.1.0", "host-b/iris-svm/1", 2, 0, true, 77, new int[] {1, 2}));
        assertArrayEquals(Golden.bin("paused"), Codec.paused(3));
        assertArrayEquals(Golden.bin("ready"), Codec.ready(4));
        assertArrayEquals(Golden.bin("heartbeat"), Codec.heartbeat(true));
        assertArrayEquals(Golden.bin("heartbeat_idle"), Codec.heartbeat(false));
        assertArrayEquals(Golden.bin("goodbye"), Codec.goodbye("drained"));
        assertArrayEquals(Golden.bin("shutdown"), Codec.shutdown("broker stopping"));
        assertArrayEquals(Golden.bin("error"), Codec.error(ErrorCode.UNSUPPORTED_VERSION,
                "protocol version 9 is not supported (speaks 1)", 3, 0));
        assertArrayEquals(Golden.bin("error_overloaded"), Codec.error(ErrorCode.OVERLOADED,
                "too many outstanding queries", 0, 25));
        assertArrayEquals(Golden.bin("predict_request"), Codec.predictRequest(123456789012L, "iris-svm", "2",
                DType.FLOAT64, 1, new long[] {4, 4}, new long[] {19000, 4294967295L}));
        assertArrayEquals(Golden.bin("predict_reply"), Codec.predictReply(123456789012L, 1500, List.of(
                Codec.OutputItem.ok(DType.STRING, new long[0]),
                Codec.OutputItem.error(ErrorCode.MODEL_ERROR, "ValueError: bad row")), ErrorCode.NONE, ""));
        assertArrayEquals(Golden.bin("predict_reply_failed"), Codec.predictReply(5, 20, List.of(),
                ErrorCode.MODEL_ERROR, "RuntimeError: out of memory"));
    }

    @Test
    void predictRequestPayloadsReadAsValues() {
        Codec.Message m = Codec.decode(Golden.bin("predict_request"));
        BatchRunner.Job job = BatchRunner.parse(0, m.body(ketch.wire.PredictRequest.class),
                Golden.payloads("predict_request"), 0);
        assertEquals(null, job.batchError());
        assertEquals(2, job.inputs().size());
        for (Value v : job.inputs()) {
            assertEquals(DType.FLOAT64, v.dtype());
            assertArrayEquals(new long[] {4}, v.shape());
            assertArrayEquals(new double[] {5.1, 3.5, 1.4, 0.2}, v.asDoubles());
        }
    }

    @Test
    void replyPayloadsReadAsValues() {
        List<byte[]> payloads = Golden.payloads("reply_mixed");
        Value ints = Value.of(DType.INT64, new long[] {2, 1}, payloads.get(2));
        assertArrayEquals(new long[] {-5, 1L << 40}, ints.asLongs());
        assertEquals("-1", Value.of(DType.JSON, new long[0], payloads.get(0)).asJson());
        Value floats = Value.of(DType.FLOAT32, new long[] {3}, Golden.payloads("reply_ok").get(0));
        assertArrayEquals(new float[] {0.25f, -1.5f, 3.0f}, floats.asFloats());
        assertEquals("日本", Value.of(DType.STRING, new long[0], Golden.payloads("query_many_strings").get(2)).asString());
    }
}
