"""Templates: messages built once and rendered with new values, and learnt by receivers.

The most frequent messages differ from one another only in a few scalars (a request id, a
latency, a budget). A ``Template`` is such a message built once, with the byte positions of
those scalars (its slots) found by reading it back; rendering copies the bytes and writes
the scalars in place. ``LearntTemplates`` is a receiver's bounded table of the templates its
peer renders, and ``Prebuilds`` a sender's queue of templates to build while it is idle.
The rules that make this correct are the package's contract (``ketch.protocol``).
"""

from __future__ import annotations

import contextlib
import struct
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Generic, TypeVar

from ketch.protocol._raw import Buffer, slot, slots, vector_start

SENTINEL = 0x5A5A5A5A  # non-zero, so the builder writes the field; overwritten on render

T = TypeVar("T")


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

    def render(self, *values: int | bytes) -> bytes:
        buf = bytearray(self.data)
        for (pos, fmt), value in zip(self.slots, values, strict=True):
            struct.pack_into(fmt, buf, pos, value)
        return bytes(buf)

    def match(self, data: Buffer) -> list[Any] | None:
        """The slot values when ``data`` (any buffer) is this template rendered with them
        (ints; bytes for a slot of text, such as a traceparent)."""
        if len(data) != len(self.data):
            return None
        buf = bytearray(data)
        values = []
        for fmt, start, end, original in self._restore:
            values.append(fmt.unpack_from(buf, start)[0])
            buf[start:end] = original
        return values if buf == self.data else None


class LearntTemplates(Generic[T]):
    """The templates a receiver has seen its peer render, by message length, each with what
    the receiver learnt alongside it (the parsed fields a match stands for).

    ``learn`` keeps a template only when the message just read the long way is that
    template rendered; ``match`` is then a dict lookup and one ``Template.match`` per
    template of that length. Bounded in all and per length: a peer that varies what it
    sends (shapes, models) costs at most ``per_length`` looks per message.
    """

    __slots__ = ("_by_length", "count", "per_length", "total")

    def __init__(self, total: int = 1024, per_length: int = 8) -> None:
        self._by_length: dict[int, list[tuple[Template, T]]] = {}
        self.count = 0
        self.total, self.per_length = total, per_length

    def match(self, data: Buffer) -> tuple[list[Any], T] | None:
        """(slot values, what was learnt) of the template ``data`` (any buffer) renders."""
        for template, learnt in self._by_length.get(len(data), ()):
            values = template.match(data)
            if values is not None:
                return values, learnt
        return None

    @property
    def full(self) -> bool:
        return self.count >= self.total

    def learn(self, data: Buffer, template: Template, learnt: T) -> bool:
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


Build = Callable[..., Template]


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
        self._families: set[tuple[Build, tuple[Any, ...]]] = set()
        self._todo: deque[tuple[Build, tuple[Any, ...], int]] = deque()
        self.limit = limit

    def want(self, build: Build, args: tuple[Any, ...], sizes: range) -> None:
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


def field_at(buf: Buffer, pos: int, field: int) -> int:
    """Absolute byte position of a scalar field (a ``schema`` id) of the table at ``pos``."""
    off = slot(slots(buf, pos), field)
    assert off, "template field was not written"
    return pos + off


def strings_at(buf: Buffer, pos: int, field: int) -> list[int]:
    """Absolute byte positions of the text of each string of a vector-of-strings field."""
    first = vector_at(buf, pos, field)
    n = struct.unpack_from("<I", buf, first - 4)[0]
    at = [first + 4 * i for i in range(n)]
    return [a + struct.unpack_from("<I", buf, a)[0] + 4 for a in at]


def vector_at(buf: Buffer, pos: int, field: int) -> int:
    """Absolute byte position of the first element of a vector field of the table at ``pos``."""
    off = slot(slots(buf, pos), field)
    assert off, "template vector was not written"
    return vector_start(buf, pos, off)
