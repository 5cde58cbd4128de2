"""Query (client -> broker): its builder, its template, its typed view, and the two ends.

``query_header`` is how a client writes one: rendered from ``query_template`` up to
``MAX_ITEMS`` ids, built beyond. ``QueryReceiver`` is how the broker reads them: a message
that matches a learnt template is read from its slots (the ids), any other the long way
(``read_query``), after which it is learnt when it is the canonical template rendered.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import flatbuffers
import numpy as np

from ketch.protocol import schema
from ketch.protocol._generated import Query as _Q
from ketch.protocol._raw import (
    FIELD_ERRORS,
    read_i8,
    read_length,
    read_str,
    read_text,
    read_u8,
    read_u32,
    read_vector,
    slot,
    slots,
    where,
)
from ketch.protocol.codec import MAX_ITEMS, DecodeError, decode, finish
from ketch.protocol.limits import MAX_RANK
from ketch.protocol.templates import SENTINEL, LearntTemplates, Template, vector_at

_F = schema.Query
_I64 = np.dtype("<i8")
_U64 = np.dtype("<u8")


class QueryType(NamedTuple):
    """What the queries of one Query message share (everything but their ids)."""

    app: str
    dtype: int
    shape: tuple[int, ...]
    timeout_us: int
    priority: int
    context: str
    model_version: str = ""  # a pinned version (docs/protocol.md); empty: the app's selection


def build_query(
    app: str,
    dtype: int,
    shape: Sequence[int],
    request_ids: Sequence[int],
    timeout_us: int = 0,
    priority: int = 0,
    context: str = "",
    model_version: str = "",
    traceparent: str = "",
    tracestate: str = "",
) -> bytes:
    """The Query header, field for field as ``encode`` writes it (the same bytes)."""
    b = flatbuffers.Builder(96 + 8 * len(request_ids))
    app_off = b.CreateString(app) if app else None
    shape_off = b.CreateNumpyVector(np.asarray(shape, dtype=_I64)) if len(shape) else None
    ids_off = b.CreateNumpyVector(np.asarray(request_ids, dtype=_U64))
    ctx_off = b.CreateString(context) if context else None
    version_off = b.CreateString(model_version) if model_version else None
    tp_off = b.CreateString(traceparent) if traceparent else None
    ts_off = b.CreateString(tracestate) if tracestate else None
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
    if version_off is not None:
        _Q.AddModelVersion(b, version_off)
    if tp_off is not None:
        _Q.AddTraceparent(b, tp_off)
    if ts_off is not None:
        _Q.AddTracestate(b, ts_off)
    return finish(b, schema.Body.Query, _Q.End(b))


def _template(
    app: str,
    dtype: int,
    shape: tuple[int, ...],
    timeout_us: int,
    priority: int,
    context: str,
    n: int,
    model_version: str,
    traced: bool,
) -> Template:
    """A Query of ``n`` queries of one type, with their request ids as slots and, when
    ``traced``, a version-00 traceparent (``TRACEPARENT_CHARS`` bytes) as the last slot."""
    traceparent = "0" * TRACEPARENT_CHARS if traced else ""
    data = build_query(
        app, dtype, shape, [SENTINEL] * n, timeout_us, priority, context, model_version, traceparent
    )
    buf, pos = where(decode(data)[2])
    first = vector_at(buf, pos, _F.REQUEST_IDS)
    slots = tuple((first + 8 * i, "<Q") for i in range(n))
    if traced:  # a string: its bytes, past its length
        slots += ((vector_at(buf, pos, _F.TRACEPARENT), f"{TRACEPARENT_CHARS}s"),)
    return Template(data, slots)


@lru_cache(maxsize=4096)  # up to MAX_ITEMS sizes per app and query type
def query_template(
    app: str,
    dtype: int,
    shape: tuple[int, ...],
    timeout_us: int,
    priority: int,
    context: str,
    n: int = 1,
    model_version: str = "",
) -> Template:
    """A Query of ``n`` queries of one type; render(request_id_0, ..., request_id_n-1).

    Kept only for query types whose app name, context and version are short (``TEMPLATE_TEXT``
    bytes in all, shape rank at most 32): the cache then holds at most ~6 MB, whatever a
    client puts in its contexts; ``query_header`` builds a longer one each time, and the
    broker never learns one."""
    return _template(app, dtype, shape, timeout_us, priority, context, n, model_version, False)


TEMPLATE_TEXT = 512  # bytes of app name, context and version, at most, in a cached template
TRACEPARENT_CHARS = 55  # a version-00 traceparent: the one size a traced template holds


@lru_cache(maxsize=1024)
def traced_query_template(
    app: str,
    dtype: int,
    shape: tuple[int, ...],
    timeout_us: int,
    priority: int,
    context: str,
    n: int = 1,
    model_version: str = "",
) -> Template:
    """A Query of ``n`` queries with a version-00 traceparent and no tracestate;
    render(request_id_0, ..., request_id_n-1, traceparent as 55 ASCII bytes)."""
    return _template(app, dtype, shape, timeout_us, priority, context, n, model_version, True)


def _templated_trace(trace: tuple[str, str]) -> bytes | None:
    """The traceparent as a traced template's slot value, or None when it needs a build."""
    traceparent, tracestate = trace
    if tracestate or len(traceparent) != TRACEPARENT_CHARS or not traceparent.isascii():
        return None
    return traceparent.encode("ascii")


def _short(query: QueryType) -> bool:
    text = len(query.app) + len(query.context) + len(query.model_version)
    return text <= TEMPLATE_TEXT and len(query.shape) <= MAX_RANK


def query_header(
    app: str,
    dtype: int,
    shape: tuple[int, ...],
    ids: Sequence[int],
    timeout_us: int = 0,
    priority: int = 0,
    context: str = "",
    model_version: str = "",
    trace: tuple[str, str] | None = None,
) -> bytes:
    """A client's Query header: rendered from its template up to MAX_ITEMS ids (when its app
    name, context and version are short), else built. A traced one (``trace``: its W3C
    traceparent and tracestate) is rendered from its traced template when the traceparent is
    of version 00 and there is no tracestate, else built."""
    text = len(app) + len(context) + len(model_version)
    short = len(ids) <= MAX_ITEMS and text <= TEMPLATE_TEXT and len(shape) <= MAX_RANK
    if trace is not None:
        tp = _templated_trace(trace)
        if tp is None or not short:
            traceparent, tracestate = trace
            return build_query(
                app, dtype, shape, ids, timeout_us, priority, context, model_version, traceparent, tracestate
            )
        template = traced_query_template(
            app, dtype, shape, timeout_us, priority, context, len(ids), model_version
        )
        return template.render(*ids, tp)
    if short:
        template = query_template(app, dtype, shape, timeout_us, priority, context, len(ids), model_version)
        return template.render(*ids)
    return build_query(app, dtype, shape, ids, timeout_us, priority, context, model_version)


def read_query(body: Any) -> tuple[QueryType, list[int]]:
    """A decoded Query's type and request ids, read straight from its bytes.

    Raises DecodeError for a field that does not decode."""
    buf, pos = where(body)
    try:
        f = slots(buf, pos)
        ids = list(read_vector(buf, pos, slot(f, _F.REQUEST_IDS), "Q"))
        query = QueryType(
            read_text(buf, pos, slot(f, _F.APP)),
            read_u8(buf, pos, slot(f, _F.DTYPE)),
            read_vector(buf, pos, slot(f, _F.SHAPE), "q"),
            read_u32(buf, pos, slot(f, _F.TIMEOUT_US)),
            read_i8(buf, pos, slot(f, _F.PRIORITY)),
            read_text(buf, pos, slot(f, _F.CONTEXT)),
            read_text(buf, pos, slot(f, _F.MODEL_VERSION)),
        )
    except FIELD_ERRORS as exc:
        raise DecodeError(f"Query does not decode: {type(exc).__name__}") from None
    return query, ids


MAX_TRACEPARENT_BYTES = 256  # a longer traceparent is ignored, unread (ketch.tracing)
MAX_TRACESTATE_BYTES = 512  # a longer tracestate is dropped, unread


def _bounded_text(buf: Any, pos: int, off: int, limit: int) -> str:
    raw = read_str(buf, pos, off)
    return raw.decode("utf-8", "replace") if raw and len(raw) <= limit else ""


def read_query_trace(body: Any) -> tuple[str, str] | None:
    """A decoded Query's (traceparent, tracestate) as sent, or None when it names none or
    one over MAX_TRACEPARENT_BYTES (a tracestate over its bound reads as ""); the caller
    checks them (``ketch.tracing.clean``). Raises DecodeError."""
    buf, pos = where(body)
    try:
        f = slots(buf, pos)
        tp_off = slot(f, _F.TRACEPARENT)
        traceparent = _bounded_text(buf, pos, tp_off, MAX_TRACEPARENT_BYTES) if tp_off else ""
        if not traceparent:
            return None
        return traceparent, _bounded_text(buf, pos, slot(f, _F.TRACESTATE), MAX_TRACESTATE_BYTES)
    except FIELD_ERRORS as exc:
        raise DecodeError(f"Query does not decode: {type(exc).__name__}") from None


def query_ids_count(body: Any) -> int:
    """How many request ids a decoded Query names, without reading them (so that a Query of
    millions can be refused before they cost anything). Raises DecodeError."""
    buf, pos = where(body)
    try:
        return read_length(buf, pos, slot(slots(buf, pos), _F.REQUEST_IDS))
    except FIELD_ERRORS as exc:
        raise DecodeError(f"Query does not decode: {type(exc).__name__}") from None


class QueryReceiver(LearntTemplates[QueryType]):
    """The broker's end: ``match`` (inherited) reads a learnt Query from its slots, giving
    ``(ids, query type)``; ``learn`` keeps one just read the long way when it is the canonical
    template rendered (the contract says why only then)."""

    __slots__ = ()

    def learn_query(self, body: Any, query: QueryType, n_ids: int, traced: bool = False) -> bool:
        """Keep a Query just read the long way when it is the canonical template rendered and
        its type is short (``query_template``, or ``traced_query_template`` for a receiver of
        traced Queries, whose matches end with the traceparent's bytes): what a client sends
        is held only in a bounded number of short templates."""
        if n_ids > MAX_ITEMS or self.full or not _short(query):
            return False
        buf, _ = where(body)
        make = traced_query_template if traced else query_template
        return self.learn(buf, make(*query[:6], n_ids, query.model_version), query)
