package io.ketch;

/**
 * Base of the SDK's exceptions. Each carries the wire {@link ErrorCode} that describes it.
 *
 * <pre>
 * KetchException                  (unchecked)
 *  +-- ProtocolException          a header frame that is not a valid Ketch message
 *  |                              (BAD_MESSAGE, UNKNOWN_MESSAGE)
 *  +-- RefusedException           the broker refused this container's Hello
 *                                 (UNSUPPORTED_VERSION, or the code the broker sent)
 * </pre>
 *
 * Exceptions thrown by a {@link Model} are not wrapped: they become a whole-batch
 * {@code MODEL_ERROR} with the message {@code "ExceptionClass: message"}.
 */
public class KetchException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    private final ErrorCode code;

    public KetchException(ErrorCode code, String message) {
        super(message);
        this.code = code;
    }

    public KetchException(ErrorCode code, String message, Throwable cause) {
        super(message, cause);
        this.code = code;
    }

    /** The wire code for this error. */
    public ErrorCode code() {
        return code;
    }
}
