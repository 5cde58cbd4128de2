package io.ketch;

import java.util.ArrayList;
import java.util.Arrays;
import java.util.List;
import java.util.function.LongSupplier;
import ketch.wire.PredictRequest;

/**
 * Turns one PredictRequest into one PredictReply by calling the model: the batch semantics of
 * protocol.md section 5, free of sockets and threads so it can be tested alone.
 *
 * <ul>
 *   <li>An item whose payload does not match its dtype and shape is answered ERROR/BAD_INPUT,
 *       an item whose budget ran out before the model starts ERROR/DEADLINE (when enabled);
 *       the model gets the other items.
 *   <li>The model raising, or returning a list of the wrong length, fails the whole batch:
 *       no outputs, {@code MODEL_ERROR}, {@code "ExceptionClass: message"}, no payloads.
 *   <li>A null output fails only its own item (ERROR/MODEL_ERROR).
 *   <li>A request whose frames do not match its own header (payload count, shapes) is a
 *       whole-batch {@code BAD_MESSAGE}.
 * </ul>
 */
final class BatchRunner {
    /** One batch as received: inputs are null where {@code itemErrors} says why. */
    record Job(long seq, long batchId, long arrivalNs, List<Value> inputs, String[] itemErrors, long[] budgetsUs,
               String batchError) {}

    /** The reply frames of a job: header then one payload per output. */
    record Result(long seq, long batchId, byte[] header, List<byte[]> payloads, boolean failed) {}

    private static final byte[] EMPTY = new byte[0];

    private final Model model;
    private final boolean skipExpired;
    private final LongSupplier clock;

    BatchRunner(Model model, boolean skipExpired, LongSupplier nanoClock) {
        this.model = model;
        this.skipExpired = skipExpired;
        this.clock = nanoClock;
    }

    /** Reads a PredictRequest and its payload frames into a Job; never throws for bad content. */
    static Job parse(long seq, PredictRequest req, List<byte[]> payloads, long arrivalNs) {
        long batchId = req.batchId();
        int n = req.budgetsUsLength();
        long[] budgets = new long[n];
        for (int i = 0; i < n; i++) {
            budgets[i] = req.budgetsUs(i);
        }
        int ndim = req.ndim();
        if (payloads.size() != n) {
            return failed(seq, batchId, arrivalNs, budgets,
                    "PredictRequest has " + payloads.size() + " payload frames for " + n + " items");
        }
        if (req.shapesLength() != ndim * n) {
            return failed(seq, batchId, arrivalNs, budgets,
                    "PredictRequest has " + req.shapesLength() + " shape entries for " + n + " items of ndim " + ndim);
        }
        DType dtype;
        try {
            dtype = DType.fromCode(req.dtype());
        } catch (IllegalArgumentException e) {
            return failed(seq, batchId, arrivalNs, budgets, e.getMessage());
        }
        List<Value> inputs = new ArrayList<>(n);
        String[] errors = new String[n];
        for (int i = 0; i < n; i++) {
            long[] shape = new long[ndim];
            for (int d = 0; d < ndim; d++) {
                shape[d] = req.shapes(i * ndim + d);
            }
            try {
                inputs.add(Value.wrap(dtype, shape, payloads.get(i)));
            } catch (IllegalArgumentException e) {
                inputs.add(null);
                errors[i] = e.getMessage();
            }
        }
        return new Job(seq, batchId, arrivalNs, inputs, errors, budgets, null);
    }

    private static Job failed(long seq, long batchId, long arrivalNs, long[] budgets, String why) {
        return new Job(seq, batchId, arrivalNs, List.of(), new String[0], budgets, why);
    }

    /** Runs the model on a job and encodes the reply. */
    Result run(Job job) {
        if (job.batchError() != null) {
            byte[] header = Codec.predictReply(job.batchId(), 0, List.of(), ErrorCode.BAD_MESSAGE, job.batchError());
            return new Result(job.seq(), job.batchId(), header, List.of(), true);
        }
        int n = job.inputs().size();
        Codec.OutputItem[] outputs = new Codec.OutputItem[n];
        byte[][] payloads = new byte[n][];
        long elapsedUs = (clock.getAsLong() - job.arrivalNs()) / 1000;
        List<Value> todo = new ArrayList<>(n);
        int[] index = new int[n];
        for (int i = 0; i < n; i++) {
            if (job.itemErrors()[i] != null) {
                outputs[i] = Codec.OutputItem.error(ErrorCode.BAD_INPUT, job.itemErrors()[i]);
            } else if (skipExpired && job.budgetsUs()[i] <= elapsedUs) {
                outputs[i] = Codec.OutputItem.error(ErrorCode.DEADLINE,
                        "deadline: budget of " + job.budgetsUs()[i] + " us ran out before the model ran");
            } else {
                index[todo.size()] = i;
                todo.add(job.inputs().get(i));
                continue;
            }
            payloads[i] = EMPTY;
        }
        long computeUs = 0;
        if (!todo.isEmpty()) {
            List<Value> results;
            long start = clock.getAsLong();
            try {
                results = model.predict(List.copyOf(todo));
                // at least 1 us, as the Python runtime writes it: a zero is left out of the
                // reply (the schema default), and the broker learns reply templates only
                // from replies that carry compute_us
                computeUs = Math.max(1, (clock.getAsLong() - start) / 1000);
                if (results == null || results.size() != todo.size()) {
                    String got = results == null ? "null" : results.size() + " outputs";
                    return wholeBatchFailure(job, computeUs,
                            "IllegalStateException: model returned " + got + " for " + todo.size() + " inputs");
                }
            } catch (Throwable t) {  // one exception fails exactly this batch, whatever it is
                computeUs = (clock.getAsLong() - start) / 1000;
                return wholeBatchFailure(job, computeUs, describe(t));
            }
            for (int k = 0; k < results.size(); k++) {
                int i = index[k];
                Value v = results.get(k);
                if (v == null) {
                    outputs[i] = Codec.OutputItem.error(ErrorCode.MODEL_ERROR,
                            "NullPointerException: model returned null for item " + i);
                    payloads[i] = EMPTY;
                } else {
                    outputs[i] = Codec.OutputItem.ok(v.dtype(), v.shape());
                    payloads[i] = v.payloadArray();
                }
            }
        }
        byte[] header = Codec.predictReply(job.batchId(), clampU32(computeUs), Arrays.asList(outputs),
                ErrorCode.NONE, "");
        return new Result(job.seq(), job.batchId(), header, Arrays.asList(payloads), false);
    }

    private static Result wholeBatchFailure(Job job, long computeUs, String message) {
        byte[] header = Codec.predictReply(job.batchId(), clampU32(computeUs), List.of(), ErrorCode.MODEL_ERROR, message);
        return new Result(job.seq(), job.batchId(), header, List.of(), true);
    }

    /** {@code "ExceptionClass: message"}: what goes on the wire for an exception, never a trace. */
    static String describe(Throwable t) {
        String name = t.getClass().getSimpleName();
        if (name.isEmpty()) {
            name = t.getClass().getName();
        }
        String msg = t.getMessage();
        return msg == null || msg.isEmpty() ? name : name + ": " + msg;
    }

    static long clampU32(long v) {
        return Math.max(0, Math.min(v, 0xFFFFFFFFL));
    }
}
