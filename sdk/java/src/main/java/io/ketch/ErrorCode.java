package io.ketch;

/** Error codes shared by every language; mirrors {@code ketch.wire.ErrorCode} (protocol.md section 6). */
public enum ErrorCode {
    NONE,
    BAD_MESSAGE,
    UNSUPPORTED_VERSION,
    UNKNOWN_MESSAGE,
    TOO_LARGE,
    UNKNOWN_APP,
    BAD_INPUT,
    OVERLOADED,
    DEADLINE,
    MODEL_ERROR,
    NO_MODEL,
    UNAUTHORIZED,
    SHUTTING_DOWN,
    INTERNAL,
    NOT_FOUND,
    CONFLICT,
    INVALID;

    private static final ErrorCode[] BY_CODE = values();

    static {
        for (ErrorCode c : BY_CODE) {
            if (!ketch.wire.ErrorCode.name(c.ordinal()).equals(c.name())) {
                throw new AssertionError("io.ketch.ErrorCode out of step with ketch.wire.ErrorCode at " + c);
            }
        }
    }

    /** The wire code. */
    public int code() {
        return ordinal();
    }

    /** The error code of a wire code. */
    public static ErrorCode fromCode(int code) {
        if (code < 0 || code >= BY_CODE.length) {
            throw new IllegalArgumentException("unknown error code " + code);
        }
        return BY_CODE[code];
    }
}
