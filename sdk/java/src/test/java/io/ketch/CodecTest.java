package io.ketch;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNull;
import static org.junit.jupiter.api.Assertions.assertThrows;

import com.google.flatbuffers.FlatBufferBuilder;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.math.BigInteger;
import java.nio.charset.StandardCharsets;
import ketch.wire.Envelope;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

@Timeout(10)
class CodecTest {
    private static JsonObject parse(String json) {
        return JsonParser.parseString(json).getAsJsonObject();
    }

    @Test
    void unsignedSixtyFourBitValuesRoundTrip() {
        String max = "18446744073709551615";
        JsonObject query = parse("{\"type\": \"Query\", \"body\": {\"app\": \"a\", \"request_ids\": [" + max
                + ", 9223372036854775808, 1]}}");
        JsonObject back = Codec.toJson(Codec.fromJson(query));
        var ids = back.getAsJsonObject("body").getAsJsonArray("request_ids");
        assertEquals(new BigInteger(max), ids.get(0).getAsBigInteger());
        assertEquals(BigInteger.ONE.shiftLeft(63), ids.get(1).getAsBigInteger());
        assertEquals(1, ids.get(2).getAsLong());
        ketch.wire.Query q = Codec.decode(Codec.fromJson(query)).body(ketch.wire.Query.class);
        assertEquals(-1L, q.requestIds(0));
    }

    @Test
    void absentFieldsDecodeAsDefaults() {
        JsonObject hello = Codec.toJson(Codec.fromJson(parse("{\"type\": \"Hello\"}")));
        JsonObject body = hello.getAsJsonObject("body");
        assertEquals(1, hello.get("version").getAsInt());
        assertEquals("", body.get("model").getAsString());
        assertEquals(true, body.get("input").isJsonNull());
        assertEquals(2, body.get("credits").getAsInt());
        assertEquals(true, body.get("deterministic").getAsBoolean());
        JsonObject item = Codec.toJson(Codec.fromJson(parse("{\"type\": \"Reply\", \"body\": {\"items\": [{}]}}")))
                .getAsJsonObject("body").getAsJsonArray("items").get(0).getAsJsonObject();
        assertEquals(1.0, item.get("confidence").getAsDouble());
        assertEquals("OK", item.get("status").getAsString());
        assertEquals(0, item.getAsJsonArray("models_answered").size());
    }

    @Test
    void enumsMayBeGivenAsNumbersAndUnknownCodesStayNumbers() {
        JsonObject err = Codec.toJson(Codec.fromJson(parse("{\"type\": \"Error\", \"body\": {\"code\": 9}}")));
        assertEquals("MODEL_ERROR", err.getAsJsonObject("body").get("code").getAsString());
        JsonObject odd = Codec.toJson(Codec.fromJson(parse("{\"type\": \"Error\", \"body\": {\"code\": 300}}")));
        assertEquals(300, odd.getAsJsonObject("body").get("code").getAsInt());
    }

    @Test
    void otherVersionsAreKept() {
        byte[] frame = Codec.fromJson(parse("{\"type\": \"Heartbeat\", \"version\": 9, \"body\": {\"busy\": true}}"));
        assertEquals(9, Codec.decode(frame).version());
    }

    @Test
    void badJsonIsRefused() {
        assertThrows(IllegalArgumentException.class,
                () -> Codec.fromJson(parse("{\"type\": \"Ready\", \"body\": {\"credit\": 1}}")));
        assertThrows(IllegalArgumentException.class,
                () -> Codec.fromJson(parse("{\"type\": \"Ready\", \"body\": {\"credits\": -1}}")));
        assertThrows(IllegalArgumentException.class,
                () -> Codec.fromJson(parse("{\"type\": \"Ready\", \"body\": {\"credits\": 4294967296}}")));
        assertThrows(IllegalArgumentException.class,
                () -> Codec.fromJson(parse("{\"type\": \"Query\", \"body\": {\"dtype\": \"FLOAT128\"}}")));
        assertThrows(IllegalArgumentException.class,
                () -> Codec.fromJson(parse("{\"type\": \"Query\", \"body\": {\"priority\": 128}}")));
        assertThrows(IllegalArgumentException.class, () -> Codec.fromJson(parse("{\"type\": \"Nope\"}")));
    }

    @Test
    void decodeRefusesWhatIsNotAnEnvelope() {
        assertThrows(ProtocolException.class, () -> Codec.decode(new byte[0]));
        assertThrows(ProtocolException.class, () -> Codec.decode("not a flatbuffer at all".getBytes(StandardCharsets.UTF_8)));
        byte[] good = Codec.ready(1);
        byte[] wrongId = good.clone();
        wrongId[4] = 'X';
        assertThrows(ProtocolException.class, () -> Codec.decode(wrongId));

        FlatBufferBuilder b = new FlatBufferBuilder(64);
        ketch.wire.Ready.startReady(b);
        int body = ketch.wire.Ready.endReady(b);
        Envelope.startEnvelope(b);
        Envelope.addVersion(b, 1);
        Envelope.addBodyType(b, (byte) 99);
        Envelope.addBody(b, body);
        Envelope.finishEnvelopeBuffer(b, Envelope.endEnvelope(b));
        ProtocolException e = assertThrows(ProtocolException.class, () -> Codec.decode(b.sizedByteArray()));
        assertEquals(ErrorCode.UNKNOWN_MESSAGE, e.code());
    }

    @Test
    void bodyOfTheWrongClassIsAProtocolError() {
        Codec.Message m = Codec.decode(Codec.ready(3));
        assertEquals(3, m.body(ketch.wire.Ready.class).credits());
        assertThrows(ProtocolException.class, () -> m.body(ketch.wire.Hello.class));
    }

    @Test
    void predictReplyOutputsCarryTheirTensor() {
        byte[] frame = Codec.predictReply(7, 12, java.util.List.of(Codec.OutputItem.ok(DType.FLOAT64, new long[] {2, 3})),
                ErrorCode.NONE, null);
        ketch.wire.PredictReply r = Codec.decode(frame).body(ketch.wire.PredictReply.class);
        assertEquals(1, r.outputsLength());
        assertEquals(3, r.outputs(0).output().shape(1));
        assertNull(r.message());
    }

    @Test
    void enumsMirrorTheGeneratedConstants() {
        for (DType d : DType.values()) {
            assertEquals(d.name(), ketch.wire.DType.name(d.code()));
        }
        for (ErrorCode c : ErrorCode.values()) {
            assertEquals(c.name(), ketch.wire.ErrorCode.name(c.code()));
        }
        for (Status s : Status.values()) {
            assertEquals(s.name(), ketch.wire.Status.name(s.code()));
        }
        assertEquals(ketch.wire.ErrorCode.names.length, ErrorCode.values().length);
        assertEquals(ketch.wire.DType.names.length, DType.values().length);
        assertEquals(ketch.wire.Body.names.length - 1, MessageType.values().length);
    }
}
