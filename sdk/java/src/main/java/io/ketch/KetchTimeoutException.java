package io.ketch;

/** No answer arrived within the client's time limit (Python: {@code ketch.Timeout}); code DEADLINE. */
public class KetchTimeoutException extends KetchException {
    private static final long serialVersionUID = 1L;

    public KetchTimeoutException(String message) {
        super(ErrorCode.DEADLINE, message);
    }
}
