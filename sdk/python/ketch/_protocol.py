"""Codec for the Ketch wire protocol (schemas/ketch.fbs, docs/protocol.md).

A message is ``[header][payload...]``: the header is one flatbuffer whose root is an
``Envelope`` holding a protocol version and one body (a union member); payloads are raw
frames. This module is the Python reference encoder: ``encode`` given the same fields
produces the same bytes as the golden vectors in ``schemas/vectors/``.

``SPEC`` lists every body's fields in schema order with a kind; ``encode`` and
``to_dict`` are driven by it, so each message is described once. Hot paths build and
read the generated accessors directly through the small helpers at the bottom.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flatbuffers
import numpy as np

from ketch.wire import Body, DType, ErrorCode, Status
from ketch.wire import Envelope as EnvelopeMod

PROTOCOL_VERSION = 1
IDENTIFIER = b"KTCH"

# ---------------------------------------------------------------- enums as names

DTYPE_NAMES: dict[int, str] = {v: k for k, v in vars(DType.DType).items() if k.isupper()}
DTYPE_CODES: dict[str, int] = {k: v for v, k in DTYPE_NAMES.items()}
ERROR_NAMES: dict[int, str] = {v: k for k, v in vars(ErrorCode.ErrorCode).items() if k.isupper()}
ERROR_CODES: dict[str, int] = {k: v for v, k in ERROR_NAMES.items()}
STATUS_NAMES: dict[int, str] = {v: k for k, v in vars(Status.Status).items() if k.isupper()}
STATUS_CODES: dict[str, int] = {k: v for v, k in STATUS_NAMES.items()}
BODY_NAMES: dict[int, str] = {v: k for k, v in vars(Body.Body).items() if k[0].isupper() and k != "NONE"}
BODY_CODES: dict[str, int] = {k: v for v, k in BODY_NAMES.items()}

# numpy dtype of each numeric wire dtype (little-endian on the wire)
NUMPY_DTYPES: dict[int, np.dtype] = {
    DType.DType.BOOL: np.dtype("bool"),
    DType.DType.INT8: np.dtype("<i1"),
    DType.DType.INT16: np.dtype("<i2"),
    DType.DType.INT32: np.dtype("<i4"),
    DType.DType.INT64: np.dtype("<i8"),
    DType.DType.UINT8: np.dtype("<u1"),
    DType.DType.UINT16: np.dtype("<u2"),
    DType.DType.UINT32: np.dtype("<u4"),
    DType.DType.UINT64: np.dtype("<u8"),
    DType.DType.FLOAT16: np.dtype("<f2"),
    DType.DType.FLOAT32: np.dtype("<f4"),
    DType.DType.FLOAT64: np.dtype("<f8"),
}
BYTES, STRING, JSON = DType.DType.BYTES, DType.DType.STRING, DType.DType.JSON
BOOL, INT64, FLOAT64 = DType.DType.BOOL, DType.DType.INT64, DType.DType.FLOAT64
TEXT_DTYPES = (BYTES, STRING, JSON)


# ---------------------------------------------------------------- field table

# kind of each field: scalar kinds name a flatbuffers scalar; "dtype", "code" and
# "status" are enums written as names in JSON; "[x]" is a vector; "Tensor", "Output"
# and "ReplyItem" are sub-tables.
SPEC: dict[str, list[tuple[str, str]]] = {
    "Tensor": [("dtype", "dtype"), ("shape", "[i64]")],
    "Query": [
        ("app", "str"),
        ("dtype", "dtype"),
        ("shape", "[i64]"),
        ("request_ids", "[u64]"),
        ("timeout_us", "u32"),
        ("priority", "i8"),
        ("context", "str"),
    ],
    "ReplyItem": [
        ("request_id", "u64"),
        ("status", "status"),
        ("output", "Tensor"),
        ("error", "code"),
        ("message", "str"),
        ("model", "str"),
        ("model_version", "str"),
        ("latency_us", "u32"),
        ("confidence", "f32"),
        ("models_answered", "[str]"),
        ("models_missing", "[str]"),
        ("retry_after_ms", "u32"),
    ],
    "Reply": [("items", "[ReplyItem]")],
    "Feedback": [
        ("app", "str"),
        ("request_id", "u64"),
        ("query_id", "u64"),
        ("input", "Tensor"),
        ("label", "Tensor"),
        ("context", "str"),
    ],
    "Hello": [
        ("model", "str"),
        ("model_version", "str"),
        ("input", "Tensor"),
        ("sdk", "str"),
        ("replica_id", "str"),
        ("credits", "u32"),
        ("max_batch", "u32"),
        ("deterministic", "bool"),
        ("pid", "u32"),
    ],
    "Welcome": [("heartbeat_ms", "u32"), ("dead_after_ms", "u32")],
    "Ready": [("credits", "u32")],
    "Heartbeat": [("busy", "bool")],
    "PredictRequest": [
        ("batch_id", "u64"),
        ("model", "str"),
        ("model_version", "str"),
        ("dtype", "dtype"),
        ("ndim", "u8"),
        ("shapes", "[i64]"),
        ("budgets_us", "[u32]"),
    ],
    "Output": [
        ("status", "status"),
        ("output", "Tensor"),
        ("error", "code"),
        ("message", "str"),
    ],
    "PredictReply": [
        ("batch_id", "u64"),
        ("compute_us", "u32"),
        ("outputs", "[Output]"),
        ("error", "code"),
        ("message", "str"),
    ],
    "Goodbye": [("reason", "str")],
    "Shutdown": [("reason", "str")],
    "Error": [
        ("code", "code"),
        ("message", "str"),
        ("request_id", "u64"),
        ("retry_after_ms", "u32"),
    ],
}

# schema defaults that differ from zero; a field equal to its default is not written
DEFAULTS: dict[tuple[str, str], Any] = {
    ("ReplyItem", "confidence"): 1.0,
    ("Hello", "credits"): 2,
    ("Hello", "deterministic"): True,
}

_VECTOR_NUMPY = {"[i64]": "<i8", "[u64]": "<u8", "[u32]": "<u4"}
_ENUM_CODES = {"dtype": DTYPE_CODES, "code": ERROR_CODES, "status": STATUS_CODES}
_ENUM_NAMES = {"dtype": DTYPE_NAMES, "code": ERROR_NAMES, "status": STATUS_NAMES}


class DecodeError(ValueError):
    """A header frame that is not a valid Ketch envelope."""


# what reading a field of a corrupt flatbuffer can raise (accessors are lazy, unchecked)
FIELD_ERRORS: tuple[type[BaseException], ...] = (
    IndexError,
    ValueError,
    TypeError,
    OverflowError,
    AttributeError,
    UnicodeDecodeError,
    __import__("struct").error,
)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _module(table: str):
    return importlib.import_module(f"ketch.wire.{table}")


_MODULES = {name: _module(name) for name in SPEC}
_CLASSES = {name: getattr(mod, name) for name, mod in _MODULES.items()}


# ---------------------------------------------------------------- generic encoder


def _build_table(b: flatbuffers.Builder, table: str, fields: Mapping[str, Any]) -> int:
    unknown = set(fields) - {name for name, _ in SPEC[table]}
    if unknown:
        raise ValueError(f"{table} has no field(s) {sorted(unknown)}")
    mod = _MODULES[table]
    offsets: dict[str, int] = {}
    # children first: strings, vectors and sub-tables must be finished before Start
    for name, kind in SPEC[table]:
        value = fields.get(name)
        if value is None:
            continue
        if kind.startswith("[") and len(value) == 0:
            continue  # an empty vector is written as absent: both decode as []
        if kind == "str":
            if value != "":
                offsets[name] = b.CreateString(value)
        elif kind in _VECTOR_NUMPY:
            offsets[name] = b.CreateNumpyVector(np.asarray(value, dtype=_VECTOR_NUMPY[kind]))
        elif kind == "[str]":
            strings = [b.CreateString(s) for s in value]
            offsets[name] = _vector_of_offsets(b, mod, name, strings)
        elif kind.startswith("["):
            children = [_build_table(b, kind[1:-1], item) for item in value]
            offsets[name] = _vector_of_offsets(b, mod, name, children)
        elif kind in SPEC:
            offsets[name] = _build_table(b, kind, value)
    mod.Start(b)
    for name, kind in SPEC[table]:
        add = getattr(mod, "Add" + _camel(name))
        if name in offsets:
            add(b, offsets[name])
            continue
        value = fields.get(name)
        if value is None or kind == "str" or kind.startswith("[") or kind in SPEC:
            continue
        if kind in _ENUM_CODES:
            value = _ENUM_CODES[kind][value] if isinstance(value, str) else int(value)
        if value == DEFAULTS.get((table, name), 0):
            continue
        add(b, value)
    return mod.End(b)


def _vector_of_offsets(b: flatbuffers.Builder, mod, name: str, offsets: Sequence[int]) -> int:
    getattr(mod, "Start" + _camel(name) + "Vector")(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def encode(body: str, fields: Mapping[str, Any] | None = None, *, version: int = PROTOCOL_VERSION) -> bytes:
    """Header frame for ``body`` (a union member name) with ``fields`` (names as in SPEC)."""
    b = flatbuffers.Builder(128)
    root = _build_table(b, body, fields or {})
    return _finish(b, BODY_CODES[body], root, version)


def _finish(b: flatbuffers.Builder, body_type: int, root: int, version: int = PROTOCOL_VERSION) -> bytes:
    """Wrap a finished body table in the Envelope and return the header bytes."""
    EnvelopeMod.Start(b)
    EnvelopeMod.AddVersion(b, version)
    EnvelopeMod.AddBodyType(b, body_type)
    EnvelopeMod.AddBody(b, root)
    b.Finish(EnvelopeMod.End(b), file_identifier=IDENTIFIER)
    return bytes(b.Output())


# ---------------------------------------------------------------- decoding


def decode(frame: bytes | memoryview) -> tuple[int, str, Any]:
    """Parse a header frame: (protocol version, body name, generated accessor of the body).

    Raises DecodeError for anything that is not a Ketch envelope. Field access on the
    returned accessor is lazy; callers read only what they need.
    """
    buf = frame if isinstance(frame, bytes) else bytes(frame)
    if len(buf) < 12 or buf[4:8] != IDENTIFIER:
        raise DecodeError("header is not a Ketch envelope (missing KTCH identifier)")
    try:
        # the Envelope's three fields, read as the generated accessors read them
        pos = _RU32(buf, 0)[0]
        vt = pos - _RI32(buf, pos)[0]
        if vt < 0:  # struct would read from the end; flatbuffers refuses a negative offset
            raise IndexError(f"vtable at negative offset {vt}")
        vt_end = _RU16(buf, vt)[0]
        off = _RU16(buf, vt + 4)[0] if vt_end > 4 else 0
        version = _RU16(buf, pos + off)[0] if off else 0
        off = _RU16(buf, vt + 6)[0] if vt_end > 6 else 0
        body_type = _RU8(buf, pos + off)[0] if off else 0
        name = BODY_NAMES.get(body_type)
        if name is None:
            raise DecodeError(f"unknown message type {body_type}")
        off = _RU16(buf, vt + 8)[0] if vt_end > 8 else 0
        if not off:
            raise DecodeError(f"{name} without a body")
        obj = _CLASSES[name]()
        obj.Init(buf, pos + off + _RU32(buf, pos + off)[0])
    except DecodeError:
        raise
    except Exception as exc:  # flatbuffers raises struct/index errors on bad offsets
        raise DecodeError(f"header does not decode: {type(exc).__name__}: {exc}") from None
    return version, name, obj


def table_to_dict(table: str, obj: Any) -> dict[str, Any]:
    """Every field of a decoded table as plain values (enums as names)."""
    out: dict[str, Any] = {}
    for name, kind in SPEC[table]:
        getter = _camel(name)
        if kind == "str":
            raw = getattr(obj, getter)()
            out[name] = raw.decode("utf-8") if raw is not None else ""
        elif kind in _VECTOR_NUMPY:
            n = getattr(obj, getter + "Length")()
            out[name] = [int(getattr(obj, getter)(i)) for i in range(n)]
        elif kind == "[str]":
            n = getattr(obj, getter + "Length")()
            out[name] = [getattr(obj, getter)(i).decode("utf-8") for i in range(n)]
        elif kind.startswith("["):
            n = getattr(obj, getter + "Length")()
            out[name] = [table_to_dict(kind[1:-1], getattr(obj, getter)(i)) for i in range(n)]
        elif kind in SPEC:
            child = getattr(obj, getter)()
            out[name] = table_to_dict(kind, child) if child is not None else None
        elif kind in _ENUM_NAMES:
            value = getattr(obj, getter)()
            out[name] = _ENUM_NAMES[kind].get(value, value)
        elif kind == "bool":
            out[name] = bool(getattr(obj, getter)())
        elif kind == "f32":
            out[name] = float(getattr(obj, getter)())
        else:
            out[name] = int(getattr(obj, getter)())
    return out


def to_dict(frame: bytes) -> dict[str, Any]:
    """A header frame as ``{"type", "version", "body"}``, the shape of the JSON twins.

    Raises DecodeError for anything that does not decode, down to the last field.
    """
    version, name, obj = decode(frame)
    try:
        body = table_to_dict(name, obj)
    except FIELD_ERRORS as exc:
        raise DecodeError(f"{name} does not decode: {type(exc).__name__}: {exc}") from None
    return {"type": name, "version": version, "body": body}


def from_dict(message: Mapping[str, Any]) -> bytes:
    """Inverse of ``to_dict``: the header frame for a JSON twin."""
    return encode(message["type"], message.get("body", {}), version=message.get("version", PROTOCOL_VERSION))


# ---------------------------------------------------------------- tensors


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
    return arr.shape, memoryview(arr).cast("B")


def _shape_matches(pattern: Sequence[int], shape: Sequence[int]) -> bool:
    return len(pattern) == len(shape) and all(p < 0 or p == s for p, s in zip(pattern, shape, strict=True))


def payload_to_value(dtype: int, shape: Iterable[int], payload: bytes | memoryview) -> Any:
    """Decode one payload frame of a wire dtype: a numpy array, str, bytes or JSON value."""
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


# ---------------------------------------------------------------- hot-path builders
#
# The generic ``encode`` costs a dictionary walk per field. The broker and the runtime
# build their frequent messages with these direct builders instead; each one writes the
# same fields in the same order as ``encode`` would, so the bytes are identical (tested).

from ketch.wire import Output as _Out  # noqa: E402
from ketch.wire import PredictReply as _PRep  # noqa: E402
from ketch.wire import PredictRequest as _PReq  # noqa: E402
from ketch.wire import Query as _Q  # noqa: E402
from ketch.wire import Reply as _Rep  # noqa: E402
from ketch.wire import ReplyItem as _RI  # noqa: E402
from ketch.wire import Tensor as _T  # noqa: E402

_B = Body.Body
_I64 = np.dtype("<i8")
_U64 = np.dtype("<u8")
_U32 = np.dtype("<u4")


def _tensor(b: flatbuffers.Builder, dtype: int, shape: Sequence[int]) -> int:
    shape_off = b.CreateNumpyVector(np.asarray(shape, dtype=_I64)) if len(shape) else None
    _T.Start(b)
    if dtype:
        _T.AddDtype(b, dtype)
    if shape_off is not None:
        _T.AddShape(b, shape_off)
    return _T.End(b)


def build_query(
    app: str,
    dtype: int,
    shape: Sequence[int],
    request_ids: Sequence[int],
    timeout_us: int = 0,
    priority: int = 0,
    context: str = "",
) -> bytes:
    b = flatbuffers.Builder(96 + 8 * len(request_ids))
    app_off = b.CreateString(app) if app else None
    shape_off = b.CreateNumpyVector(np.asarray(shape, dtype=_I64)) if len(shape) else None
    ids_off = b.CreateNumpyVector(np.asarray(request_ids, dtype=_U64))
    ctx_off = b.CreateString(context) if context else None
    _Q.Start(b)
    if app_off is not None:
        _Q.AddApp(b, app_off)
    if dtype:
        _Q.AddDtype(b, dtype)
    if shape_off is not None:
        _Q.AddShape(b, shape_off)
    _Q.AddRequestIds(b, ids_off)
    if timeout_us:
        _Q.AddTimeoutUs(b, timeout_us)
    if priority:
        _Q.AddPriority(b, priority)
    if ctx_off is not None:
        _Q.AddContext(b, ctx_off)
    return _finish(b, _B.Query, _Q.End(b))


class ReplyFields:
    """One ReplyItem to build; a plain slotted record for the broker's hot path."""

    __slots__ = (
        "confidence",
        "dtype",
        "error",
        "latency_us",
        "message",
        "model",
        "model_version",
        "models_answered",
        "models_missing",
        "request_id",
        "retry_after_ms",
        "shape",
        "status",
    )

    def __init__(
        self,
        request_id: int,
        status: int,
        dtype: int | None = None,
        shape: Sequence[int] | None = None,
        error: int = 0,
        message: str = "",
        model: str = "",
        model_version: str = "",
        latency_us: int = 0,
        confidence: float = 1.0,
        models_answered: Sequence[str] = (),
        models_missing: Sequence[str] = (),
        retry_after_ms: int = 0,
    ) -> None:
        self.request_id = request_id
        self.status = status
        self.dtype = dtype
        self.shape = shape
        self.error = error
        self.message = message
        self.model = model
        self.model_version = model_version
        self.latency_us = latency_us
        self.confidence = confidence
        self.models_answered = models_answered
        self.models_missing = models_missing
        self.retry_after_ms = retry_after_ms


def _string_vector(b: flatbuffers.Builder, strings: Sequence[str], cache: dict[str, int], start) -> int:
    offs = [cache.get(s) or cache.setdefault(s, b.CreateString(s)) for s in strings]
    start(b, len(offs))
    for off in reversed(offs):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def build_reply(items: Sequence[ReplyFields]) -> bytes:
    b = flatbuffers.Builder(160 * len(items))
    strings: dict[str, int] = {}

    def s(text: str) -> int | None:
        if not text:
            return None
        off = strings.get(text)
        if off is None:
            off = strings[text] = b.CreateString(text)
        return off

    item_offs = []
    for it in items:
        out_off = _tensor(b, it.dtype, it.shape or ()) if it.dtype is not None else None
        msg_off = s(it.message)
        model_off = s(it.model)
        ver_off = s(it.model_version)
        ans_off = (
            _string_vector(b, it.models_answered, strings, _RI.StartModelsAnsweredVector)
            if it.models_answered
            else None
        )
        mis_off = (
            _string_vector(b, it.models_missing, strings, _RI.StartModelsMissingVector)
            if it.models_missing
            else None
        )
        _RI.Start(b)
        if it.request_id:
            _RI.AddRequestId(b, it.request_id)
        if it.status:
            _RI.AddStatus(b, it.status)
        if out_off is not None:
            _RI.AddOutput(b, out_off)
        if it.error:
            _RI.AddError(b, it.error)
        if msg_off is not None:
            _RI.AddMessage(b, msg_off)
        if model_off is not None:
            _RI.AddModel(b, model_off)
        if ver_off is not None:
            _RI.AddModelVersion(b, ver_off)
        if it.latency_us:
            _RI.AddLatencyUs(b, it.latency_us)
        if it.confidence != 1.0:
            _RI.AddConfidence(b, it.confidence)
        if ans_off is not None:
            _RI.AddModelsAnswered(b, ans_off)
        if mis_off is not None:
            _RI.AddModelsMissing(b, mis_off)
        if it.retry_after_ms:
            _RI.AddRetryAfterMs(b, it.retry_after_ms)
        item_offs.append(_RI.End(b))
    _Rep.StartItemsVector(b, len(item_offs))
    for off in reversed(item_offs):
        b.PrependUOffsetTRelative(off)
    vec = b.EndVector()
    _Rep.Start(b)
    _Rep.AddItems(b, vec)
    return _finish(b, _B.Reply, _Rep.End(b))


def build_predict_request(
    batch_id: int,
    model: str,
    model_version: str,
    dtype: int,
    ndim: int,
    shapes: np.ndarray | Sequence[int],
    budgets_us: np.ndarray | Sequence[int],
) -> bytes:
    b = flatbuffers.Builder(128 + 8 * len(shapes) + 4 * len(budgets_us))
    model_off = b.CreateString(model) if model else None
    ver_off = b.CreateString(model_version) if model_version else None
    shapes_off = b.CreateNumpyVector(np.asarray(shapes, dtype=_I64)) if len(shapes) else None
    budgets_off = b.CreateNumpyVector(np.asarray(budgets_us, dtype=_U32))
    _PReq.Start(b)
    if batch_id:
        _PReq.AddBatchId(b, batch_id)
    if model_off is not None:
        _PReq.AddModel(b, model_off)
    if ver_off is not None:
        _PReq.AddModelVersion(b, ver_off)
    if dtype:
        _PReq.AddDtype(b, dtype)
    if ndim:
        _PReq.AddNdim(b, ndim)
    if shapes_off is not None:
        _PReq.AddShapes(b, shapes_off)
    _PReq.AddBudgetsUs(b, budgets_off)
    return _finish(b, _B.PredictRequest, _PReq.End(b))


def build_predict_reply(
    batch_id: int,
    compute_us: int,
    outputs: Sequence[tuple[int, int, Sequence[int], int, str]],
    error: int = 0,
    message: str = "",
) -> bytes:
    """``outputs``: (status, dtype, shape, error, message) per item; dtype None for none."""
    b = flatbuffers.Builder(64 + 48 * len(outputs))
    offs = []
    for status, dtype, shape, err, msg in outputs:
        tensor_off = _tensor(b, dtype, shape) if dtype is not None else None
        msg_off = b.CreateString(msg) if msg else None
        _Out.Start(b)
        if status:
            _Out.AddStatus(b, status)
        if tensor_off is not None:
            _Out.AddOutput(b, tensor_off)
        if err:
            _Out.AddError(b, err)
        if msg_off is not None:
            _Out.AddMessage(b, msg_off)
        offs.append(_Out.End(b))
    vec = None
    if outputs:
        _PRep.StartOutputsVector(b, len(offs))
        for off in reversed(offs):
            b.PrependUOffsetTRelative(off)
        vec = b.EndVector()
    msg_off = b.CreateString(message) if message else None
    _PRep.Start(b)
    if batch_id:
        _PRep.AddBatchId(b, batch_id)
    if compute_us:
        _PRep.AddComputeUs(b, compute_us)
    if vec is not None:
        _PRep.AddOutputs(b, vec)
    if error:
        _PRep.AddError(b, error)
    if msg_off is not None:
        _PRep.AddMessage(b, msg_off)
    return _finish(b, _B.PredictReply, _PRep.End(b))


def numpy_vector(obj: Any, name: str, dtype: np.dtype) -> np.ndarray:
    """A scalar vector field as a numpy array (empty when absent)."""
    arr = getattr(obj, name + "AsNumpy")()
    if isinstance(arr, int):  # flatbuffers returns 0 for an absent vector
        return np.empty(0, dtype=dtype)
    return arr


# ---------------------------------------------------------------- templates
#
# The most frequent messages differ from one another only in a few scalars (a request
# id, a latency, a budget). A template is such a message built once, with the byte
# positions of those scalars found by reading it back; rendering copies the bytes and
# writes the scalars in place. The result is an ordinary flatbuffer, identical to what the
# builder would produce with the same values (tested), at a small part of the cost.

import struct  # noqa: E402
from functools import lru_cache  # noqa: E402

_SENTINEL = 0x5A5A5A5A  # non-zero, so the builder writes the field; overwritten on render


@lru_cache(maxsize=16)
def _struct(fmt: str) -> struct.Struct:
    """One Struct per format for every template's slots (templates are many, formats two)."""
    return struct.Struct(fmt)


class Template:
    """A message prebuilt once, with slots for the values that change (ids, times).

    ``render`` writes values into a copy; ``match`` is the reverse, for a receiver that
    has learnt which messages a peer sends: the values of a message that is this template
    rendered, found with one copy and one comparison instead of a parse.
    """

    __slots__ = ("_restore", "data", "slots")

    def __init__(self, data: bytes, slots: tuple[tuple[int, str], ...]) -> None:
        self.data = data
        self.slots = slots  # (byte position, struct format) per patched value, in order
        self._restore = tuple(
            (_struct(fmt), pos, pos + _struct(fmt).size, data[pos : pos + _struct(fmt).size])
            for pos, fmt in slots
        )

    def render(self, *values: int) -> bytes:
        buf = bytearray(self.data)
        for (pos, fmt), value in zip(self.slots, values, strict=True):
            struct.pack_into(fmt, buf, pos, value)
        return bytes(buf)

    def match(self, data: Any) -> list[int] | None:
        """The slot values when ``data`` (any buffer) is this template rendered with them."""
        if len(data) != len(self.data):
            return None
        buf = bytearray(data)
        values = []
        for fmt, start, end, original in self._restore:
            values.append(fmt.unpack_from(buf, start)[0])
            buf[start:end] = original
        return values if buf == self.data else None


class LearntTemplates:
    """The templates a receiver has seen its peer render, by message length, each with what
    the receiver learnt alongside it (the parsed fields a match stands for).

    ``learn`` keeps a template only when the message just read the long way is that
    template rendered; ``match`` is then a dict lookup and one ``Template.match`` per
    template of that length. Bounded in all and per length: a peer that varies what it
    sends (shapes, models) costs at most ``per_length`` looks per message.
    """

    __slots__ = ("_by_length", "count", "per_length", "total")

    def __init__(self, total: int = 1024, per_length: int = 8) -> None:
        self._by_length: dict[int, list[tuple[Template, Any]]] = {}
        self.count = 0
        self.total, self.per_length = total, per_length

    def match(self, data: Any) -> tuple[list[int], Any] | None:
        """(slot values, what was learnt) of the template ``data`` (any buffer) renders."""
        for template, learnt in self._by_length.get(len(data), ()):
            values = template.match(data)
            if values is not None:
                return values, learnt
        return None

    @property
    def full(self) -> bool:
        return self.count >= self.total

    def learn(self, data: bytes, template: Template, learnt: Any) -> bool:
        """Keep ``template`` (with ``learnt``) if ``data`` is it rendered; whether it is kept."""
        known = self._by_length.get(len(data), [])
        if self.full or len(known) >= self.per_length or any(t is template for t, _ in known):
            return False
        if template.match(data) is None:
            return False
        self._by_length[len(data)] = [*known, (template, learnt)]
        self.count += 1
        return True

    def __bool__(self) -> bool:
        return self.count > 0


class Prebuilds:
    """Templates a sender builds ahead of need, one per ``step``, when it has nothing else to do.

    A message of ``n`` items is rendered from a template built once per ``n``; building one
    takes 0.1 to 1.3 ms by kind and size. Built on first use, the sizes a burst reaches would
    each cost that in the middle of the burst. ``want`` queues every size of a family (the
    template builder and its arguments but the size) the first time one is rendered; the
    owner calls ``step`` when idle. Bounded: at most ``limit`` families are ever queued.
    """

    __slots__ = ("_families", "_todo", "limit")

    def __init__(self, limit: int = 32) -> None:
        self._families: set[tuple[Callable[..., Template], tuple[Any, ...]]] = set()
        self._todo: deque[tuple[Callable[..., Template], tuple[Any, ...], int]] = deque()
        self.limit = limit

    def want(self, build: Callable[..., Template], args: tuple[Any, ...], sizes: range) -> None:
        """Queue ``build(*args, n)`` for each ``n`` in ``sizes`` (once per family)."""
        family = (build, args)
        if family in self._families or len(self._families) >= self.limit:
            return
        self._families.add(family)
        self._todo.extend((build, args, n) for n in sizes)

    def step(self) -> None:
        """Build the next template (its builder caches it)."""
        build, args, n = self._todo.popleft()
        with contextlib.suppress(Exception):  # built on first use instead, where errors are reported
            build(*args, n)

    def __bool__(self) -> bool:
        return bool(self._todo)


def _field_pos(obj: Any, slot: int) -> int:
    """Absolute byte position of a table's scalar field (vtable slot index)."""
    off = obj._tab.Offset(4 + 2 * slot)
    assert off, "template field was not written"
    return obj._tab.Pos + off


def _vector_pos(obj: Any, slot: int) -> int:
    """Absolute byte position of the first element of a table's vector field."""
    off = obj._tab.Offset(4 + 2 * slot)
    assert off, "template vector was not written"
    return obj._tab.Vector(off)


@lru_cache(maxsize=4096)
def reply_ok_many_template(
    model: str, model_version: str, dtype: int, shape: tuple[int, ...], n: int
) -> Template:
    """A Reply of ``n`` OK items of one model and output type; render(id_0, latency_0, id_1, ...)."""
    data = build_reply(
        [
            ReplyFields(
                _SENTINEL,
                Status.Status.OK,
                dtype,
                shape,
                model=model,
                model_version=model_version,
                latency_us=_SENTINEL,
                models_answered=(model,),
            )
        ]
        * n
    )
    _, _, reply = decode(data)
    positions = []
    for i in range(n):
        item = reply.Items(i)
        positions += [(_field_pos(item, 0), "<Q"), (_field_pos(item, 7), "<I")]
    return Template(data, tuple(positions))


@lru_cache(maxsize=4096)
def predict_template(
    model: str, model_version: str, dtype: int, shape: tuple[int, ...], n: int = 1
) -> Template:
    """A PredictRequest of ``n`` items of one shape; render(batch_id, budget_us_0, ...)."""
    data = build_predict_request(
        _SENTINEL, model, model_version, dtype, len(shape), list(shape) * n, [_SENTINEL] * n
    )
    _, _, req = decode(data)
    first = _vector_pos(req, 6)
    return Template(data, ((_field_pos(req, 0), "<Q"), *((first + 4 * i, "<I") for i in range(n))))


@lru_cache(maxsize=4096)  # up to 64 sizes per app and query type
def query_template(
    app: str, dtype: int, shape: tuple[int, ...], timeout_us: int, priority: int, context: str, n: int = 1
) -> Template:
    """A Query of ``n`` queries of one type; render(request_id_0, ..., request_id_n-1)."""
    data = build_query(app, dtype, shape, [_SENTINEL] * n, timeout_us, priority, context)
    _, _, q = decode(data)
    first = _vector_pos(q, 3)
    return Template(data, tuple((first + 8 * i, "<Q") for i in range(n)))


# ---------------------------------------------------------------- hot-path readers
#
# The generated accessors walk the vtable again for every field (three or four Python
# calls each). The readers below take a table's vtable once, as a tuple of field offsets
# (``slots``; 0 for an absent field), and read fields with ``struct``. They read the same
# bytes the generated code reads, return the schema default for an absent field, and raise
# struct.error or IndexError (both in FIELD_ERRORS) where the buffer is too short.

_RI32 = struct.Struct("<i").unpack_from
_RU8 = struct.Struct("<B").unpack_from
_RI8 = struct.Struct("<b").unpack_from
_RU16 = struct.Struct("<H").unpack_from
_RU32 = struct.Struct("<I").unpack_from
_RU64 = struct.Struct("<Q").unpack_from
_RF32 = struct.Struct("<f").unpack_from
_VT: dict[int, Any] = {n: struct.Struct(f"<{n}H").unpack_from for n in range(16)}
_VEC_ITEM = {"q": 8, "Q": 8, "I": 4}


_BEYOND = 1 << 62  # offset of a field whose vtable entry lies past the buffer: reading it fails


def slots(buf: bytes, pos: int) -> tuple[int, ...]:
    """Offsets of a table's fields (vtable order), 0 for fields it does not hold."""
    vt = pos - _RI32(buf, pos)[0]
    if vt < 0:
        raise IndexError(f"vtable at negative offset {vt}")
    n = (_RU16(buf, vt)[0] - 3) >> 1  # fields whose entry starts before the vtable's end
    if n <= 0:
        return ()
    reader = _VT.get(n) or struct.Struct(f"<{n}H").unpack_from
    try:
        return reader(buf, vt + 4)
    except struct.error:
        # a corrupt vtable running past the end: as with the generated accessors, the
        # fields it does hold read normally and only reading one of the others fails
        out = []
        for k in range(n):
            try:
                out.append(_RU16(buf, vt + 4 + 2 * k)[0])
            except struct.error:
                out.append(_BEYOND)
        return tuple(out)


def slot(s: tuple[int, ...], i: int) -> int:
    return s[i] if i < len(s) else 0


def read_str(buf: bytes, pos: int, off: int) -> bytes | None:
    """A string field (``off`` from ``slots``), None when absent, like the generated code."""
    if not off:
        return None
    at = pos + off
    at += _RU32(buf, at)[0]
    n = _RU32(buf, at)[0]
    return buf[at + 4 : at + 4 + n]


def read_vector(buf: bytes, pos: int, off: int, code: str) -> tuple[int, ...]:
    """A vector of scalars (struct code q, Q or I) as a tuple; () when absent."""
    if not off:
        return ()
    at = pos + off
    at += _RU32(buf, at)[0]
    n = _RU32(buf, at)[0]
    if not n:
        return ()
    if at + 4 + n * _VEC_ITEM[code] > len(buf):
        raise IndexError("vector runs past the end of the buffer")
    return struct.unpack_from(f"<{n}{code}", buf, at + 4)


def read_table(buf: bytes, pos: int, off: int) -> int | None:
    """Position of a sub-table field, None when absent."""
    if not off:
        return None
    at = pos + off
    return at + _RU32(buf, at)[0]


def read_length(buf: bytes, pos: int, off: int) -> int:
    """Number of elements of a vector field (0 when absent)."""
    if not off:
        return 0
    at = pos + off
    return _RU32(buf, at + _RU32(buf, at)[0])[0]


def read_tables(buf: bytes, pos: int, off: int) -> list[int]:
    """Positions of the tables of a vector-of-tables field."""
    if not off:
        return []
    at = pos + off
    at += _RU32(buf, at)[0]
    n = _RU32(buf, at)[0]
    if at + 4 + 4 * n > len(buf):
        raise IndexError("vector runs past the end of the buffer")
    first = at + 4
    return [first + 4 * i + _RU32(buf, first + 4 * i)[0] for i in range(n)]


def read_strings(buf: bytes, pos: int, off: int) -> tuple[str, ...]:
    """A vector of UTF-8 strings as a tuple of str; () when absent."""
    return tuple(
        buf[at + 4 : at + 4 + _RU32(buf, at)[0]].decode("utf-8") for at in read_tables(buf, pos, off)
    )


def read_tensor(buf: bytes, pos: int) -> tuple[int, tuple[int, ...]]:
    """(dtype, shape) of a Tensor table at ``pos``."""
    s = slots(buf, pos)
    off = slot(s, 0)
    return (_RU8(buf, pos + off)[0] if off else 0), read_vector(buf, pos, slot(s, 1), "q")


def read_u8(buf: bytes, at: int) -> int:
    return _RU8(buf, at)[0]


def read_i8(buf: bytes, at: int) -> int:
    return _RI8(buf, at)[0]


def read_f32(buf: bytes, at: int) -> float:
    return _RF32(buf, at)[0]


def read_u16(buf: bytes, at: int) -> int:
    return _RU16(buf, at)[0]


def read_u32(buf: bytes, at: int) -> int:
    return _RU32(buf, at)[0]


def read_u64(buf: bytes, at: int) -> int:
    return _RU64(buf, at)[0]


def where(obj: Any) -> tuple[bytes, int]:
    """(buffer, table position) of a generated accessor."""
    tab = obj._tab
    return tab.Bytes, tab.Pos


def plain_reply_template(data: bytes) -> tuple[Template, tuple[str, str, int, tuple[int, ...]]] | None:
    """A Reply of plain predictions as a Template of itself, with (model, version, dtype, shape).

    Plain: every item OK, with a request id and a latency (the template's slots, in order),
    of one model version and output type, answered by that model alone, with nothing else
    set. A later message equal to this one outside the slots is the same reply with other
    ids and latencies, so a receiver learns the template from the message it has just read:
    nothing is built (building the sender's template of 64 items takes over a millisecond).
    None for any other message.
    """
    try:
        _, name, body = decode(data)
        if name != "Reply":
            return None
        buf, pos = where(body)
        positions: list[tuple[int, str]] = []
        meaning = None
        for at in read_tables(buf, pos, slot(slots(buf, pos), 0)):
            f = slots(buf, at)
            id_off, latency_off, tensor = slot(f, 0), slot(f, 7), read_table(buf, at, slot(f, 2))
            off = slot(f, 1)
            if (
                not id_off
                or not latency_off
                or tensor is None
                or (off and read_u8(buf, at + off) != Status.Status.OK)
                or any(slot(f, i) for i in (3, 4, 8, 10, 11))  # error, message, confidence, missing, retry
            ):
                return None
            model = (read_str(buf, at, slot(f, 5)) or b"").decode("utf-8")
            version = (read_str(buf, at, slot(f, 6)) or b"").decode("utf-8")
            dtype, shape = read_tensor(buf, tensor)
            item = (model, version, dtype, tuple(shape))
            if meaning is None:
                meaning = item
            if item != meaning or read_strings(buf, at, slot(f, 9)) != (model,):
                return None
            positions += [(at + id_off, "<Q"), (at + latency_off, "<I")]
    except (DecodeError, *FIELD_ERRORS):
        return None
    if meaning is None:
        return None
    return Template(bytes(data), tuple(positions)), meaning


@lru_cache(maxsize=1024)
def predict_reply_many_template(dtype: int, shape: tuple[int, ...], n: int) -> Template:
    """A PredictReply with ``n`` OK outputs of one type; render(batch_id, compute_us)."""
    data = build_predict_reply(_SENTINEL, _SENTINEL, [(Status.Status.OK, dtype, shape, 0, "")] * n)
    _, _, rep = decode(data)
    return Template(data, ((_field_pos(rep, 0), "<Q"), (_field_pos(rep, 1), "<I")))
