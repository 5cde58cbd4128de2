package io.ketch;

import ketch.wire.Body;

/** The body types of an Envelope (the {@code Body} union); {@link #wireName()} is the schema name. */
public enum MessageType {
    QUERY(Body.Query),
    REPLY(Body.Reply),
    FEEDBACK(Body.Feedback),
    HELLO(Body.Hello),
    WELCOME(Body.Welcome),
    READY(Body.Ready),
    HEARTBEAT(Body.Heartbeat),
    PREDICT_REQUEST(Body.PredictRequest),
    PREDICT_REPLY(Body.PredictReply),
    GOODBYE(Body.Goodbye),
    SHUTDOWN(Body.Shutdown),
    ERROR(Body.Error);

    private final byte code;

    MessageType(byte code) {
        this.code = code;
    }

    /** The union type code ({@code ketch.wire.Body}). */
    public byte code() {
        return code;
    }

    /** The table name in the schema, as in the golden vectors' "type": "PredictRequest". */
    public String wireName() {
        return Body.name(code);
    }

    /** The type of a union code, or null when the code is unknown (or NONE). */
    public static MessageType fromCode(int code) {
        for (MessageType t : values()) {
            if (t.code == code) {
                return t;
            }
        }
        return null;
    }

    /** The type named as in the schema ("PredictRequest"). */
    public static MessageType fromWireName(String name) {
        for (MessageType t : values()) {
            if (t.wireName().equals(name)) {
                return t;
            }
        }
        throw new IllegalArgumentException("unknown message type '" + name + "'");
    }
}
