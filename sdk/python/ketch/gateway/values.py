"""JSON values to Ketch inputs and Ketch outputs to JSON (pure functions, no I/O).

A JSON number list becomes an array of the app's own input dtype, so ``[1, 2, 3, 4]``
works for a float64 app and ``[1.0, 2.0]`` for an int64 app (whole numbers only). What
cannot be converted without losing information (a fraction for an integer app, 300 for
uint8, a string for a number) is refused with a message, never rounded or wrapped.
Bytes travel as base64 text in JSON, both ways.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np

from ketch import protocol as proto
from ketch.gateway.errors import bad_request

TEXT_TYPES = ("bytes", "string", "json")


def numpy_dtype(input_type: str) -> np.dtype | None:
    """The numpy dtype of a Ketch dtype name, None for the text kinds (and unknown names)."""
    try:
        return proto.NUMPY_DTYPES.get(proto.dtype_code(input_type))
    except ValueError:
        return None


def cast_array(arr: np.ndarray, want: np.dtype, what: str = "input") -> np.ndarray:
    """``arr`` as dtype ``want`` when no value changes; raises a 400 otherwise."""
    want = np.dtype(want)
    if arr.dtype == want:
        return arr
    kind = arr.dtype.kind
    if kind not in "biuf":
        raise bad_request(f"{what} holds {_kind_name(arr)}, the app takes {want.name} numbers")
    if np.can_cast(arr.dtype, want, "safe") or (kind == "f" and want.kind == "f"):
        return arr.astype(want)
    if want.kind == "b":
        if kind in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
            raise bad_request(f"{what}: a bool app takes true/false or 0/1")
        if kind == "f":
            raise bad_request(f"{what}: a bool app takes true/false or 0/1, not fractions")
        return arr.astype(want)
    if want.kind in "iu":
        if kind == "f" and arr.size and not (np.isfinite(arr).all() and (arr == np.trunc(arr)).all()):
            raise bad_request(f"{what}: the app takes {want.name} inputs; whole numbers only")
        if arr.size:
            info = np.iinfo(want)
            lo, hi = arr.min(), arr.max()
            if lo < info.min or hi > info.max:
                raise bad_request(
                    f"{what}: values {lo}..{hi} do not fit {want.name} ({info.min}..{info.max})"
                )
        return arr.astype(want)
    return arr.astype(want)  # integer or bool into float: exact enough for the sizes JSON carries


def _kind_name(arr: np.ndarray) -> str:
    return {"U": "text", "S": "bytes", "O": "mixed or nested values"}.get(arr.dtype.kind, arr.dtype.name)


def json_to_array(value: Any, want: np.dtype, what: str = "input") -> np.ndarray:
    """A JSON number, bool or (nested) list of them as an array of dtype ``want``."""
    if isinstance(value, dict) or value is None or isinstance(value, str):
        raise bad_request(f"{what} must be a number or a list of numbers for a {np.dtype(want).name} app")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        raise bad_request(f"{what} is not a rectangular list of numbers") from None
    if arr.dtype.kind == "O":
        raise bad_request(f"{what} is not a rectangular list of numbers")
    return cast_array(arr, want, what)


def clipper_input(value: Any, input_type: str, what: str = "input") -> Any:
    """One Clipper ``input`` as the value sent to the broker for an app of ``input_type``."""
    if input_type == "json":
        return value
    if input_type == "string":
        if not isinstance(value, str):
            raise bad_request(f"{what} must be a JSON string for a string app")
        return value
    if input_type == "bytes":
        if not isinstance(value, str):
            raise bad_request(f"{what} must be base64 text for a bytes app")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{what} is not valid base64") from None
    want = numpy_dtype(input_type)
    if want is None:
        raise bad_request(f"the app's input type {input_type!r} is not known to this gateway")
    return json_to_array(value, want, what)


def send_dtype(input_type: str) -> str | None:
    """The dtype to name when sending a converted input (only JSON needs saying)."""
    return "json" if input_type == "json" else None


def jsonable(value: Any) -> Any:
    """An output as a JSON value: arrays as lists, bytes as base64 text."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def dumps(doc: Any) -> bytes:
    """Compact JSON. NaN and infinities (a model may answer them) are written as null."""
    try:
        return json.dumps(doc, separators=(",", ":"), allow_nan=False, default=_default).encode("utf-8")
    except ValueError:  # out-of-range floats somewhere: replace them, rarely worth the walk
        return json.dumps(_finite(doc), separators=(",", ":"), default=_default).encode("utf-8")


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray | np.generic | bytes | bytearray | memoryview):
        return _finite(jsonable(obj))
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray | np.generic | bytes | bytearray | memoryview):
        return _finite(jsonable(obj))
    return obj
