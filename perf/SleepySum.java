// A Java replica for perf/scheduling.py: the sum of a FLOAT64 vector, after sleeping a
// fixed time per batch and per item (so its speed does not depend on the machine's load).
// Compiled at run time against the SDK's jar; uses the SDK as it is.
//
//   java -cp ketch-sdk-0.1.0-all.jar:CLASSES SleepySum BACKEND MODEL REPLICA_ID MS_PER_BATCH MS_PER_ITEM

import io.ketch.Container;
import io.ketch.DType;
import io.ketch.Value;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;

public final class SleepySum {
    private SleepySum() {}

    public static void main(String[] args) throws Exception {
        double perBatch = Double.parseDouble(args[3]);
        double perItem = Double.parseDouble(args[4]);
        Container container = Container.builder(inputs -> {
                    long nanos = (long) ((perBatch + perItem * inputs.size()) * 1_000_000);
                    Thread.sleep(nanos / 1_000_000, (int) (nanos % 1_000_000));
                    List<Value> out = new ArrayList<>(inputs.size());
                    for (Value v : inputs) {
                        double s = 0;
                        for (double x : v.asDoubles()) {
                            s += x;
                        }
                        out.add(Value.scalar(s));
                    }
                    return out;
                })
                .broker(args[0])
                .name(args[1])
                .version("1")
                .input(DType.FLOAT64, -1)
                .replicaId(args[2])
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            container.stop();
            try {
                container.awaitTermination(Duration.ofSeconds(30));
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
            }
        }));
        container.run();
    }
}
