package io.ketch.tools;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import io.ketch.Codec;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.List;
import java.util.stream.Collectors;
import java.util.stream.Stream;

/**
 * Golden-vector tool for cross-language checks.
 *
 * <pre>
 * java -cp ketch-sdk-0.1.0-all.jar io.ketch.tools.Vectors encode JSON_DIR OUT_DIR
 *     each NAME.json twin -> OUT_DIR/NAME.bin, the header frame built by the Java encoder
 * java -cp ketch-sdk-0.1.0-all.jar io.ketch.tools.Vectors decode BIN_DIR OUT_DIR
 *     each NAME.bin -> OUT_DIR/NAME.json, {"type", "version", "body"} in the canonical form
 * </pre>
 * Exit status 0 when every file converted, 1 when any failed (each failure is named on stderr),
 * 64 on bad usage.
 */
public final class Vectors {
    private static final Gson GSON = new GsonBuilder()
            .setPrettyPrinting()
            .disableHtmlEscaping()
            .serializeNulls()
            .serializeSpecialFloatingPointValues()
            .create();

    private Vectors() {}

    public static void main(String[] args) {
        System.exit(run(args));
    }

    /** The tool without System.exit, for tests: returns the exit status. */
    public static int run(String... args) {
        if (args.length != 3 || !(args[0].equals("encode") || args[0].equals("decode"))) {
            System.err.println("usage: Vectors encode JSON_DIR OUT_DIR | decode BIN_DIR OUT_DIR");
            return 64;
        }
        boolean encode = args[0].equals("encode");
        Path in = Path.of(args[1]);
        Path out = Path.of(args[2]);
        List<Path> files;
        try (Stream<Path> s = Files.list(in)) {
            String ext = encode ? ".json" : ".bin";
            files = s.filter(p -> p.getFileName().toString().endsWith(ext)).sorted().collect(Collectors.toList());
            Files.createDirectories(out);
        } catch (IOException e) {
            System.err.println("error: " + e);
            return 1;
        }
        int failed = 0;
        for (Path file : files) {
            String fileName = file.getFileName().toString();
            String stem = fileName.substring(0, fileName.lastIndexOf('.'));
            try {
                if (encode) {
                    JsonObject twin = JsonParser.parseString(Files.readString(file, StandardCharsets.UTF_8))
                            .getAsJsonObject();
                    Files.write(out.resolve(stem + ".bin"), Codec.fromJson(twin));
                } else {
                    JsonObject message = Codec.toJson(Files.readAllBytes(file));
                    Files.writeString(out.resolve(stem + ".json"), toText(message) + "\n", StandardCharsets.UTF_8);
                }
            } catch (IOException | RuntimeException e) {
                failed++;
                System.err.println(fileName + ": " + e.getClass().getSimpleName() + ": " + e.getMessage());
            }
        }
        System.err.println((encode ? "encoded " : "decoded ") + (files.size() - failed) + " of " + files.size()
                + " file(s) into " + out);
        return failed == 0 ? 0 : 1;
    }

    /** Pretty JSON text (two-space indent, UTF-8 unescaped, nulls kept). */
    public static String toText(JsonElement json) {
        return GSON.toJson(json);
    }
}
