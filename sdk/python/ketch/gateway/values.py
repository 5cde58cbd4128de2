"""JSON values to Ketch inputs and Ketch outputs to JSON (pure functions, no I/O).

A JSON number list becomes an array of the app's own input dtype, so ``[1, 2, 3, 4]``
works for a float64 app and ``[1.0, 2.0]`` for an int64 app (whole numbers only). What
cannot be converted without losing information (a fraction for an integer app, 300 for
uint8, a string for a number) is refused with a message, never rounded or wrapped.
Bytes travel as base64 text in JSON, both ways.

Integers are exact: an integer written without a fraction or exponent keeps every digit
(``[1, 2, 18446744073709551615]`` for a uint64 app is those three numbers, not floats); a
number written with a fraction or exponent is a double, as in any JSON reader, and goes
into an integer dtype only when it is whole and at most 2**53 in size (beyond that the text
may already have been rounded). Into a float dtype, numbers round to the nearest value of
that dtype, as any float parser does; a finite value beyond its range (1e39 for float32,
70000 for float16) is refused rather than made infinite.
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
    if want.kind == "f":
        return _to_float(arr, want, what)
    if np.can_cast(arr.dtype, want, "safe"):
        return arr.astype(want)
    if want.kind == "b":
        if kind in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
            raise bad_request(f"{what}: a bool app takes true/false or 0/1")
        if kind == "f" and not np.isin(arr, (0.0, 1.0)).all():  # 0.0 and 1.0 are 0 and 1 (JSON numbers)
            raise bad_request(f"{what}: a bool app takes true/false or 0/1, not fractions")
        return arr.astype(want)
    if kind == "f" and arr.size and not (np.isfinite(arr).all() and (arr == np.trunc(arr)).all()):
        raise bad_request(f"{what}: the app takes {want.name} inputs; whole numbers only")
    if arr.size:
        lo, hi = arr.min(), arr.max()
        if not _fits(lo, hi, want):
            info = np.iinfo(want)
            raise bad_request(f"{what}: values {lo}..{hi} do not fit {want.name} ({info.min}..{info.max})")
    return arr.astype(want)


def _fits(lo: Any, hi: Any, want: np.dtype) -> bool:
    """Whether numbers from ``lo`` to ``hi`` (numpy scalars or Python numbers) fit integer ``want``."""
    info = np.iinfo(want)
    if isinstance(lo, np.floating | float):
        # compare as floats against powers of two, which floats hold exactly: iinfo's max
        # (2**64 - 1, say) would round up to 2**64 and let 2**64 itself through
        bits = info.bits - (1 if want.kind == "i" else 0)
        return float(lo) >= float(info.min) and float(hi) < 2.0**bits
    return info.min <= int(lo) and int(hi) <= info.max


def _to_float(arr: np.ndarray, want: np.dtype, what: str) -> np.ndarray:
    """Numbers into a float dtype, rounded to the nearest; a finite value that would become
    infinite (past the dtype's range) is refused."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(want)
    widening = arr.dtype.kind == "f" and want.itemsize >= arr.dtype.itemsize
    if arr.size and not widening:
        overflow = ~np.isfinite(out)
        if arr.dtype.kind == "f":
            overflow &= np.isfinite(arr)
        if overflow.any():
            bad = arr[overflow].flat[0]
            limit = float(np.finfo(want).max)
            raise bad_request(f"{what}: {bad} is beyond what {want.name} holds (about ±{limit:.4g})")
    return out


def _kind_name(arr: np.ndarray) -> str:
    return {"U": "text", "S": "bytes", "O": "mixed or nested values"}.get(arr.dtype.kind, arr.dtype.name)


def whole(value: Any) -> int | None:
    """A JSON whole number as an int: ``3`` or ``3.0`` (JSON Schema's ``integer`` is both,
    and so is a number a client's JSON writer gave a fraction part), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def json_to_array(value: Any, want: np.dtype, what: str = "input") -> np.ndarray:
    """A JSON number, bool or (nested) list of them as an array of dtype ``want``, exactly."""
    want = np.dtype(want)
    if isinstance(value, dict) or value is None or isinstance(value, str):
        raise bad_request(f"{what} must be a number or a list of numbers for a {want.name} app")
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise bad_request(f"{what} is not a rectangular list of numbers") from None
    if arr.dtype.kind == "O" or (arr.dtype.kind == "f" and want.kind in "iu" and _past_exact(arr)):
        # integers past 64 bits, or mixed with others past what float64 holds exactly: numpy
        # made floats (or objects) of them, so read the JSON values themselves
        return _from_leaves(value, arr.shape, want, what)
    return cast_array(arr, want, what)


# every integer up to this size is a float64 exactly; past it, a float64 array may hold
# integers numpy rounded on the way in
_EXACT_IN_FLOAT64 = 2**53


def _past_exact(arr: np.ndarray) -> bool:
    return bool(np.max(np.abs(arr), initial=0.0, where=~np.isnan(arr)) > _EXACT_IN_FLOAT64)


def _from_leaves(value: Any, shape: tuple[int, ...], want: np.dtype, what: str) -> np.ndarray:
    """The slow, exact way: each JSON number as itself (Python ints keep every digit)."""
    try:
        leaves = np.array(value, dtype=object)
    except (ValueError, TypeError, RecursionError):
        raise bad_request(f"{what} is not a rectangular list of numbers") from None
    if leaves.shape != shape:
        raise bad_request(f"{what} is not a rectangular list of numbers")
    flat = leaves.ravel().tolist()
    if not set(map(type, flat)) <= {int, float, bool}:
        raise bad_request(f"{what} must hold only numbers for a {want.name} app")
    if want.kind == "f":
        try:
            floats = np.array([float(x) for x in flat], dtype=np.float64)
        except OverflowError:
            raise bad_request(f"{what}: a number is beyond what {want.name} holds") from None
        return _to_float(floats.reshape(shape), want, what)
    for x in flat:
        if type(x) is float and not (math.isfinite(x) and x.is_integer() and abs(x) <= _EXACT_IN_FLOAT64):
            raise bad_request(
                f"{what}: {x!r} is written as a float; a {want.name} app takes a float only when it "
                "is whole and at most 2**53 in size (write integers without a fraction or exponent)"
            )
    if want.kind == "b":
        if not set(flat) <= {0, 1}:
            raise bad_request(f"{what}: a bool app takes true/false or 0/1")
    elif flat:
        lo, hi = min(flat), max(flat)
        if not _fits(int(lo), int(hi), want):
            info = np.iinfo(want)
            raise bad_request(f"{what}: values {lo}..{hi} do not fit {want.name} ({info.min}..{info.max})")
    return leaves.astype(want).reshape(shape)


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


def exact_stack(values: list[Any]) -> np.ndarray | None:
    """Numeric answers of one shape as one array when stacking changes no value, else None.

    numpy promotes an int64 beside a uint64 (and Python integers past 2**63 beside negative
    ones) to float64, which rounds integers past 2**53: such a mix is not stacked.
    """
    parts = []
    for v in values:
        if isinstance(v, bool | int | float | list):
            try:
                a = np.asarray(v)
            except (ValueError, TypeError, OverflowError, RecursionError):
                return None
            if a.dtype.kind == "f" and _past_exact(a) and _holds_big_int(v):
                return None
        elif isinstance(v, np.ndarray | np.generic):
            a = np.asarray(v)
        else:
            return None
        if a.dtype.kind not in "biuf" or (parts and a.shape != parts[0].shape):
            return None
        parts.append(a)
    if not parts:
        return None
    dtype = np.result_type(*parts)
    if dtype.kind == "f":
        exact = 2 ** (np.finfo(dtype).nmant + 1)  # integers up to this size survive the float
        for p in parts:
            if p.dtype.kind in "iu" and p.size and (int(p.max()) > exact or int(p.min()) < -exact):
                return None
    return np.stack(parts).astype(dtype, copy=False)


def _holds_big_int(value: Any) -> bool:
    leaves = np.array(value, dtype=object).ravel().tolist()
    return any(type(x) is int and abs(x) > _EXACT_IN_FLOAT64 for x in leaves)


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
