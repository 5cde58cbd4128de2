package io.ketch;

import java.util.List;

/**
 * A model served by a {@link Container}.
 *
 * <p>{@code predict} gets one batch: the inputs of the batch's items, in order, all of the
 * container's input dtype. It returns exactly one output per input, in the same order. An
 * exception, or a list of the wrong length, fails the whole batch: every item is answered
 * {@code MODEL_ERROR} with the message {@code "ExceptionClass: message"}. A {@code null}
 * element fails only its own item.
 *
 * <p>{@code predict} runs on the container's model thread, one batch at a time, never on the
 * thread that talks to the broker, so it may take as long as it needs.
 */
@FunctionalInterface
public interface Model {
    List<Value> predict(List<Value> inputs) throws Exception;
}
