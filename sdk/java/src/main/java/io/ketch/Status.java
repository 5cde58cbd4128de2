package io.ketch;

/** What a reply item or a PredictReply output carries; mirrors {@code ketch.wire.Status}. */
public enum Status {
    /** A prediction; the payload is the output. */
    OK,
    /** The app's default output; the message says why. */
    DEFAULT,
    /** An explicit error; code and message say what; the payload is empty. */
    ERROR;

    private static final Status[] BY_CODE = values();

    /** The wire code. */
    public int code() {
        return ordinal();
    }

    /** The status of a wire code. */
    public static Status fromCode(int code) {
        if (code < 0 || code >= BY_CODE.length) {
            throw new IllegalArgumentException("unknown status code " + code);
        }
        return BY_CODE[code];
    }
}
