"""Payload frames: values to and from the bytes of a wire dtype (docs/protocol.md section 2).

A numeric payload is the little-endian, C-order bytes of an array; ``BYTES`` is opaque,
``STRING`` UTF-8 and ``JSON`` UTF-8 JSON text (empty means null). Reading a payload raises
only ``DecodeError``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ketch.protocol.codec import DTYPE_CODES, DTYPE_NAMES, DecodeError
from ketch.protocol.schema import DType

# numpy dtype of each numeric wire dtype (little-endian on the wire)
NUMPY_DTYPES: dict[int, np.dtype[Any]] = {
    DType.BOOL: np.dtype("bool"),
    DType.INT8: np.dtype("<i1"),
    DType.INT16: np.dtype("<i2"),
    DType.INT32: np.dtype("<i4"),
    DType.INT64: np.dtype("<i8"),
    DType.UINT8: np.dtype("<u1"),
    DType.UINT16: np.dtype("<u2"),
    DType.UINT32: np.dtype("<u4"),
    DType.UINT64: np.dtype("<u8"),
    DType.FLOAT16: np.dtype("<f2"),
    DType.FLOAT32: np.dtype("<f4"),
    DType.FLOAT64: np.dtype("<f8"),
}
BYTES, STRING, JSON = DType.BYTES, DType.STRING, DType.JSON
BOOL, INT64, FLOAT64 = DType.BOOL, DType.INT64, DType.FLOAT64
TEXT_DTYPES = (BYTES, STRING, JSON)
# wire dtype of each numpy dtype, in native byte order (``dtype.newbyteorder("=")``)
WIRE_DTYPES: dict[np.dtype[Any], int] = {np.dtype(v).newbyteorder("="): k for k, v in NUMPY_DTYPES.items()}


def dtype_code(name: str) -> int:
    try:
        return DTYPE_CODES[name.upper()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}; one of {', '.join(d.lower() for d in DTYPE_CODES)}"
        ) from None


def dtype_name(code: int) -> str:
    return DTYPE_NAMES.get(code, str(code)).lower()


def value_to_payload(
    value: Any, dtype: int, shape: Sequence[int] | None = None
) -> tuple[tuple[int, ...], bytes | memoryview]:
    """Encode one input or output as (shape, payload) for a wire dtype."""
    if dtype == JSON:
        return (), json.dumps(value, separators=(",", ":")).encode("utf-8")
    if dtype == STRING:
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if not isinstance(value, str):
            raise TypeError(f"a string input must be str, not {type(value).__name__}")
        return (), value.encode("utf-8")
    if dtype == BYTES:
        if isinstance(value, str):
            raise TypeError("a bytes input must be bytes, not str")
        return (), bytes(value)
    arr = np.asarray(value)
    want = NUMPY_DTYPES[dtype]
    if arr.dtype != want:
        if arr.dtype.kind in "OUSV" or (arr.dtype.kind == "f" and want.kind in "iub"):
            raise TypeError(f"input of dtype {arr.dtype} cannot be sent as {dtype_name(dtype)}")
        arr = arr.astype(want)
    arr = arr.astype(want, order="C", copy=False)
    if shape is not None and tuple(shape) != arr.shape and not _shape_matches(shape, arr.shape):
        raise ValueError(f"input shape {arr.shape} does not match {tuple(shape)}")
    view: memoryview = memoryview(arr)  # type: ignore[arg-type]  # numpy arrays are buffers
    return arr.shape, view.cast("B")


def _shape_matches(pattern: Sequence[int], shape: Sequence[int]) -> bool:
    return len(pattern) == len(shape) and all(p < 0 or p == s for p, s in zip(pattern, shape, strict=True))


def payload_to_value(dtype: int, shape: Iterable[int], payload: Any) -> Any:
    """Decode one payload frame of a wire dtype: a numpy array, str, bytes or JSON value.

    Raises DecodeError when the payload is not of that type and shape."""
    try:
        if dtype == JSON:
            return json.loads(bytes(payload).decode("utf-8")) if len(payload) else None
        if dtype == STRING:
            return bytes(payload).decode("utf-8")
        if dtype == BYTES:
            return bytes(payload)
        np_dtype = NUMPY_DTYPES.get(dtype)
        if np_dtype is None:
            raise DecodeError(f"unknown dtype code {dtype}")
        arr = np.frombuffer(payload, dtype=np_dtype).reshape(tuple(shape))
    except DecodeError:
        raise
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DecodeError(f"{dtype_name(dtype)} payload does not decode: {exc}") from None
    except RecursionError:  # JSON nested deeper than the interpreter's stack allows
        raise DecodeError(f"{dtype_name(dtype)} payload is nested too deep to decode") from None
    return arr[()] if arr.ndim == 0 else arr  # a scalar comes back as a numpy scalar


def expected_nbytes(dtype: int, shape: Sequence[int]) -> int | None:
    """Payload size implied by a numeric dtype and a concrete shape; None for text kinds."""
    np_dtype = NUMPY_DTYPES.get(dtype)
    if np_dtype is None:
        return None
    n = 1
    for d in shape:
        n *= d
    return n * np_dtype.itemsize


def encode_output(value: Any) -> tuple[int, tuple[int, ...], Any]:
    """(wire dtype, shape, payload) for one model output: str, bytes, bool, int, float, a
    numpy array or scalar of a wire dtype, anything else as JSON text."""
    if isinstance(value, str):
        return STRING, (), value.encode("utf-8")
    if isinstance(value, bytes | bytearray | memoryview):
        return BYTES, (), bytes(value)
    if isinstance(value, bool | np.bool_):
        return BOOL, (), np.bool_(value).tobytes()
    if isinstance(value, int) and not isinstance(value, bool):
        return INT64, (), np.int64(value).tobytes()
    if isinstance(value, float):
        return FLOAT64, (), np.float64(value).tobytes()
    if isinstance(value, np.ndarray | np.generic):
        arr = np.asarray(value)
        code = WIRE_DTYPES.get(arr.dtype.newbyteorder("="))
        if code is not None:
            arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)  # keeps 0-d as 0-d
            return code, arr.shape, arr.tobytes()
        value = arr.tolist()
    return JSON, (), json.dumps(value, default=_json_default, separators=(",", ":")).encode("utf-8")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot send a {type(obj).__name__} as output")
