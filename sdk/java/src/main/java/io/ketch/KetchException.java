package io.ketch;

/**
 * Base of the SDK's exceptions, one tree for the client and the container, mirroring the
 * Python SDK's {@code ketch._errors}. Each carries the wire {@link ErrorCode} that describes it.
 *
 * <pre>
 * KetchException                          (unchecked)
 *  +-- KetchTimeoutException              no answer within the client's own time limit   (Timeout)
 *  +-- UnavailableException               the client cannot reach the broker (closed)    (Unavailable)
 *  +-- RefusedException                   the broker refused this container's Hello
 *  +-- RequestException                   the broker or a model answered with an error   (RequestError)
 *       +-- ProtocolException             BAD_MESSAGE                                     (ProtocolError)
 *       |    +-- ProtocolException.UnsupportedVersion   UNSUPPORTED_VERSION
 *       |    +-- ProtocolException.UnknownMessage       UNKNOWN_MESSAGE
 *       |    +-- ProtocolException.TooLarge             TOO_LARGE
 *       +-- RequestException.UnknownApp         UNKNOWN_APP
 *       +-- RequestException.BadInput           BAD_INPUT
 *       +-- RequestException.Overloaded         OVERLOADED ({@link RequestException#retryAfterMs()})
 *       +-- RequestException.DeadlineExceeded   DEADLINE
 *       +-- RequestException.ModelError         MODEL_ERROR
 *       +-- RequestException.NoModel            NO_MODEL
 *       +-- RequestException.Unauthorized       UNAUTHORIZED
 *       +-- RequestException.ShuttingDown       SHUTTING_DOWN
 *       +-- RequestException.InternalError      INTERNAL
 *       +-- RequestException.NotFound           NOT_FOUND
 *       +-- RequestException.Conflict           CONFLICT
 *       +-- RequestException.Invalid            INVALID
 * </pre>
 *
 * {@link RequestException#forCode} maps a wire code to its class, so an error crosses the wire
 * as (code, "Class: message") and never as a stack trace. Exceptions thrown by a {@link Model}
 * are not wrapped: they become a whole-batch {@code MODEL_ERROR} with the message
 * {@code "ExceptionClass: message"}.
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
