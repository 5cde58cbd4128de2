"""The generic codec: any message to and from its fields, the envelope, enum names.

``encode`` and ``table_to_dict`` are driven by ``schema.FIELDS`` (generated from the
schema), so no message is described here. ``encode`` given the same fields produces the same
bytes as the golden vectors in ``schemas/vectors/``; ``to_dict`` reads a header frame to the
shape of their JSON twins. ``decode`` checks the envelope and returns the body's generated
accessor, whose fields are read lazily (the hot messages have typed views instead).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import flatbuffers
import numpy as np

from ketch.protocol import schema
from ketch.protocol._generated import Envelope as _Envelope
from ketch.protocol._generated import Tensor as _Tensor
from ketch.protocol._raw import _RI32, _RU8, _RU16, _RU32, FIELD_ERRORS, Buffer
from ketch.protocol.versions import PROTOCOL_VERSION, PROTOCOL_VERSIONS, describe, stamp

IDENTIFIER = b"KTCH"
MAX_ITEMS = 64  # the item limit per message: see the package's contract

DTYPE_CODES: dict[str, int] = dict(schema.ENUMS["DType"])
DTYPE_NAMES: dict[int, str] = {v: k for k, v in DTYPE_CODES.items()}
ERROR_CODES: dict[str, int] = dict(schema.ENUMS["ErrorCode"])
ERROR_NAMES: dict[int, str] = {v: k for k, v in ERROR_CODES.items()}
STATUS_CODES: dict[str, int] = dict(schema.ENUMS["Status"])
STATUS_NAMES: dict[int, str] = {v: k for k, v in STATUS_CODES.items()}
BODY_NAMES: dict[int, str] = {
    v: k for k, v in vars(schema.Body).items() if k[0].isupper() and k != "NONE" and isinstance(v, int)
}
BODY_CODES: dict[str, int] = {k: v for v, k in BODY_NAMES.items()}

_I64 = np.dtype("<i8")
_VECTOR_NUMPY = {"[i64]": "<i8", "[u64]": "<u8", "[u32]": "<u4", "[u16]": "<u2"}
_ENUM_CODES = {kind: schema.ENUMS[name] for kind, name in schema.ENUM_KINDS.items()}
_ENUM_NAMES = {kind: {v: k for k, v in codes.items()} for kind, codes in _ENUM_CODES.items()}


class DecodeError(ValueError):
    """A frame that is not a valid Ketch message (header or payload): the only exception the
    package's readers raise for what a peer sent."""


class UnsupportedVersion(DecodeError):
    """A message of a protocol version this package does not speak."""

    def __init__(self, version: int) -> None:
        super().__init__(
            f"protocol version {version} is not supported (speaks {describe(PROTOCOL_VERSIONS)})"
        )
        self.version = version


class UnknownMessage(DecodeError):
    """A header whose body type this package does not know (a newer peer's message, say):
    answered ``UNKNOWN_MESSAGE``."""

    def __init__(self, body_type: int, version: int) -> None:
        super().__init__(f"unknown message type {body_type} (protocol version {version})")
        self.body_type = body_type
        self.version = version


class UnknownMessageType(DecodeError):
    """An envelope whose body type this package does not know (a newer peer's message, or
    garbage): answered ``UNKNOWN_MESSAGE``, not ``BAD_MESSAGE``."""

    def __init__(self, body_type: int, version: int) -> None:
        super().__init__(f"unknown message type {body_type}")
        self.body_type, self.version = body_type, version


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


_MODULES: dict[str, ModuleType] = {
    name: importlib.import_module(f"ketch.protocol._generated.{name}") for name in schema.FIELDS
}
_CLASSES: dict[str, Any] = {name: getattr(mod, name) for name, mod in _MODULES.items()}


# ---------------------------------------------------------------- encoding


def _build_table(b: flatbuffers.Builder, table: str, fields: Mapping[str, Any]) -> int:
    spec = schema.FIELDS[table]
    unknown = set(fields) - {name for name, _ in spec}
    if unknown:
        raise ValueError(f"{table} has no field(s) {sorted(unknown)}")
    mod = _MODULES[table]
    offsets: dict[str, int] = {}
    # children first: strings, vectors and sub-tables must be finished before Start
    for name, kind in spec:
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
        elif kind in schema.FIELDS:
            offsets[name] = _build_table(b, kind, value)
    mod.Start(b)
    for name, kind in spec:
        add = getattr(mod, "Add" + _camel(name))
        if name in offsets:
            add(b, offsets[name])
            continue
        value = fields.get(name)
        if value is None or kind == "str" or kind.startswith("[") or kind in schema.FIELDS:
            continue
        if kind in _ENUM_CODES:
            value = _ENUM_CODES[kind][value] if isinstance(value, str) else int(value)
        if value == schema.DEFAULTS.get((table, name), 0):
            continue
        add(b, value)
    return int(mod.End(b))


def _vector_of_offsets(b: flatbuffers.Builder, mod: ModuleType, name: str, offsets: Sequence[int]) -> int:
    getattr(mod, "Start" + _camel(name) + "Vector")(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def encode(body: str, fields: Mapping[str, Any] | None = None, *, version: int | None = None) -> bytes:
    """Header frame for ``body`` (a union member name) with ``fields`` (names as in the schema),
    stamped ``version`` (default: the version that brought the body, ``versions.stamp``)."""
    b = flatbuffers.Builder(128)
    root = _build_table(b, body, fields or {})
    return finish(b, BODY_CODES[body], root, stamp(body) if version is None else version)


def build_tensor(b: flatbuffers.Builder, dtype: int, shape: Sequence[int]) -> int:
    """A Tensor table, as ``encode`` writes it (for the direct builders)."""
    shape_off = b.CreateNumpyVector(np.asarray(shape, dtype=_I64)) if len(shape) else None
    _Tensor.Start(b)
    if dtype:
        _Tensor.AddDtype(b, dtype)
    if shape_off is not None:
        _Tensor.AddShape(b, shape_off)
    return int(_Tensor.End(b))


def finish(b: flatbuffers.Builder, body_type: int, root: int, version: int = PROTOCOL_VERSION) -> bytes:
    """Wrap a finished body table in the Envelope and return the header bytes."""
    _Envelope.Start(b)
    _Envelope.AddVersion(b, version)
    _Envelope.AddBodyType(b, body_type)
    _Envelope.AddBody(b, root)
    b.Finish(_Envelope.End(b), file_identifier=IDENTIFIER)
    return bytes(b.Output())


# ---------------------------------------------------------------- decoding

_VERSION_AT = 4 + 2 * schema.Envelope.VERSION  # vtable entries of the Envelope's fields
_TYPE_AT = 4 + 2 * schema.Envelope.BODY_TYPE
_BODY_AT = 4 + 2 * schema.Envelope.BODY


def decode(frame: Buffer) -> tuple[int, str, Any]:
    """Parse a header frame: (protocol version, body name, generated accessor of the body).

    Raises DecodeError for anything that is not a Ketch envelope (UnknownMessage for a body
    type it does not know). Field access on the returned accessor is lazy; callers read only
    what they need.
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
        off = _RU16(buf, vt + _VERSION_AT)[0] if vt_end > _VERSION_AT else 0
        version = _RU16(buf, pos + off)[0] if off else 0
        off = _RU16(buf, vt + _TYPE_AT)[0] if vt_end > _TYPE_AT else 0
        body_type = _RU8(buf, pos + off)[0] if off else 0
        name = BODY_NAMES.get(body_type)
        if name is None:
            raise UnknownMessage(body_type, version)
        off = _RU16(buf, vt + _BODY_AT)[0] if vt_end > _BODY_AT else 0
        if not off:
            raise DecodeError(f"{name} without a body")
        obj = _CLASSES[name]()
        obj.Init(buf, pos + off + _RU32(buf, pos + off)[0])
    except DecodeError:
        raise
    except Exception as exc:  # flatbuffers raises struct/index errors on bad offsets
        raise DecodeError(f"header does not decode: {type(exc).__name__}: {exc}") from None
    return int(version), name, obj


def decode_current(frame: Buffer) -> tuple[str, Any]:
    """(body name, body) of a header frame of a protocol version this package speaks:
    ``decode`` that raises UnsupportedVersion (a DecodeError) for any other version, before
    it looks at the body type (a newer version's unknown message is a version problem)."""
    try:
        version, name, body = decode(frame)
    except UnknownMessage as exc:
        if exc.version not in PROTOCOL_VERSIONS:
            raise UnsupportedVersion(exc.version) from None
        raise
    if version not in PROTOCOL_VERSIONS:
        raise UnsupportedVersion(version)
    return name, body


def table_to_dict(table: str, obj: Any, enum_names: bool = True) -> dict[str, Any]:
    """Every field of a decoded table as plain values (enums as names, or as their codes)."""
    out: dict[str, Any] = {}
    for name, kind in schema.FIELDS[table]:
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
            out[name] = [table_to_dict(kind[1:-1], getattr(obj, getter)(i), enum_names) for i in range(n)]
        elif kind in schema.FIELDS:
            child = getattr(obj, getter)()
            out[name] = table_to_dict(kind, child, enum_names) if child is not None else None
        elif kind in _ENUM_NAMES:
            value = getattr(obj, getter)()
            out[name] = _ENUM_NAMES[kind].get(value, value) if enum_names else int(value)
        elif kind == "bool":
            out[name] = bool(getattr(obj, getter)())
        elif kind == "f32":
            out[name] = float(getattr(obj, getter)())
        else:
            out[name] = int(getattr(obj, getter)())
    return out


def to_dict(frame: Buffer) -> dict[str, Any]:
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
    return encode(message["type"], message.get("body", {}), version=message.get("version"))


def read_fields(name: str, body: Any) -> dict[str, Any]:
    """Every field of a decoded body (``decode``'s third value) as plain values, enums as their
    codes: how the messages without a typed view (Hello, Feedback, Welcome, Error...) are read.
    Raises DecodeError for a field that does not decode."""
    try:
        return table_to_dict(name, body, enum_names=False)
    except FIELD_ERRORS as exc:
        raise DecodeError(f"{name} does not decode: {type(exc).__name__}") from None
