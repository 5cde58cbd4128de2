"""Reading flatbuffer fields straight from the bytes, with ``struct``.

The generated accessors walk the vtable again for every field (three or four Python calls
each). These readers take a table's vtable once, as a tuple of field offsets (``slots``; 0
for an absent field), and read fields with ``struct``. They read the same bytes the
generated code reads, return the schema default for an absent field, and raise
``struct.error`` or ``IndexError`` (both in ``FIELD_ERRORS``) where the buffer is too short:
the typed views (``query``, ``reply``, ``predict``) turn those into ``DecodeError``.
Private to ``ketch.protocol``: a field is named by its generated id (``schema``), never by
a number written by hand.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

Buffer = Any  # bytes, bytearray, memoryview or a zmq.Frame: anything struct can read

# what reading a field of a corrupt flatbuffer can raise (accessors are lazy, unchecked)
FIELD_ERRORS: tuple[type[BaseException], ...] = (
    IndexError,
    ValueError,
    TypeError,
    OverflowError,
    AttributeError,
    UnicodeDecodeError,
    struct.error,
)

_RI32 = struct.Struct("<i").unpack_from
_RU8 = struct.Struct("<B").unpack_from
_RI8 = struct.Struct("<b").unpack_from
_RU16 = struct.Struct("<H").unpack_from
_RU32 = struct.Struct("<I").unpack_from
_RU64 = struct.Struct("<Q").unpack_from
_RF32 = struct.Struct("<f").unpack_from
_VT: dict[int, Callable[[Buffer, int], tuple[int, ...]]] = {
    n: struct.Struct(f"<{n}H").unpack_from for n in range(16)
}
_VEC_ITEM = {"q": 8, "Q": 8, "I": 4}
_BEYOND = 1 << 62  # offset of a field whose vtable entry lies past the buffer: reading it fails


def slots(buf: Buffer, pos: int) -> tuple[int, ...]:
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
    """The offset of field ``i`` (a ``schema`` id) in ``s``; 0 when absent."""
    return s[i] if i < len(s) else 0


def read_str(buf: Buffer, pos: int, off: int) -> bytes | None:
    """A string field (``off`` from ``slots``), None when absent, like the generated code."""
    if not off:
        return None
    at = pos + off
    at += _RU32(buf, at)[0]
    n = _RU32(buf, at)[0]
    return bytes(buf[at + 4 : at + 4 + n])


def read_text(buf: Buffer, pos: int, off: int) -> str:
    """A string field as text ('' when absent; bytes that are not UTF-8 replaced)."""
    raw = read_str(buf, pos, off)
    return raw.decode("utf-8", "replace") if raw else ""


def read_vector(buf: Buffer, pos: int, off: int, code: str) -> tuple[int, ...]:
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


def vector_start(buf: Buffer, pos: int, off: int) -> int:
    """Byte position of the first element of a vector field (present)."""
    at = pos + off
    return at + int(_RU32(buf, at)[0]) + 4


def read_table(buf: Buffer, pos: int, off: int) -> int | None:
    """Position of a sub-table field, None when absent."""
    if not off:
        return None
    at = pos + off
    return at + int(_RU32(buf, at)[0])


def read_length(buf: Buffer, pos: int, off: int) -> int:
    """Number of elements of a vector field (0 when absent)."""
    if not off:
        return 0
    at = pos + off
    return int(_RU32(buf, at + _RU32(buf, at)[0])[0])


def read_tables(buf: Buffer, pos: int, off: int) -> list[int]:
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


def read_strings(buf: Buffer, pos: int, off: int) -> tuple[str, ...]:
    """A vector of UTF-8 strings as a tuple of str; () when absent."""
    return tuple(
        bytes(buf[at + 4 : at + 4 + _RU32(buf, at)[0]]).decode("utf-8") for at in read_tables(buf, pos, off)
    )


def read_u8(buf: Buffer, pos: int, off: int, default: int = 0) -> int:
    """A ubyte (or bool, or ubyte enum) field; ``default`` when absent."""
    return int(_RU8(buf, pos + off)[0]) if off else default


def read_i8(buf: Buffer, pos: int, off: int, default: int = 0) -> int:
    return int(_RI8(buf, pos + off)[0]) if off else default


def read_u16(buf: Buffer, pos: int, off: int, default: int = 0) -> int:
    return int(_RU16(buf, pos + off)[0]) if off else default


def read_u32(buf: Buffer, pos: int, off: int, default: int = 0) -> int:
    return int(_RU32(buf, pos + off)[0]) if off else default


def read_u64(buf: Buffer, pos: int, off: int, default: int = 0) -> int:
    return int(_RU64(buf, pos + off)[0]) if off else default


def read_f32(buf: Buffer, pos: int, off: int, default: float = 0.0) -> float:
    return float(_RF32(buf, pos + off)[0]) if off else default


def where(obj: Any) -> tuple[Buffer, int]:
    """(buffer, table position) of a generated accessor."""
    tab = obj._tab
    return tab.Bytes, int(tab.Pos)
