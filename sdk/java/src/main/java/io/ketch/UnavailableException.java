package io.ketch;

/**
 * The broker cannot be reached through this client: it was closed, or its I/O thread
 * failed (Python: {@code ketch.Unavailable}); code SHUTTING_DOWN.
 */
public class UnavailableException extends KetchException {
    private static final long serialVersionUID = 1L;

    public UnavailableException(String message) {
        super(ErrorCode.SHUTTING_DOWN, message);
    }

    public UnavailableException(String message, Throwable cause) {
        super(ErrorCode.SHUTTING_DOWN, message, cause);
    }
}
