package io.ketch.examples;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.ketch.Model;
import io.ketch.Value;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;

/**
 * A linear model whose weights are given at run time: a JSON file
 * {@code {"intercept": b, "coef": [w0, w1, ...]}}. Each FLOAT64 input vector x (of the
 * coefficients' length) is answered with the FLOAT64 scalar {@code b + w0*x0 + w1*x1 + ...},
 * summed in that order (so any IEEE-754 implementation that sums alike gets the same bits).
 *
 * <pre>
 * KETCH_MODEL_CLASS=io.ketch.examples.Linear KETCH_MODEL=/models/linear.json ... io.ketch.tools.Launch
 * </pre>
 */
public final class Linear implements Model {
    private final double intercept;
    private final double[] coef;

    public Linear(String path) throws IOException {
        JsonObject doc = JsonParser.parseString(Files.readString(Path.of(path), StandardCharsets.UTF_8))
                .getAsJsonObject();
        intercept = doc.get("intercept").getAsDouble();
        JsonArray c = doc.getAsJsonArray("coef");
        coef = new double[c.size()];
        for (int i = 0; i < coef.length; i++) {
            coef[i] = c.get(i).getAsDouble();
        }
    }

    @Override
    public List<Value> predict(List<Value> inputs) {
        List<Value> out = new ArrayList<>(inputs.size());
        for (Value v : inputs) {
            double[] x = v.asDoubles();
            if (x.length != coef.length) {
                throw new IllegalArgumentException("expected " + coef.length + " features, got " + x.length);
            }
            double y = intercept;
            for (int i = 0; i < x.length; i++) {
                y += coef[i] * x[i];
            }
            out.add(Value.scalar(y));
        }
        return out;
    }
}
