package io.ketch;

/** A header frame that is not a valid Ketch envelope, or a message that is not valid here. */
public class ProtocolException extends KetchException {
    private static final long serialVersionUID = 1L;

    public ProtocolException(String message) {
        super(ErrorCode.BAD_MESSAGE, message);
    }

    public ProtocolException(ErrorCode code, String message) {
        super(code, message);
    }

    public ProtocolException(String message, Throwable cause) {
        super(ErrorCode.BAD_MESSAGE, message, cause);
    }
}
