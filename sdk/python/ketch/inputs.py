"""Inputs converted to an app's input type, the same way wherever they come from.

The rule (docs/cli.md): a value becomes the app's type when no value changes on the way:
float32 or integers into a float64 app, whole numbers into an integer app, 0/1 into a bool
app; numbers into a float app of less precision are rounded to it, as parsing decimal text
is. A fraction for an integer app, 300 for uint8, 2**53 + 1 for float64, text for a
number are refused with a message in plain words, never rounded or wrapped. The CLI uses
``to_input`` on JSON values; the broker uses ``cast_lossless`` on a query whose dtype is
not its app's (``ketchd.admission``), so the Python, Java and R clients, the CLI and the
HTTP gateway (``ketch.gateway.values``) all accept and refuse the same inputs.
"""

from __future__ import annotations

import base64
import warnings
from typing import Any

import numpy as np

from ketch import protocol as proto

TEXT_TYPES = ("string", "bytes", "json")
_KIND_WORDS = {"b": "true/false values", "i": "whole numbers", "u": "whole numbers", "f": "numbers"}


def describe_type(input_type: str) -> str:
    """An input type in words: 'float64 numbers', 'int64 whole numbers', 'text'."""
    if input_type in TEXT_TYPES:
        return {"string": "text (a JSON string)", "bytes": "bytes", "json": "any JSON value"}[input_type]
    kind = np.dtype(input_type).kind
    return f"{input_type} {_KIND_WORDS.get(kind, 'values')}"


def cast_lossless(arr: np.ndarray, want: np.dtype | str, what: str = "input") -> np.ndarray:
    """``arr`` as dtype ``want`` when every value survives the trip; ValueError saying why not."""
    want = np.dtype(want)
    if arr.dtype == want:
        return arr
    kind = arr.dtype.kind
    if kind not in "biuf":
        found = {"U": "text", "S": "bytes", "O": "mixed or nested values"}.get(kind, arr.dtype.name)
        raise ValueError(f"{what} holds {found}; the app takes {describe_type(want.name)}")
    if arr.size == 0 or (kind == "b" and want.kind in "iuf"):
        return arr.astype(want)
    if kind == "f" and want.kind in "iub" and not np.isfinite(arr).all():
        raise ValueError(f"{what} holds NaN or infinity; the app takes {describe_type(want.name)}")
    exact = 2 ** (np.finfo(arr.dtype).nmant + 1) if kind == "f" else 0  # 2**53 for float64
    if kind == "f" and want.kind in "iu" and (np.abs(arr) > exact).any():
        # past it a float is not every integer: it may be one rounded on its way here (by a
        # JSON parser, or a gateway holding an app's old type), so it is not taken as exact
        bad = arr[np.abs(arr) > exact].flat[0]
        raise ValueError(
            f"{what}: {bad:g} is a {arr.dtype.name} past 2**{np.finfo(arr.dtype).nmant + 1}, where "
            f"its values skip integers; the app takes {describe_type(want.name)}: send integers"
        )
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        out = arr.astype(want)
        back = out.astype(arr.dtype)
    if kind == "f" and want.kind == "f":
        # decimal numbers are rounded to the nearest float of the app's precision, as parsing
        # JSON text does (the HTTP gateway too); only a value too large for it is refused
        if (np.isfinite(out) | ~np.isfinite(arr)).all():
            return out
        raise ValueError(f"{what}: values too large for {want.name}")
    if np.array_equal(back, arr, equal_nan=kind == "f"):
        return out
    if want.kind == "b":
        raise ValueError(f"{what}: a bool app takes true/false or 0/1")
    if want.kind in "iu" and kind == "f" and not (arr == np.trunc(arr)).all():
        bad = arr[arr != np.trunc(arr)].flat[0]
        raise ValueError(f"{what}: {bad:g} is not a whole number; the app takes {describe_type(want.name)}")
    if want.kind in "iu":
        info = np.iinfo(want)
        raise ValueError(
            f"{what}: values {arr.min():g}..{arr.max():g} do not fit {want.name} ({info.min}..{info.max})"
        )
    raise ValueError(f"{what}: its values would change as {want.name} (too large or too precise)")


def to_input(value: Any, input_type: str, what: str = "input") -> Any:
    """A JSON value (from ``--input``) as what a client sends to an app of ``input_type``:
    an array of the app's dtype, str, bytes (from text: UTF-8, or base64 with ``b64:``) or
    the JSON value itself (sent with dtype json)."""
    if input_type == "json":
        return value
    if input_type == "string":
        if not isinstance(value, str):
            raise ValueError(f"{what}: the app takes text; quote it as a JSON string: '\"text\"'")
        return value
    if input_type == "bytes":
        if not isinstance(value, str):
            raise ValueError(f"{what}: the app takes bytes; give text (sent as UTF-8) or b64:BASE64")
        return base64.b64decode(value[4:], validate=True) if value.startswith("b64:") else value.encode()
    if isinstance(value, dict) or value is None or isinstance(value, str):
        found = "text" if isinstance(value, str) else "null" if value is None else "an object"
        raise ValueError(f"{what} is {found}; the app takes {describe_type(input_type)}, e.g. [1.0, 2.0]")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        arr = np.asarray(value, dtype=object)
    if arr.dtype.kind == "O":
        raise ValueError(f"{what} is not a rectangular list of numbers (rows of different lengths?)")
    return cast_lossless(arr, proto.NUMPY_DTYPES[proto.dtype_code(input_type)], what)
