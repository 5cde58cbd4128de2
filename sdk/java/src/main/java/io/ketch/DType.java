package io.ketch;

/**
 * Element type of a payload; mirrors {@code ketch.wire.DType} code for code.
 *
 * <p>Numeric payloads are little-endian, C (row-major) order, {@code product(shape) *
 * itemSize()} bytes. {@link #BYTES} is opaque, {@link #STRING} is UTF-8 text and {@link #JSON}
 * UTF-8 JSON text; the three text kinds have an empty shape.
 */
public enum DType {
    BOOL(ketch.wire.DType.BOOL, 1),
    INT8(ketch.wire.DType.INT8, 1),
    INT16(ketch.wire.DType.INT16, 2),
    INT32(ketch.wire.DType.INT32, 4),
    INT64(ketch.wire.DType.INT64, 8),
    UINT8(ketch.wire.DType.UINT8, 1),
    UINT16(ketch.wire.DType.UINT16, 2),
    UINT32(ketch.wire.DType.UINT32, 4),
    UINT64(ketch.wire.DType.UINT64, 8),
    FLOAT16(ketch.wire.DType.FLOAT16, 2),
    FLOAT32(ketch.wire.DType.FLOAT32, 4),
    FLOAT64(ketch.wire.DType.FLOAT64, 8),
    BYTES(ketch.wire.DType.BYTES, 0),
    STRING(ketch.wire.DType.STRING, 0),
    JSON(ketch.wire.DType.JSON, 0);

    private static final DType[] BY_CODE = new DType[values().length];

    static {
        for (DType d : values()) {
            BY_CODE[d.code] = d;
        }
    }

    private final int code;
    private final int itemSize;

    DType(int code, int itemSize) {
        this.code = code;
        this.itemSize = itemSize;
    }

    /** The wire code ({@code ketch.wire.DType}). */
    public int code() {
        return code;
    }

    /** Bytes per element of a numeric kind; 0 for the text kinds. */
    public int itemSize() {
        return itemSize;
    }

    /** True for BYTES, STRING and JSON, whose payload has no fixed size and whose shape is empty. */
    public boolean isText() {
        return itemSize == 0;
    }

    /** The dtype of a wire code. */
    public static DType fromCode(int code) {
        if (code < 0 || code >= BY_CODE.length) {
            throw new IllegalArgumentException("unknown dtype code " + code);
        }
        return BY_CODE[code];
    }

    /** The dtype named {@code name}, case-insensitive ("float64", "FLOAT64"). */
    public static DType fromName(String name) {
        try {
            return valueOf(name.toUpperCase(java.util.Locale.ROOT));
        } catch (IllegalArgumentException e) {
            throw new IllegalArgumentException("unknown dtype '" + name + "'", e);
        }
    }
}
