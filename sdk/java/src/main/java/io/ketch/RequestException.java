package io.ketch;

/**
 * The broker or a model answered a request with an explicit error (Python:
 * {@code ketch.RequestError}); one nested subclass per wire code, as drawn in
 * {@link KetchException}. {@link #forCode} picks the class of a code.
 */
public class RequestException extends KetchException {
    private static final long serialVersionUID = 1L;

    private final long requestId;
    private final long retryAfterMs;

    public RequestException(ErrorCode code, String message, long requestId, long retryAfterMs) {
        super(code, message);
        this.requestId = requestId;
        this.retryAfterMs = retryAfterMs;
    }

    /** The request id the error answers (0 when the broker could not tell). */
    public long requestId() {
        return requestId;
    }

    /** With OVERLOADED: how long to wait before trying again, in milliseconds (else 0). */
    public long retryAfterMs() {
        return retryAfterMs;
    }

    /** The exception of the class that matches {@code code}; unknown codes are INTERNAL. */
    public static RequestException forCode(ErrorCode code, String message, long requestId, long retryAfterMs) {
        return switch (code) {
            case BAD_MESSAGE -> new ProtocolException(ErrorCode.BAD_MESSAGE, message, requestId);
            case UNSUPPORTED_VERSION -> new ProtocolException.UnsupportedVersion(message, requestId);
            case UNKNOWN_MESSAGE -> new ProtocolException.UnknownMessage(message, requestId);
            case TOO_LARGE -> new ProtocolException.TooLarge(message, requestId);
            case UNKNOWN_APP -> new UnknownApp(message, requestId);
            case BAD_INPUT -> new BadInput(message, requestId);
            case OVERLOADED -> new Overloaded(message, requestId, retryAfterMs);
            case DEADLINE -> new DeadlineExceeded(message, requestId);
            case MODEL_ERROR -> new ModelError(message, requestId);
            case NO_MODEL -> new NoModel(message, requestId);
            case UNAUTHORIZED -> new Unauthorized(message, requestId);
            case SHUTTING_DOWN -> new ShuttingDown(message, requestId);
            case INTERNAL -> new InternalError(message, requestId);
            case NOT_FOUND -> new NotFound(message, requestId);
            case CONFLICT -> new Conflict(message, requestId);
            case INVALID -> new Invalid(message, requestId);
            case NONE -> new InternalError("an error with code NONE: " + message, requestId);
        };
    }

    /** The exception for a wire code number (an unknown number is INTERNAL). */
    public static RequestException forCode(int code, String message, long requestId, long retryAfterMs) {
        ErrorCode c;
        try {
            c = ErrorCode.fromCode(code);
        } catch (IllegalArgumentException e) {
            return new InternalError("unknown error code " + code + ": " + message, requestId);
        }
        return forCode(c, message, requestId, retryAfterMs);
    }

    /** UNKNOWN_APP: no such application. */
    public static class UnknownApp extends RequestException {
        private static final long serialVersionUID = 1L;

        public UnknownApp(String message, long requestId) {
            super(ErrorCode.UNKNOWN_APP, message, requestId, 0);
        }
    }

    /** BAD_INPUT: the input does not match the app's dtype or shape. */
    public static class BadInput extends RequestException {
        private static final long serialVersionUID = 1L;

        public BadInput(String message, long requestId) {
            super(ErrorCode.BAD_INPUT, message, requestId, 0);
        }
    }

    /** OVERLOADED: a queue or client limit is full; see retryAfterMs(). */
    public static class Overloaded extends RequestException {
        private static final long serialVersionUID = 1L;

        public Overloaded(String message, long requestId, long retryAfterMs) {
            super(ErrorCode.OVERLOADED, message, requestId, retryAfterMs);
        }
    }

    /** DEADLINE: no answer in time and the app has no default. */
    public static class DeadlineExceeded extends RequestException {
        private static final long serialVersionUID = 1L;

        public DeadlineExceeded(String message, long requestId) {
            super(ErrorCode.DEADLINE, message, requestId, 0);
        }
    }

    /** MODEL_ERROR: the model raised or answered wrongly for this item. */
    public static class ModelError extends RequestException {
        private static final long serialVersionUID = 1L;

        public ModelError(String message, long requestId) {
            super(ErrorCode.MODEL_ERROR, message, requestId, 0);
        }
    }

    /** NO_MODEL: the app links no model. */
    public static class NoModel extends RequestException {
        private static final long serialVersionUID = 1L;

        public NoModel(String message, long requestId) {
            super(ErrorCode.NO_MODEL, message, requestId, 0);
        }
    }

    /** UNAUTHORIZED: not allowed. */
    public static class Unauthorized extends RequestException {
        private static final long serialVersionUID = 1L;

        public Unauthorized(String message, long requestId) {
            super(ErrorCode.UNAUTHORIZED, message, requestId, 0);
        }
    }

    /** SHUTTING_DOWN: the broker or replica is draining. */
    public static class ShuttingDown extends RequestException {
        private static final long serialVersionUID = 1L;

        public ShuttingDown(String message, long requestId) {
            super(ErrorCode.SHUTTING_DOWN, message, requestId, 0);
        }
    }

    /** INTERNAL: a broker bug; the broker keeps running. */
    public static class InternalError extends RequestException {
        private static final long serialVersionUID = 1L;

        public InternalError(String message, long requestId) {
            super(ErrorCode.INTERNAL, message, requestId, 0);
        }
    }

    /** NOT_FOUND: unknown object. */
    public static class NotFound extends RequestException {
        private static final long serialVersionUID = 1L;

        public NotFound(String message, long requestId) {
            super(ErrorCode.NOT_FOUND, message, requestId, 0);
        }
    }

    /** CONFLICT: exists or in use. */
    public static class Conflict extends RequestException {
        private static final long serialVersionUID = 1L;

        public Conflict(String message, long requestId) {
            super(ErrorCode.CONFLICT, message, requestId, 0);
        }
    }

    /** INVALID: bad argument. */
    public static class Invalid extends RequestException {
        private static final long serialVersionUID = 1L;

        public Invalid(String message, long requestId) {
            super(ErrorCode.INVALID, message, requestId, 0);
        }
    }
}
