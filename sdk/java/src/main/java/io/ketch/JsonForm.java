package io.ketch;

import com.google.flatbuffers.FlatBufferBuilder;
import com.google.flatbuffers.Table;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonNull;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.util.Arrays;
import java.util.HashSet;
import java.util.Set;
import ketch.wire.Envelope;

/**
 * The canonical JSON form of a message, as in the golden vectors' twins:
 * {@code {"type": "Hello", "version": 1, "body": {...}}} where the body lists every field of
 * the table in schema order with its decoded value: enums by name, absent sub-tables
 * {@code null}, absent strings {@code ""}, absent vectors {@code []}, absent scalars their
 * schema default. Unsigned 64-bit fields are written as unsigned numbers.
 *
 * <p>Both directions are driven by the generated {@link Schema#TABLES} (each table's fields in
 * schema order, with a kind, an id and a default), so no message is described here: a message
 * type added to the schema has its JSON form once the code is regenerated. The writer
 * ({@link #fromJson}) takes the same form, with any field left out meaning "absent"; it writes
 * children first, then adds the fields in schema order, skipping empty strings, empty vectors
 * and default scalars, like the Python reference encoder, so both write the same bytes.
 */
final class JsonForm {
    private JsonForm() {}

    // ================================================================ reading

    /** A table read by field id. */
    private static final class Raw extends Table {
        Raw at(int pos, ByteBuffer buf) {
            __reset(pos, buf);
            return this;
        }

        /** The field's offset within the table, 0 when absent. */
        int field(int id) {
            return __offset(4 + 2 * id);
        }

        int pos() {
            return bb_pos;
        }

        ByteBuffer buf() {
            return bb;
        }

        String string(int o) {
            return __string(bb_pos + o);
        }

        String stringAt(int at) {
            return __string(at);
        }

        int vectorLength(int o) {
            return __vector_len(o);
        }

        int vector(int o) {
            return __vector(o);
        }

        int indirect(int at) {
            return __indirect(at);
        }
    }

    /** {@code frame} (already checked by {@link Codec#decode}, which gave {@code m}) as JSON. */
    static JsonObject toJson(byte[] frame, Codec.Message m) {
        ByteBuffer bb = ByteBuffer.wrap(frame);
        Raw body = (Raw) Envelope.getRootAsEnvelope(bb.slice()).body(new Raw());
        JsonObject out = new JsonObject();
        out.addProperty("type", m.type().wireName());
        out.addProperty("version", m.version());
        out.add("body", table(m.type().wireName(), body));
        return out;
    }

    private static JsonObject table(String name, Raw t) {
        JsonObject o = new JsonObject();
        for (Schema.Field f : fields(name)) {
            o.add(f.name(), field(f, t));
        }
        return o;
    }

    private static Schema.Field[] fields(String table) {
        Schema.Field[] fs = Schema.TABLES.get(table);
        if (fs == null) {
            throw new IllegalArgumentException("unknown table " + table);
        }
        return fs;
    }

    private static JsonElement field(Schema.Field f, Raw t) {
        String kind = f.kind();
        int o = t.field(f.id());
        ByteBuffer bb = t.buf();
        if (kind.equals("str")) {
            return new JsonPrimitive(o == 0 ? "" : Codec.str(t.string(o)));
        }
        if (kind.startsWith("[")) {
            String elem = kind.substring(1, kind.length() - 1);
            JsonArray a = new JsonArray();
            if (o == 0) {
                return a;
            }
            int n = t.vectorLength(o);
            int start = t.vector(o);
            int size = elem.equals("str") || Schema.TABLES.containsKey(elem) ? 4 : width(elem) / 8;
            for (int i = 0; i < n; i++) {
                int at = start + i * size;
                if (elem.equals("str")) {
                    a.add(t.stringAt(at));
                } else if (Schema.TABLES.containsKey(elem)) {
                    a.add(table(elem, new Raw().at(t.indirect(at), bb)));
                } else {
                    a.add(scalar(elem, bb, at));
                }
            }
            return a;
        }
        if (Schema.TABLES.containsKey(kind)) {
            return o == 0 ? JsonNull.INSTANCE : table(kind, new Raw().at(t.indirect(t.pos() + o), bb));
        }
        Schema.EnumKind e = Schema.ENUMS.get(kind);
        if (e != null) {
            int code = o == 0 ? (int) f.dflt()
                    : (int) (e.bits() == 8 ? bb.get(t.pos() + o) & 0xFF : bb.getShort(t.pos() + o) & 0xFFFF);
            return code >= 0 && code < e.names().length ? new JsonPrimitive(e.names()[code]) : new JsonPrimitive(code);
        }
        if (o == 0) {
            return switch (kind) {
                case "bool" -> new JsonPrimitive(f.dflt() != 0);
                case "f32", "f64" -> new JsonPrimitive(f.dflt());
                default -> new JsonPrimitive((long) f.dflt());
            };
        }
        return scalar(kind, bb, t.pos() + o);
    }

    /** Bits of a scalar kind ("u32": 32). */
    private static int width(String kind) {
        return switch (kind) {
            case "bool", "i8", "u8" -> 8;
            case "i16", "u16" -> 16;
            case "i32", "u32", "f32" -> 32;
            case "i64", "u64", "f64" -> 64;
            default -> throw new IllegalArgumentException("not a scalar kind: " + kind);
        };
    }

    private static JsonPrimitive scalar(String kind, ByteBuffer bb, int at) {
        return switch (kind) {
            case "bool" -> new JsonPrimitive(bb.get(at) != 0);
            case "i8" -> new JsonPrimitive(bb.get(at));
            case "u8" -> new JsonPrimitive(bb.get(at) & 0xFF);
            case "i16" -> new JsonPrimitive(bb.getShort(at));
            case "u16" -> new JsonPrimitive(bb.getShort(at) & 0xFFFF);
            case "i32" -> new JsonPrimitive(bb.getInt(at));
            case "u32" -> new JsonPrimitive(bb.getInt(at) & 0xFFFFFFFFL);
            case "i64" -> new JsonPrimitive(bb.getLong(at));
            case "u64" -> u64(bb.getLong(at));
            case "f32" -> new JsonPrimitive((double) bb.getFloat(at));
            case "f64" -> new JsonPrimitive(bb.getDouble(at));
            default -> throw new IllegalArgumentException("not a scalar kind: " + kind);
        };
    }

    /** An unsigned 64-bit value held in a long. */
    static JsonPrimitive u64(long v) {
        return v >= 0 ? new JsonPrimitive(v) : new JsonPrimitive(new BigInteger(Long.toUnsignedString(v)));
    }

    // ================================================================ writing

    static byte[] fromJson(JsonObject message) {
        Fields m = new Fields("message", message, "type", "version", "body", "payloads");
        String typeName = m.requiredString("type");
        MessageType type = MessageType.fromWireName(typeName);
        int version = (int) m.unsigned("version", 16, type.since());
        JsonObject bodyJson = m.object("body");
        FlatBufferBuilder b = new FlatBufferBuilder(256);
        int body = table(b, typeName, bodyJson == null ? new JsonObject() : bodyJson);
        return Codec.finish(b, type, body, version);
    }

    /** Writes one table from its JSON form: children first, then the fields in schema order. */
    private static int table(FlatBufferBuilder b, String name, JsonObject json) {
        Schema.Field[] spec = fields(name);
        Fields f = new Fields(name, json, Arrays.stream(spec).map(Schema.Field::name).toArray(String[]::new));
        int[] offsets = new int[spec.length];
        for (int i = 0; i < spec.length; i++) {
            offsets[i] = child(b, spec[i], f);
        }
        int slots = 0;
        for (Schema.Field field : spec) {
            slots = Math.max(slots, field.id() + 1);
        }
        b.startTable(slots);
        for (int i = 0; i < spec.length; i++) {
            Schema.Field field = spec[i];
            if (offsets[i] != 0) {
                b.addOffset(field.id(), offsets[i], 0);
            } else if (!isOffset(field.kind()) && f.element(field.name()) != null) {
                addScalar(b, field, f);
            }
        }
        return b.endTable();
    }

    private static boolean isOffset(String kind) {
        return kind.equals("str") || kind.startsWith("[") || Schema.TABLES.containsKey(kind);
    }

    /** The offset of a string, vector or sub-table field (0 when absent or empty). */
    private static int child(FlatBufferBuilder b, Schema.Field field, Fields f) {
        String kind = field.kind();
        String name = field.name();
        if (kind.equals("str")) {
            return Codec.string(b, f.string(name));
        }
        if (Schema.TABLES.containsKey(kind)) {
            JsonObject sub = f.object(name);
            return sub == null ? 0 : table(b, kind, sub);
        }
        if (!kind.startsWith("[")) {
            return 0;
        }
        String elem = kind.substring(1, kind.length() - 1);
        if (elem.equals("str") || Schema.TABLES.containsKey(elem)) {
            JsonArray a = f.array(name);
            if (a.size() == 0) {
                return 0;
            }
            int[] offs = new int[a.size()];
            for (int i = 0; i < offs.length; i++) {
                JsonElement e = a.get(i);
                if (elem.equals("str")) {
                    if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
                        throw f.bad(name + "[" + i + "]", e, "not a string");
                    }
                    offs[i] = b.createString(e.getAsString());
                } else {
                    if (!e.isJsonObject()) {
                        throw f.bad(name + "[" + i + "]", e, "not an object");
                    }
                    offs[i] = table(b, elem, e.getAsJsonObject());
                }
            }
            b.startVector(4, offs.length, 4);
            for (int i = offs.length - 1; i >= 0; i--) {
                b.addOffset(offs[i]);
            }
            return b.endVector();
        }
        int bits = width(elem);
        long[] values = f.integers(name, bits, elem.startsWith("i"));
        if (values.length == 0) {
            return 0;
        }
        b.startVector(bits / 8, values.length, bits / 8);
        for (int i = values.length - 1; i >= 0; i--) {
            switch (bits) {
                case 8 -> b.addByte((byte) values[i]);
                case 16 -> b.addShort((short) values[i]);
                case 32 -> b.addInt((int) values[i]);
                default -> b.addLong(values[i]);
            }
        }
        return b.endVector();
    }

    private static void addScalar(FlatBufferBuilder b, Schema.Field field, Fields f) {
        String kind = field.kind();
        String name = field.name();
        int id = field.id();
        double d = field.dflt();
        Schema.EnumKind e = Schema.ENUMS.get(kind);
        if (e != null) {
            int code = f.enumCode(name, e.names(), e.bits());
            if (e.bits() == 8) {
                b.addByte(id, (byte) code, (int) d);
            } else {
                b.addShort(id, (short) code, (int) d);
            }
            return;
        }
        switch (kind) {
            case "bool" -> b.addBoolean(id, f.bool(name, d != 0), d != 0);
            case "f32" -> b.addFloat(id, f.float32(name, (float) d), d);
            case "f64" -> b.addDouble(id, f.float64(name, d), d);
            case "i8" -> b.addByte(id, (byte) f.signed(name, 8, 0), (int) d);
            case "u8" -> b.addByte(id, (byte) f.unsigned(name, 8, 0), (int) d);
            case "i16" -> b.addShort(id, (short) f.signed(name, 16, 0), (int) d);
            case "u16" -> b.addShort(id, (short) f.unsigned(name, 16, 0), (int) d);
            case "i32" -> b.addInt(id, (int) f.signed(name, 32, 0), (int) d);
            case "u32" -> b.addInt(id, (int) f.unsigned(name, 32, 0), (int) (long) d);
            case "i64" -> b.addLong(id, f.signed(name, 64, 0), (long) d);
            case "u64" -> b.addLong(id, f.u64(name), (long) d);
            default -> throw new IllegalArgumentException(name + ": unknown kind " + kind);
        }
    }

    /** Typed, range-checked reads of one JSON object; absent and null fields take the default. */
    private static final class Fields {
        private final String table;
        private final JsonObject o;

        Fields(String table, JsonObject o, String... known) {
            this.table = table;
            this.o = o;
            Set<String> unknown = new HashSet<>(o.keySet());
            unknown.removeAll(Arrays.asList(known));
            if (!unknown.isEmpty()) {
                throw new IllegalArgumentException(table + " has no field(s) " + unknown);
            }
        }

        JsonElement element(String name) {
            JsonElement e = o.get(name);
            return e == null || e.isJsonNull() ? null : e;
        }

        private IllegalArgumentException bad(String name, Object value, String why) {
            return new IllegalArgumentException(table + "." + name + " = " + value + ": " + why);
        }

        private BigInteger integer(String name, JsonElement e) {
            try {
                return e.getAsJsonPrimitive().getAsBigDecimal().toBigIntegerExact();
            } catch (RuntimeException ex) {
                throw bad(name, e, "not an integer");
            }
        }

        String requiredString(String name) {
            JsonElement e = element(name);
            if (e == null) {
                throw bad(name, null, "missing");
            }
            return e.getAsString();
        }

        String string(String name) {
            JsonElement e = element(name);
            if (e == null) {
                return null;
            }
            if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isString()) {
                throw bad(name, e, "not a string");
            }
            return e.getAsString();
        }

        JsonObject object(String name) {
            JsonElement e = element(name);
            if (e == null) {
                return null;
            }
            if (!e.isJsonObject()) {
                throw bad(name, e, "not an object");
            }
            return e.getAsJsonObject();
        }

        JsonArray array(String name) {
            JsonElement e = element(name);
            if (e == null) {
                return new JsonArray();
            }
            if (!e.isJsonArray()) {
                throw bad(name, e, "not a list");
            }
            return e.getAsJsonArray();
        }

        long unsigned(String name, int bits, long dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            BigInteger v = integer(name, e);
            if (v.signum() < 0 || v.bitLength() > bits) {
                throw bad(name, e, "out of range for u" + bits);
            }
            return v.longValue();
        }

        long signed(String name, int bits, long dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            BigInteger v = integer(name, e);
            if (v.bitLength() > bits - 1) {
                throw bad(name, e, "out of range for i" + bits);
            }
            return v.longValue();
        }

        long u64(String name) {
            return unsigned(name, 64, 0);
        }

        boolean bool(String name, boolean dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            if (!e.isJsonPrimitive() || !e.getAsJsonPrimitive().isBoolean()) {
                throw bad(name, e, "not a boolean");
            }
            return e.getAsBoolean();
        }

        float float32(String name, float dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            try {
                return (float) e.getAsDouble();
            } catch (RuntimeException ex) {
                throw bad(name, e, "not a number");
            }
        }

        /** An enum given by name, or by its number. */
        int enumCode(String name, String[] names, int bits) {
            JsonElement e = element(name);
            if (e == null) {
                return 0;
            }
            if (e.isJsonPrimitive() && e.getAsJsonPrimitive().isString()) {
                int i = Arrays.asList(names).indexOf(e.getAsString());
                if (i < 0) {
                    throw bad(name, e, "not one of " + Arrays.toString(names));
                }
                return i;
            }
            return (int) unsigned(name, bits, 0);
        }

        private long[] integers(String name, int bits, boolean signed) {
            JsonArray a = array(name);
            long[] out = new long[a.size()];
            for (int i = 0; i < out.length; i++) {
                BigInteger v = integer(name, a.get(i));
                boolean ok = signed ? v.bitLength() <= bits - 1 : v.signum() >= 0 && v.bitLength() <= bits;
                if (!ok) {
                    throw bad(name + "[" + i + "]", v, "out of range");
                }
                out[i] = v.longValue();
            }
            return out;
        }

        double float64(String name, double dflt) {
            JsonElement e = element(name);
            if (e == null) {
                return dflt;
            }
            try {
                return e.getAsDouble();
            } catch (RuntimeException ex) {
                throw bad(name, e, "not a number");
            }
        }
    }
}
