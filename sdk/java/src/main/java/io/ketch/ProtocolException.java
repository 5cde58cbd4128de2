package io.ketch;

/**
 * A header frame that is not a valid Ketch envelope, or a message that is not valid here
 * (Python: {@code ketch.ProtocolError}); code BAD_MESSAGE unless a subclass says otherwise.
 */
public class ProtocolException extends RequestException {
    private static final long serialVersionUID = 1L;

    public ProtocolException(String message) {
        super(ErrorCode.BAD_MESSAGE, message, 0, 0);
    }

    public ProtocolException(String message, Throwable cause) {
        super(ErrorCode.BAD_MESSAGE, message, 0, 0);
        initCause(cause);
    }

    /** A protocol error of another code: prefer {@link RequestException#forCode}, which picks the subclass. */
    public ProtocolException(ErrorCode code, String message) {
        super(code, message, 0, 0);
    }

    ProtocolException(ErrorCode code, String message, long requestId) {
        super(code, message, requestId, 0);
    }

    /** UNSUPPORTED_VERSION: the peer does not speak this protocol version. */
    public static class UnsupportedVersion extends ProtocolException {
        private static final long serialVersionUID = 1L;

        public UnsupportedVersion(String message, long requestId) {
            super(ErrorCode.UNSUPPORTED_VERSION, message, requestId);
        }
    }

    /** UNKNOWN_MESSAGE: a message type not valid on that socket. */
    public static class UnknownMessage extends ProtocolException {
        private static final long serialVersionUID = 1L;

        public UnknownMessage(String message, long requestId) {
            super(ErrorCode.UNKNOWN_MESSAGE, message, requestId);
        }
    }

    /** TOO_LARGE: a message or payload over the limit. */
    public static class TooLarge extends ProtocolException {
        private static final long serialVersionUID = 1L;

        public TooLarge(String message, long requestId) {
            super(ErrorCode.TOO_LARGE, message, requestId);
        }
    }
}
