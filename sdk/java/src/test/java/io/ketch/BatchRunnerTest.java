package io.ketch;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Random;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import ketch.wire.PredictReply;
import ketch.wire.PredictRequest;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;

/** Batch semantics without sockets: a fake clock, random payloads. */
@Timeout(10)
class BatchRunnerTest {
    private final AtomicLong now = new AtomicLong(1_000_000_000L);
    private final Random random = new Random(42);

    private BatchRunner.Job job(long batchId, long[] budgets, double[]... rows) {
        long[] shapes = new long[rows.length];
        List<byte[]> payloads = new ArrayList<>();
        for (int i = 0; i < rows.length; i++) {
            shapes[i] = rows[i].length;
            payloads.add(Value.doubles(rows[i]).toByteArray());
        }
        byte[] header = Codec.predictRequest(batchId, "m", "1", DType.FLOAT64, 1, shapes, budgets);
        return BatchRunner.parse(0, Codec.decode(header).body(PredictRequest.class), payloads, now.get());
    }

    private double[] row() {
        double[] r = new double[1 + random.nextInt(5)];
        for (int i = 0; i < r.length; i++) {
            r[i] = random.nextGaussian();
        }
        return r;
    }

    private static PredictReply reply(BatchRunner.Result r) {
        return Codec.decode(r.header()).body(PredictReply.class);
    }

    private static double sum(double[] xs) {
        double s = 0;
        for (double x : xs) {
            s += x;
        }
        return s;
    }

    @Test
    void oneOutputPerInputInOrder() {
        double[][] rows = {row(), row(), row()};
        BatchRunner runner = new BatchRunner(inputs -> {
            now.addAndGet(2_500_000);  // the model takes 2.5 ms
            List<Value> out = new ArrayList<>();
            for (Value v : inputs) {
                out.add(Value.scalar(sum(v.asDoubles())));
            }
            return out;
        }, true, now::get);
        BatchRunner.Result r = runner.run(job(77, new long[] {1000, 1000, 1000}, rows));
        PredictReply p = reply(r);
        assertEquals(77, p.batchId());
        assertEquals(2500, p.computeUs());
        assertEquals(3, p.outputsLength());
        assertEquals(3, r.payloads().size());
        for (int i = 0; i < 3; i++) {
            assertEquals(Status.OK.code(), p.outputs(i).status());
            assertEquals(DType.FLOAT64.code(), p.outputs(i).output().dtype());
            assertEquals(0, p.outputs(i).output().shapeLength());
            assertEquals(sum(rows[i]), Value.of(DType.FLOAT64, new long[0], r.payloads().get(i)).asDoubles()[0]);
        }
    }

    @Test
    void anExceptionFailsTheWholeBatch() {
        BatchRunner runner = new BatchRunner(inputs -> {
            throw new IllegalArgumentException("bad row");
        }, true, now::get);
        BatchRunner.Result r = runner.run(job(5, new long[] {1000, 1000}, row(), row()));
        PredictReply p = reply(r);
        assertEquals(0, p.outputsLength());
        assertEquals(ErrorCode.MODEL_ERROR.code(), p.error());
        assertEquals("IllegalArgumentException: bad row", p.message());
        assertTrue(r.payloads().isEmpty());
        assertTrue(r.failed());
    }

    @Test
    void theWrongNumberOfOutputsFailsTheWholeBatch() {
        BatchRunner runner = new BatchRunner(inputs -> List.of(Value.scalar(1)), true, now::get);
        PredictReply p = reply(runner.run(job(6, new long[] {1000, 1000}, row(), row())));
        assertEquals(0, p.outputsLength());
        assertEquals(ErrorCode.MODEL_ERROR.code(), p.error());
        assertEquals("IllegalStateException: model returned 1 outputs for 2 inputs", p.message());
    }

    @Test
    void aNullOutputFailsOnlyItsItem() {
        BatchRunner runner = new BatchRunner(inputs -> {
            List<Value> out = new ArrayList<>();
            out.add(null);
            out.add(Value.string("ok"));
            return out;
        }, true, now::get);
        BatchRunner.Result r = runner.run(job(8, new long[] {1000, 1000}, row(), row()));
        PredictReply p = reply(r);
        assertEquals(Status.ERROR.code(), p.outputs(0).status());
        assertEquals(ErrorCode.MODEL_ERROR.code(), p.outputs(0).error());
        assertEquals(0, r.payloads().get(0).length);
        assertEquals(Status.OK.code(), p.outputs(1).status());
        assertEquals("ok", new String(r.payloads().get(1), java.nio.charset.StandardCharsets.UTF_8));
    }

    @Test
    void expiredItemsAreAnsweredDeadlineWithoutComputing() {
        AtomicReference<List<Value>> seen = new AtomicReference<>();
        BatchRunner runner = new BatchRunner(inputs -> {
            seen.set(inputs);
            return new ArrayList<>(inputs);
        }, true, now::get);
        double[] a = row();
        double[] b = row();
        BatchRunner.Job j = job(9, new long[] {500, 4294967295L}, a, b);
        now.addAndGet(1_000_000);  // 1 ms passed: item 0's 500 us budget ran out
        BatchRunner.Result r = runner.run(j);
        PredictReply p = reply(r);
        assertEquals(2, p.outputsLength());
        assertEquals(ErrorCode.DEADLINE.code(), p.outputs(0).error());
        assertEquals(Status.OK.code(), p.outputs(1).status());
        assertEquals(1, seen.get().size());
        assertArrayEquals(b, Value.of(DType.FLOAT64, new long[] {b.length}, r.payloads().get(1)).asDoubles());

        BatchRunner keepAll = new BatchRunner(inputs -> new ArrayList<>(inputs), false, now::get);
        assertEquals(Status.OK.code(), reply(keepAll.run(j)).outputs(0).status());
    }

    @Test
    void allExpiredSkipsTheModel() {
        BatchRunner runner = new BatchRunner(inputs -> {
            throw new AssertionError("model called");
        }, true, now::get);
        PredictReply p = reply(runner.run(job(10, new long[] {0}, row())));
        assertEquals(ErrorCode.DEADLINE.code(), p.outputs(0).error());
        assertEquals(0, p.computeUs());
    }

    @Test
    void malformedRequestsFailTheBatchOrTheItem() {
        byte[] header = Codec.predictRequest(11, "m", "1", DType.FLOAT64, 1, new long[] {2, 2}, new long[] {1000, 1000});
        PredictRequest req = Codec.decode(header).body(PredictRequest.class);
        BatchRunner runner = new BatchRunner(inputs -> new ArrayList<>(inputs), true, now::get);

        BatchRunner.Job missing = BatchRunner.parse(0, req, List.of(new byte[16]), now.get());
        PredictReply p = reply(runner.run(missing));
        assertEquals(ErrorCode.BAD_MESSAGE.code(), p.error());
        assertEquals(0, p.outputsLength());

        BatchRunner.Job shortItem = BatchRunner.parse(0, req, List.of(new byte[16], new byte[8]), now.get());
        p = reply(runner.run(shortItem));
        assertEquals(Status.OK.code(), p.outputs(0).status());
        assertEquals(ErrorCode.BAD_INPUT.code(), p.outputs(1).error());
    }

    @Test
    void textThatIsNotUtf8FailsItsItemAloneTheOthersCompute() {
        for (DType dtype : new DType[] {DType.STRING, DType.JSON}) {
            byte[] header = Codec.predictRequest(12, "m", "1", dtype, 0, new long[0], new long[] {1000, 1000, 1000});
            PredictRequest req = Codec.decode(header).body(PredictRequest.class);
            List<Integer> seen = new ArrayList<>();
            BatchRunner runner = new BatchRunner(inputs -> {
                seen.add(inputs.size());
                List<Value> out = new ArrayList<>();
                for (Value v : inputs) {
                    out.add(v == null ? null : Value.string(v.asString().toUpperCase()));
                }
                return out;
            }, true, now::get);
            byte[] bad = {'"', (byte) 0xff, '"'};
            BatchRunner.Job job = BatchRunner.parse(0, req,
                    List.of("\"a\"".getBytes(java.nio.charset.StandardCharsets.UTF_8), bad,
                            "\"\u00e9\"".getBytes(java.nio.charset.StandardCharsets.UTF_8)), now.get());
            PredictReply p = reply(runner.run(job));
            assertEquals(Status.OK.code(), p.outputs(0).status(), dtype.toString());
            assertEquals(ErrorCode.BAD_INPUT.code(), p.outputs(1).error());
            assertTrue(p.outputs(1).message().contains("not valid UTF-8"), p.outputs(1).message());
            assertEquals(Status.OK.code(), p.outputs(2).status());
            assertEquals(List.of(2), seen, "the model computes the two good items");
        }
    }

    @Test
    void describeGivesClassAndMessage() {
        assertEquals("IllegalStateException: boom", BatchRunner.describe(new IllegalStateException("boom")));
        assertEquals("NullPointerException", BatchRunner.describe(new NullPointerException()));
    }
}
