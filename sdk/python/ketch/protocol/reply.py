"""Reply (broker -> client): builder, templates, typed view, and the two ends.

A reply item is *plain* when it is a model's prediction and nothing else: status OK, a
request id and a latency, an output type, the model and version, answered by that model
alone, every other field at its default. Plain items of one family (model, version, dtype,
shape) are the common reply; ``ReplySender`` renders them from ``reply_ok_many_template``
(slots: id and latency of each item), refusals of one code and message from
``reply_refused_many_template`` (slots: id and retry-after of each), and builds any other
reply. ``PlainReplies`` is the
client's end: a reply read the long way (``read_reply``) that is all plain is learnt as a
template of itself (``plain_reply_template``), and later ones that match are read from
their slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import flatbuffers
import zmq

from ketch.protocol import schema
from ketch.protocol._generated import Reply as _Rep
from ketch.protocol._generated import ReplyItem as _RI
from ketch.protocol._raw import (
    FIELD_ERRORS,
    Buffer,
    read_f32,
    read_str,
    read_strings,
    read_table,
    read_tables,
    read_text,
    read_u8,
    read_u16,
    read_u32,
    read_u64,
    read_vector,
    slot,
    slots,
    where,
)
from ketch.protocol.codec import MAX_ITEMS, DecodeError, build_tensor, decode, finish
from ketch.protocol.limits import U32_MAX
from ketch.protocol.multipart import send
from ketch.protocol.templates import SENTINEL, LearntTemplates, Prebuilds, Template, field_at

_F = schema.ReplyItem
_TF = schema.Tensor
_OK = schema.Status.OK
_ERROR = schema.Status.ERROR
PlainFamily = tuple[str, str, int, tuple[int, ...]]  # model, model version, output dtype and shape
_PREBUILT = range(1, MAX_ITEMS + 1)  # the sizes of a family built ahead of need


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
        # uint32 fields saturate (a query held past 71.6 minutes, a long retry hint)
        self.latency_us = latency_us if latency_us <= U32_MAX else U32_MAX
        self.confidence = confidence
        self.models_answered = models_answered
        self.models_missing = models_missing
        self.retry_after_ms = retry_after_ms if retry_after_ms <= U32_MAX else U32_MAX


def _string_vector(b: flatbuffers.Builder, strings: Sequence[str], cache: dict[str, int], start: Any) -> int:
    offs = [cache.get(s) or cache.setdefault(s, b.CreateString(s)) for s in strings]
    start(b, len(offs))
    for off in reversed(offs):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def build_reply(items: Sequence[ReplyFields]) -> bytes:
    """The Reply header of ``items``, field for field as ``encode`` writes it."""
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
        out_off = build_tensor(b, it.dtype, it.shape or ()) if it.dtype is not None else None
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
    return finish(b, schema.Body.Reply, _Rep.End(b))


@lru_cache(maxsize=4096)
def reply_ok_many_template(
    model: str, model_version: str, dtype: int, shape: tuple[int, ...], n: int
) -> Template:
    """A Reply of ``n`` plain items of one family; render(id_0, latency_0, id_1, ...)."""
    item = ReplyFields(
        SENTINEL,
        _OK,
        dtype,
        shape,
        model=model,
        model_version=model_version,
        latency_us=SENTINEL,
        models_answered=(model,),
    )
    data = build_reply([item] * n)
    buf, pos = where(decode(data)[2])
    positions: list[tuple[int, str]] = []
    for at in read_tables(buf, pos, slot(slots(buf, pos), schema.Reply.ITEMS)):
        positions += [(field_at(buf, at, _F.REQUEST_ID), "<Q"), (field_at(buf, at, _F.LATENCY_US), "<I")]
    return Template(data, tuple(positions))


@lru_cache(maxsize=1024)
def reply_refused_many_template(code: int, message: str, n: int) -> Template:
    """A Reply of ``n`` ERROR items of one code and message, each with its retry-after (the
    broker's refusals under load); render(id_0, retry_0, id_1, retry_1, ...)."""
    item = ReplyFields(SENTINEL, _ERROR, error=code, message=message, retry_after_ms=SENTINEL)
    data = build_reply([item] * n)
    buf, pos = where(decode(data)[2])
    positions: list[tuple[int, str]] = []
    for at in read_tables(buf, pos, slot(slots(buf, pos), schema.Reply.ITEMS)):
        positions += [(field_at(buf, at, _F.REQUEST_ID), "<Q"), (field_at(buf, at, _F.RETRY_AFTER_MS), "<I")]
    return Template(data, tuple(positions))


def plain_answers(answers: Sequence[tuple[ReplyFields, Any]]) -> tuple[PlainFamily, list[int]] | None:
    """The family and the (request id, latency) of each answer, in order, when every one of
    ``answers`` ((item, payload) pairs) is plain and of one family: a reply template renders
    them. None otherwise. Ids and latencies of 0 are left to the builder, which omits fields
    at their default."""
    first = answers[0][0]
    if first.dtype is None or first.models_answered != (first.model,):
        return None
    values: list[int] = []
    for item, _ in answers:
        if (
            item.status != _OK
            or not item.request_id
            or not item.latency_us
            or item.message
            or item.error
            or item.retry_after_ms
            or item.models_missing
            or item.confidence != 1.0
            or item.model != first.model
            or item.model_version != first.model_version
            or item.dtype != first.dtype
            or item.shape != first.shape
            or item.models_answered != first.models_answered
        ):
            return None
        values += (item.request_id, item.latency_us)
    return (first.model, first.model_version, first.dtype, tuple(first.shape or ())), values


class ReplySender:
    """The broker's end: plain answers of one family rendered from templates (the family's
    other sizes queued in ``prebuilds`` the first time), any others built; at most MAX_ITEMS
    answers to a Reply."""

    __slots__ = ("prebuilds",)

    def __init__(self, prebuilds: Prebuilds) -> None:
        self.prebuilds = prebuilds

    def send(self, sock: zmq.Socket[Any], client: bytes, answers: Sequence[tuple[ReplyFields, Any]]) -> None:
        """Send ``answers`` ((item, payload) pairs): by template when all are plain, else built."""
        plain = plain_answers(answers)
        if plain is not None:
            self.send_plain(sock, client, plain[0], plain[1], [payload for _, payload in answers])
        else:
            self.send_built(sock, client, answers)

    def send_plain(
        self,
        sock: zmq.Socket[Any],
        client: bytes,
        family: PlainFamily,
        values: list[int],
        payloads: list[Any],
    ) -> None:
        """Send plain answers: ``values`` holds (id, latency) per answer, ``payloads`` theirs."""
        n = len(payloads)
        for at in range(0, n, MAX_ITEMS):
            end = min(n, at + MAX_ITEMS)
            header = reply_ok_many_template(*family, end - at).render(*values[2 * at : 2 * end])
            send(sock, [client, header, *payloads[at:end]])
        self.prebuilds.want(reply_ok_many_template, family, _PREBUILT)

    def send_refused(
        self, sock: zmq.Socket[Any], client: bytes, family: tuple[int, str], values: list[int]
    ) -> None:
        """Send refusals of one code and message: ``values`` holds (id, retry-after) per
        refusal (neither 0); each has its empty payload frame."""
        n = len(values) // 2
        for at in range(0, n, MAX_ITEMS):
            end = min(n, at + MAX_ITEMS)
            header = reply_refused_many_template(*family, end - at).render(*values[2 * at : 2 * end])
            send(sock, [client, header, *[b""] * (end - at)])
        self.prebuilds.want(reply_refused_many_template, family, _PREBUILT)

    def send_built(
        self, sock: zmq.Socket[Any], client: bytes, answers: Sequence[tuple[ReplyFields, Any]]
    ) -> None:
        """Send any answers, each Reply built."""
        for at in range(0, len(answers), MAX_ITEMS):
            chunk = answers[at : at + MAX_ITEMS]
            send(sock, [client, build_reply([item for item, _ in chunk]), *[payload for _, payload in chunk]])


# ---------------------------------------------------------------- reading


class ReplyItemView(NamedTuple):
    """One item of a Reply as plain values (``dtype`` None when it carries no output)."""

    request_id: int
    status: int
    dtype: int | None
    shape: tuple[int, ...]
    error: int
    message: str
    model: str
    model_version: str
    latency_us: int
    confidence: float
    models_answered: tuple[str, ...]
    models_missing: tuple[str, ...]
    retry_after_ms: int


def _read_item(buf: Buffer, at: int) -> ReplyItemView:
    f = slots(buf, at)
    t = read_table(buf, at, slot(f, _F.OUTPUT))
    dtype: int | None
    shape: tuple[int, ...]
    if t is None:
        dtype, shape = None, ()
    else:
        tf = slots(buf, t)
        dtype, shape = (
            read_u8(buf, t, slot(tf, _TF.DTYPE)),
            read_vector(buf, t, slot(tf, _TF.SHAPE), "q"),
        )
    return ReplyItemView(
        read_u64(buf, at, slot(f, _F.REQUEST_ID)),
        read_u8(buf, at, slot(f, _F.STATUS)),
        dtype,
        shape,
        read_u16(buf, at, slot(f, _F.ERROR)),
        read_text(buf, at, slot(f, _F.MESSAGE)),
        read_text(buf, at, slot(f, _F.MODEL)),
        read_text(buf, at, slot(f, _F.MODEL_VERSION)),
        read_u32(buf, at, slot(f, _F.LATENCY_US)),
        read_f32(buf, at, slot(f, _F.CONFIDENCE), 1.0),
        read_strings(buf, at, slot(f, _F.MODELS_ANSWERED)),
        read_strings(buf, at, slot(f, _F.MODELS_MISSING)),
        read_u32(buf, at, slot(f, _F.RETRY_AFTER_MS)),
    )


def read_reply(body: Any) -> list[ReplyItemView]:
    """The items of a decoded Reply, read straight from its bytes; raises DecodeError."""
    buf, pos = where(body)
    try:
        return [
            _read_item(buf, at) for at in read_tables(buf, pos, slot(slots(buf, pos), schema.Reply.ITEMS))
        ]
    except FIELD_ERRORS as exc:
        raise DecodeError(f"Reply does not decode: {type(exc).__name__}") from None


def read_reply_items(body: Any) -> tuple[list[ReplyItemView | None], list[tuple[int, str]], int]:
    """The items of a decoded Reply one by one, so that a corrupt item costs only itself:
    ``(items, broken, unnamed)``, where ``items`` holds each item that reads (None in the
    place of one that does not), ``broken`` the (request id, why) of each item whose id reads
    but not the rest, and ``unnamed`` how many items (or, when the item table itself does not
    read, 1 for the whole message) name no readable request id. Raises nothing."""
    buf, pos = where(body)
    try:
        places = read_tables(buf, pos, slot(slots(buf, pos), schema.Reply.ITEMS))
    except FIELD_ERRORS:
        return [], [], 1
    items: list[ReplyItemView | None] = []
    broken: list[tuple[int, str]] = []
    unnamed = 0
    for at in places:
        try:
            items.append(_read_item(buf, at))
            continue
        except FIELD_ERRORS as exc:
            why = f"reply item does not decode: {type(exc).__name__}"
        items.append(None)
        try:
            rid = read_u64(buf, at, slot(slots(buf, at), _F.REQUEST_ID))
        except FIELD_ERRORS:
            rid = 0
        if rid:
            broken.append((rid, why))
        else:
            unnamed += 1
    return items, broken, unnamed


_NOT_PLAIN = (_F.ERROR, _F.MESSAGE, _F.CONFIDENCE, _F.MODELS_MISSING, _F.RETRY_AFTER_MS)


def plain_reply_template(data: Buffer) -> tuple[Template, PlainFamily] | None:
    """A Reply of plain items of one family as a Template of itself, with the family.

    Slots: each item's request id and latency, in order. A later message equal to this one
    outside the slots is the same reply with other ids and latencies, so a receiver learns
    the template from the message it has just read: nothing is built (building the sender's
    template of 64 items takes over a millisecond). None for any other message.
    """
    try:
        _, name, body = decode(data)
        if name != "Reply":
            return None
        buf, pos = where(body)
        positions: list[tuple[int, str]] = []
        family = None
        for at in read_tables(buf, pos, slot(slots(buf, pos), schema.Reply.ITEMS)):
            f = slots(buf, at)
            id_off, latency_off = slot(f, _F.REQUEST_ID), slot(f, _F.LATENCY_US)
            t = read_table(buf, at, slot(f, _F.OUTPUT))
            if (
                not id_off
                or not latency_off
                or t is None
                or read_u8(buf, at, slot(f, _F.STATUS)) != _OK
                or any(slot(f, i) for i in _NOT_PLAIN)
            ):
                return None
            model = (read_str(buf, at, slot(f, _F.MODEL)) or b"").decode("utf-8")
            version = (read_str(buf, at, slot(f, _F.MODEL_VERSION)) or b"").decode("utf-8")
            tf = slots(buf, t)
            item = (
                model,
                version,
                read_u8(buf, t, slot(tf, _TF.DTYPE)),
                read_vector(buf, t, slot(tf, _TF.SHAPE), "q"),
            )
            if family is None:
                family = item
            if item != family or read_strings(buf, at, slot(f, _F.MODELS_ANSWERED)) != (model,):
                return None
            positions += [(at + id_off, "<Q"), (at + latency_off, "<I")]
    except DecodeError:
        return None
    except FIELD_ERRORS:
        return None
    if family is None:
        return None
    return Template(bytes(data), tuple(positions)), family


class PlainReplies(LearntTemplates[PlainFamily]):
    """A client's end: ``match`` (inherited) reads a learnt plain Reply from its slots, giving
    ``([id, latency, ...], family)``; ``learn_reply`` keeps one just read the long way."""

    __slots__ = ()

    def learn_reply(self, header: Buffer) -> bool:
        if self.full:
            return False
        found = plain_reply_template(header)
        return found is not None and self.learn(header, *found)
