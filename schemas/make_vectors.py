#!/usr/bin/env python3
"""Write the golden vectors in schemas/vectors/: one ``NAME.bin`` header frame and its
``NAME.json`` twin per message, made by the Python reference encoder.

    python schemas/make_vectors.py           # rewrite the vectors
    python schemas/make_vectors.py --check   # exit 1 when a vector differs

The twin is ``{"type", "version", "body", "payloads"}``: body lists every field of the
message with its value as decoded (defaults included, enums by name), payloads the
base64 of the payload frames that travel after the header (not part of the .bin).
Integers stay below 2**53 so that every SDK can hold them exactly.

``vectors/newer/`` holds messages of a peer that speaks a protocol version 3 this schema
does not know (``encode_newer``): tables with fields appended after the last this schema
has, which every reader must skip (the twin lists the fields this schema knows), and a
body type past the last union member (``unknown_body``: its twin is
``{"error": "UNKNOWN_MESSAGE", "version", "body_type"}``, what a receiver answers).
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np
from ketch import protocol as proto
from ketch.protocol import schema

VECTORS = Path(__file__).resolve().parent / "vectors"
NEWER_DIR = VECTORS / "newer"

F64 = struct.pack("<4d", 5.1, 3.5, 1.4, 0.2)
F32 = struct.pack("<3f", 0.25, -1.5, 3.0)

MESSAGES: dict[str, tuple[str, dict, list[bytes]]] = {
    "query_float64": (
        "Query",
        {"app": "iris", "dtype": "FLOAT64", "shape": [4], "request_ids": [1], "timeout_us": 20000},
        [F64],
    ),
    "query_many_strings": (
        "Query",
        {
            "app": "sentiment-ünï",
            "dtype": "STRING",
            "request_ids": [7, 8, 9007199254740991],
            "priority": -3,
            "context": "user-42",
        },
        [b"good", b"bad", "日本".encode()],
    ),
    "query_pinned": (
        "Query",
        {"app": "iris", "dtype": "FLOAT64", "shape": [4], "request_ids": [3], "model_version": "2"},
        [F64],
    ),
    "reply_ok": (
        "Reply",
        {
            "items": [
                {
                    "request_id": 1,
                    "status": "OK",
                    "output": {"dtype": "FLOAT32", "shape": [3]},
                    "model": "iris-svm",
                    "model_version": "2",
                    "latency_us": 812,
                    "models_answered": ["iris-svm"],
                }
            ]
        },
        [F32],
    ),
    "reply_mixed": (
        "Reply",
        {
            "items": [
                {
                    "request_id": 10,
                    "status": "DEFAULT",
                    "output": {"dtype": "JSON"},
                    "message": "deadline: no model answered within 20 ms",
                    "latency_us": 20001,
                    "confidence": 0.0,
                    "models_missing": ["a", "b"],
                },
                {
                    "request_id": 11,
                    "status": "ERROR",
                    "error": "OVERLOADED",
                    "message": "queue of model a is full (1000 queries)",
                    "retry_after_ms": 50,
                },
                {
                    "request_id": 12,
                    "status": "OK",
                    "output": {"dtype": "INT64", "shape": [2, 1]},
                    "model": "a",
                    "model_version": "1",
                    "confidence": 0.75,
                    "models_answered": ["a", "c"],
                    "models_missing": ["b"],
                },
            ]
        },
        [b"-1", b"", struct.pack("<2q", -5, 1 << 40)],
    ),
    "feedback_by_id": (
        "Feedback",
        {"app": "iris", "request_id": 78, "query_id": 77, "label": {"dtype": "INT64"}, "context": "user-42"},
        [struct.pack("<q", 2)],
    ),
    "feedback_by_input": (
        "Feedback",
        {
            "app": "iris",
            "request_id": 79,
            "input": {"dtype": "FLOAT64", "shape": [4]},
            "label": {"dtype": "STRING"},
        },
        [F64, b"setosa"],
    ),
    "hello": (
        "Hello",
        {
            "model": "iris-svm",
            "model_version": "2",
            "input": {"dtype": "FLOAT64", "shape": [-1, 4]},
            "sdk": "python/0.1.0",
            "replica_id": "host-a/iris-svm/0",
            "credits": 3,
            "max_batch": 64,
            "deterministic": False,
            "pid": 4242,
            "fingerprint": "sha256:9f86d081884c7d659a2feaa0c55ad015",
        },
        [],
    ),
    "hello_defaults": (
        "Hello",
        {
            "model": "echo",
            "model_version": "1",
            "input": {"dtype": "BYTES"},
            "sdk": "java/0.1.0",
            "replica_id": "r1",
        },
        [],
    ),
    "hello_v2": (
        "Hello",
        {
            "model": "iris-svm",
            "model_version": "2",
            "input": {"dtype": "FLOAT64", "shape": [4]},
            "sdk": "r/0.1.0",
            "replica_id": "host-b/iris-svm/1",
            "pid": 77,
            "versions": [1, 2],
        },
        [],
    ),
    "welcome": ("Welcome", {"heartbeat_ms": 1000, "dead_after_ms": 5000}, []),
    "welcome_v2": ("Welcome", {"heartbeat_ms": 250, "dead_after_ms": 2000, "version": 2}, []),
    "paused": ("Paused", {"inflight": 3}, []),
    "ready": ("Ready", {"credits": 4}, []),
    "heartbeat": ("Heartbeat", {"busy": True}, []),
    "heartbeat_idle": ("Heartbeat", {}, []),
    "predict_request": (
        "PredictRequest",
        {
            "batch_id": 123456789012,
            "model": "iris-svm",
            "model_version": "2",
            "dtype": "FLOAT64",
            "ndim": 1,
            "shapes": [4, 4],
            "budgets_us": [19000, 4294967295],
        },
        [F64, F64],
    ),
    "predict_reply": (
        "PredictReply",
        {
            "batch_id": 123456789012,
            "compute_us": 1500,
            "outputs": [
                {"status": "OK", "output": {"dtype": "STRING"}},
                {"status": "ERROR", "error": "MODEL_ERROR", "message": "ValueError: bad row"},
            ],
        },
        [b"setosa", b""],
    ),
    "predict_reply_failed": (
        "PredictReply",
        {"batch_id": 5, "compute_us": 20, "error": "MODEL_ERROR", "message": "RuntimeError: out of memory"},
        [],
    ),
    "goodbye": ("Goodbye", {"reason": "drained"}, []),
    "shutdown": ("Shutdown", {"reason": "broker stopping"}, []),
    "error": (
        "Error",
        {
            "code": "UNSUPPORTED_VERSION",
            "message": "protocol version 9 is not supported (speaks 1)",
            "request_id": 3,
        },
        [],
    ),
    "error_overloaded": (
        "Error",
        {"code": "OVERLOADED", "message": "too many outstanding queries", "retry_after_ms": 25},
        [],
    ),
}


# ---------------------------------------------------------------- a newer peer's messages

_SCALAR = {
    "bool": "Bool",
    "i8": "Int8",
    "u8": "Uint8",
    "i16": "Int16",
    "u16": "Uint16",
    "i32": "Int32",
    "u32": "Uint32",
    "i64": "Int64",
    "u64": "Uint64",
    "f32": "Float32",
    "f64": "Float64",
}
_ENUM_STORAGE = {"dtype": "u8", "code": "u16", "status": "u8"}
_NUMPY = {"i64": "<i8", "u64": "<u8", "u32": "<u4", "u16": "<u2"}


def _newer_table(
    b: flatbuffers.Builder, table: str, fields: Mapping[str, Any], extra: Mapping[str, list[int]]
) -> int:
    """A table with ``fields`` (names of this schema), then ``extra[table]``: u32 fields
    appended after the last field this schema has (as a newer schema would append them)."""
    spec = schema.FIELDS[table]
    offsets: dict[str, int] = {}
    for name, kind in spec:
        value = fields.get(name)
        if value is None:
            continue
        if kind == "str":
            offsets[name] = b.CreateString(value)
        elif kind.startswith("[") and kind[1:-1] in _NUMPY:
            offsets[name] = b.CreateNumpyVector(np.asarray(value, dtype=_NUMPY[kind[1:-1]]))
        elif kind.startswith("["):
            elem = kind[1:-1]
            items = [b.CreateString(v) if elem == "str" else _newer_table(b, elem, v, extra) for v in value]
            b.StartVector(4, len(items), 4)
            for item in reversed(items):
                b.PrependUOffsetTRelative(item)
            offsets[name] = b.EndVector()
        elif kind in schema.FIELDS:
            offsets[name] = _newer_table(b, kind, value, extra)
    appended = extra.get(table, [])
    b.StartObject(len(spec) + len(appended))
    for slot, (name, kind) in enumerate(spec):
        if name in offsets:
            b.PrependUOffsetTRelativeSlot(slot, offsets[name], 0)
        elif name in fields:
            value = fields[name]
            if kind in _ENUM_STORAGE:
                value = schema.ENUMS[schema.ENUM_KINDS[kind]][value] if isinstance(value, str) else value
                kind = _ENUM_STORAGE[kind]
            getattr(b, f"Prepend{_SCALAR[kind]}Slot")(slot, value, 0)
    for k, value in enumerate(appended):
        b.PrependUint32Slot(len(spec) + k, value, 0)
    return int(b.EndObject())


def encode_newer(
    body: str,
    fields: Mapping[str, Any],
    *,
    version: int,
    extra: Mapping[str, list[int]] | None = None,
    body_type: int | None = None,
) -> bytes:
    """A header frame as a peer of a newer protocol version writes it: ``body`` (a table of
    this schema, whose fields are given by name) with the u32 values of ``extra[table]``
    appended to each table of that name, stamped ``version``, sent as union member
    ``body_type`` (default: ``body``'s own code; a code past the last member is a message
    type this schema does not know)."""
    b = flatbuffers.Builder(256)
    root = _newer_table(b, body, fields, extra or {})
    b.StartObject(3 + len((extra or {}).get("Envelope", [])))
    b.PrependUint16Slot(schema.Envelope.VERSION, version, 0)
    b.PrependUint8Slot(
        schema.Envelope.BODY_TYPE, proto.BODY_CODES[body] if body_type is None else body_type, 0
    )
    b.PrependUOffsetTRelativeSlot(schema.Envelope.BODY, root, 0)
    for k, value in enumerate((extra or {}).get("Envelope", [])):
        b.PrependUint32Slot(3 + k, value, 0)
    b.Finish(b.EndObject(), file_identifier=proto.IDENTIFIER)
    return bytes(b.Output())


UNKNOWN_BODY_TYPE = 200  # far past the last member of Body

NEWER_MESSAGES: dict[str, tuple[bytes, list[bytes]]] = {
    # a container of version 3: it offers [1, 2, 3]; its Hello, stamped 1, carries a field more
    "hello": (
        encode_newer(
            "Hello",
            {
                "model": "m3",
                "model_version": "1",
                "input": {"dtype": "FLOAT64", "shape": [-1]},
                "sdk": "future/3.0",
                "replica_id": "r3",
                "versions": [1, 2, 3],
            },
            version=1,
            extra={"Hello": [33], "Tensor": [34]},
        ),
        [],
    ),
    # a broker of version 3 welcoming a version-2 container, with a field more
    "welcome": (
        encode_newer(
            "Welcome",
            {"heartbeat_ms": 250, "dead_after_ms": 4000, "version": 2},
            version=1,
            extra={"Welcome": [7]},
        ),
        [],
    ),
    "predict_request": (
        encode_newer(
            "PredictRequest",
            {
                "batch_id": 42,
                "model": "m3",
                "model_version": "1",
                "dtype": "FLOAT64",
                "ndim": 1,
                "shapes": [2, 1],
                "budgets_us": [500000, 500000],
            },
            version=1,
            extra={"PredictRequest": [9, 10], "Envelope": [11]},
        ),
        [struct.pack("<2d", 1.5, 2.5), struct.pack("<d", -4.0)],
    ),
    "predict_reply": (
        encode_newer(
            "PredictReply",
            {
                "batch_id": 42,
                "compute_us": 120,
                "outputs": [
                    {"status": "OK", "output": {"dtype": "FLOAT64"}},
                    {"status": "ERROR", "error": "MODEL_ERROR", "message": "ValueError: no"},
                ],
            },
            version=1,
            extra={"PredictReply": [5], "Output": [6], "Tensor": [8]},
        ),
        [struct.pack("<d", 4.0), b""],
    ),
    "paused": (encode_newer("Paused", {"inflight": 1}, version=2, extra={"Paused": [12]}), []),
    # a message type this schema does not know, stamped with a version this schema speaks
    "unknown_body": (
        encode_newer(
            "Heartbeat", {"busy": True}, version=2, extra={"Heartbeat": [13]}, body_type=UNKNOWN_BODY_TYPE
        ),
        [],
    ),
}


def twin_text(header: bytes, payloads: list[bytes]) -> str:
    try:
        twin = proto.to_dict(header)
    except proto.UnknownMessage as exc:
        twin = {"error": "UNKNOWN_MESSAGE", "version": exc.version, "body_type": exc.body_type}
    twin["payloads"] = [base64.b64encode(p).decode("ascii") for p in payloads]
    return json.dumps(twin, indent=2, ensure_ascii=False) + "\n"


def build() -> dict[Path, tuple[bytes, str]]:
    out = {}
    for name, (body, fields, payloads) in MESSAGES.items():
        header = proto.encode(body, fields)
        out[VECTORS / name] = (header, twin_text(header, payloads))
    for name, (header, payloads) in NEWER_MESSAGES.items():
        out[NEWER_DIR / name] = (header, twin_text(header, payloads))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    built = build()
    for stem, (header, twin) in built.items():
        bin_path, json_path = stem.with_suffix(".bin"), stem.with_suffix(".json")
        same = bin_path.exists() and bin_path.read_bytes() == header and json_path.read_text("utf-8") == twin
        if not same:
            stale.append(str(stem.relative_to(VECTORS)))
            if not args.check:
                stem.parent.mkdir(exist_ok=True)
                bin_path.write_bytes(header)
                json_path.write_text(twin, "utf-8")
    extra = {
        str(p.with_suffix("").relative_to(VECTORS)) for d in (VECTORS, NEWER_DIR) for p in d.glob("*.bin")
    }
    extra -= {str(stem.relative_to(VECTORS)) for stem in built}
    if args.check and (stale or extra):
        print("vectors differ:", *sorted(set(stale) | extra))
        return 1
    print(f"{len(built)} vectors, {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
