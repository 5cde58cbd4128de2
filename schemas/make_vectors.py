#!/usr/bin/env python3
"""Write the golden vectors in schemas/vectors/: one ``NAME.bin`` header frame and its
``NAME.json`` twin per message, made by the Python reference encoder.

    python schemas/make_vectors.py           # rewrite the vectors
    python schemas/make_vectors.py --check   # exit 1 when a vector differs

The twin is ``{"type", "version", "body", "payloads"}``: body lists every field of the
message with its value as decoded (defaults included, enums by name), payloads the
base64 of the payload frames that travel after the header (not part of the .bin).
Integers stay below 2**53 so that every SDK can hold them exactly.
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
import sys
from pathlib import Path

from ketch import protocol as proto

VECTORS = Path(__file__).resolve().parent / "vectors"

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
    "welcome": ("Welcome", {"heartbeat_ms": 1000, "dead_after_ms": 5000}, []),
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


def build() -> dict[str, tuple[bytes, str]]:
    out = {}
    for name, (body, fields, payloads) in MESSAGES.items():
        header = proto.encode(body, fields)
        twin = proto.to_dict(header)
        twin["payloads"] = [base64.b64encode(p).decode("ascii") for p in payloads]
        out[name] = (header, json.dumps(twin, indent=2, ensure_ascii=False) + "\n")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    stale = []
    built = build()
    for name, (header, twin) in built.items():
        bin_path, json_path = VECTORS / f"{name}.bin", VECTORS / f"{name}.json"
        same = bin_path.exists() and bin_path.read_bytes() == header and json_path.read_text("utf-8") == twin
        if not same:
            stale.append(name)
            if not args.check:
                VECTORS.mkdir(exist_ok=True)
                bin_path.write_bytes(header)
                json_path.write_text(twin, "utf-8")
    extra = {p.stem for p in VECTORS.glob("*.bin")} - set(built)
    if args.check and (stale or extra):
        print("vectors differ:", *sorted(set(stale) | extra))
        return 1
    print(f"{len(built)} vectors, {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
