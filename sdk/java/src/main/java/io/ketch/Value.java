package io.ketch;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.Objects;

/**
 * One immutable input or output: a dtype, a shape and the raw payload bytes as they travel on
 * the wire (little-endian, C order for numeric kinds; UTF-8 for STRING and JSON).
 *
 * <pre>{@code
 * Value v = Value.doubles(new double[] {5.1, 3.5, 1.4, 0.2});   // FLOAT64, shape [4]
 * double[] xs = v.asDoubles();
 * Value s = Value.scalar(10.2);                                  // FLOAT64, shape []
 * Value t = Value.string("setosa");                              // STRING, shape []
 * Value j = Value.json("{\"label\": 2}");                        // JSON, shape []
 * }</pre>
 *
 * The factories copy their arguments and check that the payload size matches the shape;
 * accessors return copies or read-only views, so a Value can be shared between threads.
 */
public final class Value {
    private static final long[] SCALAR = new long[0];

    private final DType dtype;
    private final long[] shape;
    private final byte[] payload;

    private Value(DType dtype, long[] shape, byte[] payload) {
        this.dtype = dtype;
        this.shape = shape;
        this.payload = payload;
    }

    // ------------------------------------------------------------ factories

    /** A value from raw payload bytes (copied); the size must match dtype and shape. */
    public static Value of(DType dtype, long[] shape, byte[] payload) {
        Objects.requireNonNull(payload, "payload");
        return checked(dtype, shape.clone(), payload.clone());
    }

    /** A value from the remaining bytes of {@code payload} (copied; its position is unchanged). */
    public static Value of(DType dtype, long[] shape, ByteBuffer payload) {
        ByteBuffer dup = payload.duplicate();
        byte[] bytes = new byte[dup.remaining()];
        dup.get(bytes);
        return checked(dtype, shape.clone(), bytes);
    }

    /** Wraps wire bytes without copying; the caller gives up {@code payload}. */
    static Value wrap(DType dtype, long[] shape, byte[] payload) {
        if (dtype == DType.STRING || dtype == DType.JSON) {  // text is UTF-8, never read with replacements
            try {
                StandardCharsets.UTF_8.newDecoder()
                        .onMalformedInput(java.nio.charset.CodingErrorAction.REPORT)
                        .onUnmappableCharacter(java.nio.charset.CodingErrorAction.REPORT)
                        .decode(ByteBuffer.wrap(payload));
            } catch (java.nio.charset.CharacterCodingException e) {
                throw new IllegalArgumentException(dtype + " payload is not valid UTF-8", e);
            }
        }
        return checked(dtype, shape, payload);
    }

    /** FLOAT64 vector, shape {@code [n]}. */
    public static Value doubles(double[] values) {
        return doubles(values, new long[] {values.length});
    }

    /** FLOAT64 tensor of the given shape (C order). */
    public static Value doubles(double[] values, long[] shape) {
        ByteBuffer buf = allocate(values.length * 8L);
        buf.asDoubleBuffer().put(values);
        return checked(DType.FLOAT64, shape.clone(), buf.array());
    }

    /** FLOAT64 scalar, shape {@code []}. */
    public static Value scalar(double value) {
        return doubles(new double[] {value}, SCALAR);
    }

    /** FLOAT32 vector, shape {@code [n]}. */
    public static Value floats(float[] values) {
        return floats(values, new long[] {values.length});
    }

    /** FLOAT32 tensor of the given shape (C order). */
    public static Value floats(float[] values, long[] shape) {
        ByteBuffer buf = allocate(values.length * 4L);
        buf.asFloatBuffer().put(values);
        return checked(DType.FLOAT32, shape.clone(), buf.array());
    }

    /** INT64 vector, shape {@code [n]}. */
    public static Value longs(long[] values) {
        return longs(values, new long[] {values.length});
    }

    /** INT64 tensor of the given shape (C order). */
    public static Value longs(long[] values, long[] shape) {
        ByteBuffer buf = allocate(values.length * 8L);
        buf.asLongBuffer().put(values);
        return checked(DType.INT64, shape.clone(), buf.array());
    }

    /** INT32 vector, shape {@code [n]}. */
    public static Value ints(int[] values) {
        return ints(values, new long[] {values.length});
    }

    /** INT32 tensor of the given shape (C order). */
    public static Value ints(int[] values, long[] shape) {
        ByteBuffer buf = allocate(values.length * 4L);
        buf.asIntBuffer().put(values);
        return checked(DType.INT32, shape.clone(), buf.array());
    }

    /** STRING: UTF-8 text. */
    public static Value string(String text) {
        return new Value(DType.STRING, SCALAR, text.getBytes(StandardCharsets.UTF_8));
    }

    /** BYTES: opaque bytes (copied). */
    public static Value bytes(byte[] data) {
        return new Value(DType.BYTES, SCALAR, data.clone());
    }

    /** JSON: UTF-8 JSON text, not checked here ({@code null} or "" is the JSON null). */
    public static Value json(String text) {
        byte[] bytes = text == null ? new byte[0] : text.getBytes(StandardCharsets.UTF_8);
        return new Value(DType.JSON, SCALAR, bytes);
    }

    private static ByteBuffer allocate(long n) {
        if (n > Integer.MAX_VALUE) {
            throw new IllegalArgumentException("payload of " + n + " bytes is too large");
        }
        return ByteBuffer.allocate((int) n).order(ByteOrder.LITTLE_ENDIAN);
    }

    private static Value checked(DType dtype, long[] shape, byte[] payload) {
        Objects.requireNonNull(dtype, "dtype");
        Objects.requireNonNull(shape, "shape");
        if (dtype.isText()) {
            if (shape.length != 0) {
                throw new IllegalArgumentException(dtype + " values have an empty shape, not " + Arrays.toString(shape));
            }
        } else {
            long expected = elementCount(shape) * dtype.itemSize();
            if (expected != payload.length) {
                throw new IllegalArgumentException(dtype + " of shape " + Arrays.toString(shape) + " needs "
                        + expected + " bytes, payload has " + payload.length);
            }
        }
        return new Value(dtype, shape.length == 0 ? SCALAR : shape, payload);
    }

    private static long elementCount(long[] shape) {
        long n = 1;
        for (long d : shape) {
            if (d < 0) {
                throw new IllegalArgumentException("negative dimension in shape " + Arrays.toString(shape));
            }
            n = Math.multiplyExact(n, d);
        }
        return n;
    }

    // ------------------------------------------------------------ accessors

    public DType dtype() {
        return dtype;
    }

    /** The shape (a copy); empty for a scalar or a text kind. */
    public long[] shape() {
        return shape.clone();
    }

    /** Number of elements of a numeric value (1 for a scalar); -1 for a text kind. */
    public long size() {
        return dtype.isText() ? -1 : payload.length / dtype.itemSize();
    }

    /** Payload size in bytes. */
    public int nbytes() {
        return payload.length;
    }

    /** A read-only little-endian view of the payload. */
    public ByteBuffer payload() {
        return ByteBuffer.wrap(payload).asReadOnlyBuffer().order(ByteOrder.LITTLE_ENDIAN);
    }

    /** The payload bytes (a copy), whatever the dtype. */
    public byte[] toByteArray() {
        return payload.clone();
    }

    /** The payload for sending, not copied: callers must not change it. */
    byte[] payloadArray() {
        return payload;
    }

    /** The elements as doubles: FLOAT64 as is, FLOAT32 and the integer kinds widened. */
    public double[] asDoubles() {
        ByteBuffer b = payload();
        double[] out = new double[(int) Math.max(size(), 0)];
        switch (dtype) {
            case FLOAT64 -> b.asDoubleBuffer().get(out);
            case FLOAT32 -> {
                for (int i = 0; i < out.length; i++) {
                    out[i] = b.getFloat(i * 4);
                }
            }
            case BOOL, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32 -> {
                long[] ls = asLongs();
                for (int i = 0; i < out.length; i++) {
                    out[i] = ls[i];
                }
            }
            default -> throw wrongKind("asDoubles");
        }
        return out;
    }

    /** The elements of a FLOAT32 value. */
    public float[] asFloats() {
        if (dtype != DType.FLOAT32) {
            throw wrongKind("asFloats");
        }
        float[] out = new float[(int) size()];
        payload().asFloatBuffer().get(out);
        return out;
    }

    /**
     * The elements as longs: INT64 and UINT64 as stored (UINT64 as unsigned bits), the narrower
     * integer kinds and BOOL widened (unsigned kinds zero-extended).
     */
    public long[] asLongs() {
        if (dtype.isText() || dtype == DType.FLOAT16 || dtype == DType.FLOAT32 || dtype == DType.FLOAT64) {
            throw wrongKind("asLongs");
        }
        ByteBuffer b = payload();
        long[] out = new long[(int) size()];
        for (int i = 0; i < out.length; i++) {
            out[i] = switch (dtype) {
                case BOOL, UINT8 -> b.get(i) & 0xFFL;
                case INT8 -> b.get(i);
                case INT16 -> b.getShort(i * 2);
                case UINT16 -> b.getShort(i * 2) & 0xFFFFL;
                case INT32 -> b.getInt(i * 4);
                case UINT32 -> b.getInt(i * 4) & 0xFFFFFFFFL;
                default -> b.getLong(i * 8);
            };
        }
        return out;
    }

    /** The elements of an INT32 value, or of a narrower integer kind widened. */
    public int[] asInts() {
        switch (dtype) {
            case BOOL, INT8, INT16, INT32, UINT8, UINT16 -> {
                long[] ls = asLongs();
                int[] out = new int[ls.length];
                for (int i = 0; i < ls.length; i++) {
                    out[i] = (int) ls[i];
                }
                return out;
            }
            default -> throw wrongKind("asInts");
        }
    }

    /** The text of a STRING or JSON value (UTF-8). */
    public String asString() {
        if (dtype != DType.STRING && dtype != DType.JSON) {
            throw wrongKind("asString");
        }
        return new String(payload, StandardCharsets.UTF_8);
    }

    /** The JSON text of a JSON value; "null" for an empty payload. */
    public String asJson() {
        if (dtype != DType.JSON) {
            throw wrongKind("asJson");
        }
        return payload.length == 0 ? "null" : new String(payload, StandardCharsets.UTF_8);
    }

    /** The payload of a BYTES value, or of any other kind, as bytes (a copy). */
    public byte[] asBytes() {
        return payload.clone();
    }

    private IllegalStateException wrongKind(String what) {
        return new IllegalStateException(what + "() does not apply to a " + dtype + " value");
    }

    // ------------------------------------------------------------ identity

    @Override
    public boolean equals(Object o) {
        return o instanceof Value v && v.dtype == dtype && Arrays.equals(v.shape, shape) && Arrays.equals(v.payload, payload);
    }

    @Override
    public int hashCode() {
        return 31 * (31 * dtype.hashCode() + Arrays.hashCode(shape)) + Arrays.hashCode(payload);
    }

    @Override
    public String toString() {
        String body = switch (dtype) {
            case STRING, JSON -> abbreviate(new String(payload, StandardCharsets.UTF_8));
            case FLOAT64, FLOAT32 -> size() <= 8 ? Arrays.toString(asDoubles()) : "...";
            case FLOAT16, BYTES -> payload.length + " bytes";
            default -> size() <= 8 ? Arrays.toString(asLongs()) : "...";
        };
        return "Value{" + dtype + " " + Arrays.toString(shape) + " " + body + "}";
    }

    private static String abbreviate(String s) {
        return s.length() <= 40 ? '"' + s + '"' : '"' + s.substring(0, 37) + "...\"";
    }
}
