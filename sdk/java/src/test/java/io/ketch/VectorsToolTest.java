package io.ketch;

import static org.junit.jupiter.api.Assertions.assertArrayEquals;
import static org.junit.jupiter.api.Assertions.assertEquals;

import com.google.gson.JsonParser;
import io.ketch.tools.Vectors;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import org.junit.jupiter.api.Test;
import org.junit.jupiter.api.Timeout;
import org.junit.jupiter.api.io.TempDir;

@Timeout(20)
class VectorsToolTest {
    @Test
    void encodeThenDecodeGivesTheTwins(@TempDir Path tmp) throws Exception {
        Path bins = tmp.resolve("bin");
        Path jsons = tmp.resolve("json");
        assertEquals(0, Vectors.run("encode", Golden.dir().toString(), bins.toString()));
        assertEquals(0, Vectors.run("decode", bins.toString(), jsons.toString()));
        for (String name : Golden.names()) {
            assertArrayEquals(Golden.bin(name), Files.readAllBytes(bins.resolve(name + ".bin")), name);
            String text = Files.readString(jsons.resolve(name + ".json"), StandardCharsets.UTF_8);
            Golden.assertJsonEquals(Golden.header(name), JsonParser.parseString(text), name);
        }
    }

    @Test
    void decodedTextHasTheTwinsLayout(@TempDir Path tmp) throws Exception {
        assertEquals(0, Vectors.run("decode", Golden.dir().toString(), tmp.toString()));
        String text = Files.readString(tmp.resolve("hello_defaults.json"), StandardCharsets.UTF_8);
        String twin = Files.readString(Golden.dir().resolve("hello_defaults.json"), StandardCharsets.UTF_8);
        assertEquals(twin.substring(0, twin.indexOf(",\n  \"payloads\"")) + "\n}\n", text);
    }

    @Test
    void badInputFailsWithStatusOne(@TempDir Path tmp) throws Exception {
        Files.writeString(tmp.resolve("broken.json"), "{\"type\": \"Nope\"}");
        Files.write(tmp.resolve("broken.bin"), new byte[] {1, 2, 3});
        assertEquals(1, Vectors.run("encode", tmp.toString(), tmp.resolve("out").toString()));
        assertEquals(1, Vectors.run("decode", tmp.toString(), tmp.resolve("out").toString()));
        assertEquals(64, Vectors.run("encode", tmp.toString()));
    }
}
