package io.ketch;

import java.util.List;

/**
 * One answer of the broker (Python: {@code ketch.Prediction}).
 *
 * @param output the predicted value (or the app's default when {@code isDefault})
 * @param isDefault true when the app's default output was returned
 * @param defaultExplanation why the default was returned ("" otherwise)
 * @param model the model that answered (the first answering one for an ensemble)
 * @param version that model's version
 * @param latencyMs round trip seen by the client
 * @param brokerLatencyMs time the broker held the query
 * @param confidence agreement of an ensemble (1 for one model)
 * @param modelsAnswered models whose answers were used
 * @param modelsMissing models that did not answer in time
 * @param requestId the request id this answers
 */
public record Prediction(Value output, boolean isDefault, String defaultExplanation, String model, String version,
                         double latencyMs, double brokerLatencyMs, float confidence, List<String> modelsAnswered,
                         List<String> modelsMissing, long requestId) {
    public Prediction {
        modelsAnswered = List.copyOf(modelsAnswered);
        modelsMissing = List.copyOf(modelsMissing);
    }
}
