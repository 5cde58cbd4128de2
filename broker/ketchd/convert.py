"""A query whose numeric dtype is not its app's, converted when no value changes.

float32 or integer inputs for a float64 app, whole float64 numbers for an int64 app, and so
on (``ketch.inputs.cast_lossless`` is the rule, shared with the CLI and the HTTP gateway):
the broker converts the payloads once at admission and the query continues as if sent in
the app's dtype (cache, batching, replicas). Only queries that would otherwise be refused
take this path; a value that would change is refused with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zmq
from ketch import protocol as proto
from ketch.inputs import cast_lossless

from ketchd.registry import App


def to_app_dtype(app: App, dtype: int, shape: tuple[int, ...], payloads: list[Any]) -> tuple[list[Any], str]:
    """``payloads`` (of ``dtype``) as frames of the app's dtype, and "" when every item converts;
    ``([], why)`` when a value would change; ``([], "")`` when conversion does not apply
    (text, another shape, a payload of the wrong size: the usual checks answer those)."""
    src, want = proto.NUMPY_DTYPES.get(dtype), proto.NUMPY_DTYPES.get(app.input_dtype)
    expected = app.input_shape
    if src is None or want is None or len(expected) != len(shape) or any(s < 0 for s in shape):
        return [], ""
    if not all(w < 0 or w == s for w, s in zip(expected, shape, strict=True)):
        return [], ""
    nbytes = proto.expected_nbytes(dtype, shape)
    out = []
    for i, frame in enumerate(payloads):
        if nbytes is None or len(frame) != nbytes:
            return [], ""
        arr = np.frombuffer(frame.buffer if hasattr(frame, "buffer") else frame, src).reshape(shape)
        try:
            converted = cast_lossless(arr, want, f"item {i}")
        except ValueError as exc:
            return [], (
                f"app {app.name!r} takes {proto.dtype_name(app.input_dtype)} inputs, got "
                f"{proto.dtype_name(dtype)} that do not convert: {exc}"
            )
        out.append(zmq.Frame(np.ascontiguousarray(converted, dtype=want).tobytes()))
    return out, ""
