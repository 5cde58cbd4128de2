package io.ketch;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertNotEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.ReadOnlyBufferException;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

@Timeout(10)
class ValueTest {
    @Test
    void numericFactoriesWriteLittleEndian() {
        Value v = Value.doubles(new double[] {1.5, -2.0});
        assertEquals(DType.FLOAT64, v.dtype());
        assertArrayEquals(new long[] {2}, v.shape());
        ByteBuffer le = ByteBuffer.wrap(v.toByteArray()).order(ByteOrder.LITTLE_ENDIAN);
        assertEquals(1.5, le.getDouble(0));
        assertArrayEquals(new double[] {1.5, -2.0}, v.asDoubles());

        assertArrayEquals(new float[] {0.25f, 3f}, Value.floats(new float[] {0.25f, 3f}).asFloats());
        assertArrayEquals(new long[] {-5, 1L << 40}, Value.longs(new long[] {-5, 1L << 40}).asLongs());
        assertArrayEquals(new int[] {7, -8}, Value.ints(new int[] {7, -8}).asInts());
        assertArrayEquals(new byte[] {7, 0, 0, 0}, Value.ints(new int[] {7}).toByteArray());
    }

    @Test
    void scalarsAndShapes() {
        Value s = Value.scalar(3.25);
        assertArrayEquals(new long[0], s.shape());
        assertEquals(1, s.size());
        assertEquals(3.25, s.asDoubles()[0]);
        Value m = Value.doubles(new double[] {1, 2, 3, 4, 5, 6}, new long[] {2, 3});
        assertArrayEquals(new long[] {2, 3}, m.shape());
        assertThrows(IllegalArgumentException.class, () -> Value.doubles(new double[] {1, 2}, new long[] {3}));
        assertThrows(IllegalArgumentException.class, () -> Value.of(DType.INT32, new long[] {2}, new byte[7]));
        assertThrows(IllegalArgumentException.class, () -> Value.of(DType.INT32, new long[] {-1}, new byte[0]));
        assertThrows(IllegalArgumentException.class, () -> Value.of(DType.STRING, new long[] {1}, new byte[1]));
    }

    @Test
    void wideningAccessors() {
        assertArrayEquals(new double[] {0.5, 2}, Value.floats(new float[] {0.5f, 2f}).asDoubles());
        assertArrayEquals(new double[] {-1, 3}, Value.ints(new int[] {-1, 3}).asDoubles());
        Value u8 = Value.of(DType.UINT8, new long[] {2}, new byte[] {(byte) 255, 1});
        assertArrayEquals(new long[] {255, 1}, u8.asLongs());
        assertArrayEquals(new int[] {255, 1}, u8.asInts());
        assertThrows(IllegalStateException.class, () -> Value.doubles(new double[] {1}).asLongs());
        assertThrows(IllegalStateException.class, () -> Value.doubles(new double[0]).asLongs());
        assertThrows(IllegalStateException.class, () -> Value.string("x").asDoubles());
        assertThrows(IllegalStateException.class, () -> Value.longs(new long[] {1}).asFloats());
    }

    @Test
    void textKinds() {
        Value s = Value.string("héllo");
        assertEquals(DType.STRING, s.dtype());
        assertEquals("héllo", s.asString());
        assertEquals(6, s.nbytes());
        Value j = Value.json("{\"a\": 1}");
        assertEquals("{\"a\": 1}", j.asJson());
        assertEquals("null", Value.json(null).asJson());
        byte[] raw = {0, (byte) 0xff};
        Value b = Value.bytes(raw);
        raw[0] = 9;
        assertArrayEquals(new byte[] {0, (byte) 0xff}, b.asBytes());
        assertThrows(IllegalStateException.class, () -> b.asString());
    }

    @Test
    void immutableAndComparable() {
        byte[] payload = new byte[8];
        Value v = Value.of(DType.INT64, new long[] {1}, payload);
        payload[0] = 1;
        assertArrayEquals(new long[] {0}, v.asLongs());
        long[] shape = v.shape();
        shape[0] = 5;
        assertArrayEquals(new long[] {1}, v.shape());
        assertThrows(ReadOnlyBufferException.class, () -> v.payload().put(0, (byte) 1));
        assertEquals(Value.longs(new long[] {0}), v);
        assertEquals(Value.longs(new long[] {0}).hashCode(), v.hashCode());
        assertNotEquals(Value.longs(new long[] {1}), v);
        ByteBuffer buf = ByteBuffer.wrap(new byte[] {1, 2, 3});
        buf.position(1);
        assertArrayEquals(new byte[] {2, 3}, Value.of(DType.BYTES, new long[0], buf).asBytes());
        assertEquals(1, buf.position());
    }
}
