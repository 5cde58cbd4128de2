package io.ketch;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;

/** The golden vectors of schemas/vectors and a JSON comparison that compares numbers by value. */
final class Golden {
    private Golden() {}

    /** schemas/vectors: the {@code ketch.vectors} system property (set by the pom), else relative to the pom. */
    static Path dir() {
        String prop = System.getProperty("ketch.vectors");
        Path dir = prop != null ? Path.of(prop) : Path.of("../../schemas/vectors");
        assertTrue(Files.isDirectory(dir), "golden vectors not found at " + dir.toAbsolutePath());
        return dir;
    }

    /** Names of the vectors (NAME.bin with NAME.json). */
    static List<String> names() {
        try (Stream<Path> s = Files.list(dir())) {
            List<String> names = s.map(p -> p.getFileName().toString())
                    .filter(n -> n.endsWith(".bin"))
                    .map(n -> n.substring(0, n.length() - 4))
                    .sorted()
                    .collect(Collectors.toList());
            assertTrue(names.size() >= 19, "expected the golden vectors, found " + names);
            return names;
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    /** Names of the messages of a newer peer ({@code newer/NAME}): schemas/vectors/newer. */
    static List<String> newerNames() {
        try (Stream<Path> s = Files.list(dir().resolve("newer"))) {
            return s.map(p -> p.getFileName().toString())
                    .filter(n -> n.endsWith(".bin"))
                    .map(n -> "newer/" + n.substring(0, n.length() - 4))
                    .sorted()
                    .collect(Collectors.toList());
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    static byte[] bin(String name) {
        try {
            return Files.readAllBytes(dir().resolve(name + ".bin"));
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    static JsonObject twin(String name) {
        try {
            return JsonParser.parseString(Files.readString(dir().resolve(name + ".json"), StandardCharsets.UTF_8))
                    .getAsJsonObject();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    /** The twin without its payloads: what {@link Codec#toJson} gives. */
    static JsonObject header(String name) {
        JsonObject t = twin(name).deepCopy();
        t.remove("payloads");
        return t;
    }

    static List<byte[]> payloads(String name) {
        JsonArray a = twin(name).getAsJsonArray("payloads");
        return Stream.iterate(0, i -> i < a.size(), i -> i + 1)
                .map(i -> java.util.Base64.getDecoder().decode(a.get(i).getAsString()))
                .collect(Collectors.toList());
    }

    /** Structural equality; numbers compare by value (1 == 1.0), key order ignored, keys must match. */
    static void assertJsonEquals(JsonElement expected, JsonElement actual, String path) {
        if (expected.isJsonObject() && actual.isJsonObject()) {
            JsonObject e = expected.getAsJsonObject();
            JsonObject a = actual.getAsJsonObject();
            assertEquals(e.keySet(), a.keySet(), "keys of " + path);
            for (String k : e.keySet()) {
                assertJsonEquals(e.get(k), a.get(k), path + "." + k);
            }
        } else if (expected.isJsonArray() && actual.isJsonArray()) {
            JsonArray e = expected.getAsJsonArray();
            JsonArray a = actual.getAsJsonArray();
            assertEquals(e.size(), a.size(), "length of " + path);
            for (int i = 0; i < e.size(); i++) {
                assertJsonEquals(e.get(i), a.get(i), path + "[" + i + "]");
            }
        } else if (expected.isJsonPrimitive() && actual.isJsonPrimitive()
                && expected.getAsJsonPrimitive().isNumber() && actual.getAsJsonPrimitive().isNumber()) {
            assertEquals(0, expected.getAsBigDecimal().compareTo(actual.getAsBigDecimal()),
                    path + ": expected " + expected + ", got " + actual);
        } else if (!expected.equals(actual)) {
            fail(path + ": expected " + expected + ", got " + actual);
        }
    }
}
