package io.ketch;

/**
 * The broker refused the container: an {@code Error} answered its Hello, or the broker does
 * not speak this protocol version. {@link Container#run()} throws it; retrying with the same
 * settings would be refused again.
 */
public class RefusedException extends KetchException {
    private static final long serialVersionUID = 1L;

    public RefusedException(ErrorCode code, String message) {
        super(code, message);
    }
}
