"""PredictRequest (broker -> replica) and PredictReply (replica -> broker): builders,
templates, typed views, and the ends of each.

A batch of items of one shape is rendered from ``predict_template`` (slots: batch id, each
item's budget) by ``RequestSender``; a replica's ``RequestReceiver`` learns such a request
as a template of itself and reads later ones from the slots. A batch whose outputs are all
OK and of one type is answered from ``predict_reply_many_template`` (slots: batch id,
compute time) by ``PredictReplySender``; the broker's ``PredictReplyReceiver`` learns such
a reply as a template of itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, NamedTuple

import flatbuffers
import numpy as np

from ketch.protocol import schema
from ketch.protocol._generated import Output as _Out
from ketch.protocol._generated import PredictReply as _PRep
from ketch.protocol._generated import PredictRequest as _PReq
from ketch.protocol._raw import (
    FIELD_ERRORS,
    Buffer,
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
    vector_start,
    where,
)
from ketch.protocol.codec import ERROR_NAMES, MAX_ITEMS, DecodeError, build_tensor, decode, finish
from ketch.protocol.templates import (
    SENTINEL,
    LearntTemplates,
    Prebuilds,
    Template,
    field_at,
    strings_at,
    vector_at,
)

_RQ = schema.PredictRequest
_RP = schema.PredictReply
_O = schema.Output
_TF = schema.Tensor
_I64 = np.dtype("<i8")
_U32 = np.dtype("<u4")
REQUEST_TEMPLATE_ITEMS = 2 * MAX_ITEMS  # batches up to this size are rendered from a template
_PREBUILT = range(1, MAX_ITEMS + 1)  # the sizes of a family built ahead of need

# One output of a PredictReply: (ok, dtype or None, shape, error code, message)
Output = tuple[bool, int | None, tuple[int, ...], int, str]
# A batch's family: (model, version, dtype, shape of every item)
BatchFamily = tuple[str, str, int, tuple[int, ...]]


# ---------------------------------------------------------------- PredictRequest


def build_predict_request(
    batch_id: int,
    model: str,
    model_version: str,
    dtype: int,
    ndim: int,
    shapes: np.ndarray[Any, Any] | Sequence[int],
    budgets_us: np.ndarray[Any, Any] | Sequence[int],
    traceparents: Sequence[str] = (),
    tracestates: Sequence[str] = (),
) -> bytes:
    """The PredictRequest header, field for field as ``encode`` writes it; ``traceparents``
    (and ``tracestates``), when given, one per item ("" for an untraced one)."""
    b = flatbuffers.Builder(128 + 8 * len(shapes) + 4 * len(budgets_us))
    tp_off = _strings(b, traceparents) if traceparents else None
    ts_off = _strings(b, tracestates) if any(tracestates) else None
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
    if tp_off is not None:
        _PReq.AddTraceparents(b, tp_off)
    if ts_off is not None:
        _PReq.AddTracestates(b, ts_off)
    return finish(b, schema.Body.PredictRequest, _PReq.End(b))


def _strings(b: flatbuffers.Builder, values: Sequence[str]) -> int:
    offs = [b.CreateString(v) for v in values]
    b.StartVector(4, len(offs), 4)
    for off in reversed(offs):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


@lru_cache(maxsize=4096)
def predict_template(
    model: str, model_version: str, dtype: int, shape: tuple[int, ...], n: int = 1
) -> Template:
    """A PredictRequest of ``n`` items of one shape; render(batch_id, budget_us_0, ...)."""
    data = build_predict_request(
        SENTINEL, model, model_version, dtype, len(shape), list(shape) * n, [SENTINEL] * n
    )
    buf, pos = where(decode(data)[2])
    first = vector_at(buf, pos, _RQ.BUDGETS_US)
    return Template(
        data, ((field_at(buf, pos, _RQ.BATCH_ID), "<Q"), *((first + 4 * i, "<I") for i in range(n)))
    )


TRACEPARENT_CHARS = 55  # a version-00 traceparent: the one size a traced template holds


@lru_cache(maxsize=1024)
def traced_predict_template(
    model: str, model_version: str, dtype: int, shape: tuple[int, ...], n: int = 1
) -> Template:
    """A PredictRequest of ``n`` items of one shape, each with a version-00 traceparent and
    no tracestate; render(batch_id, budget_us_0, ..., traceparent_0 as 55 ASCII bytes, ...)."""
    data = build_predict_request(
        SENTINEL,
        model,
        model_version,
        dtype,
        len(shape),
        list(shape) * n,
        [SENTINEL] * n,
        ["0" * TRACEPARENT_CHARS] * n,
    )
    buf, pos = where(decode(data)[2])
    first = vector_at(buf, pos, _RQ.BUDGETS_US)
    texts = strings_at(buf, pos, _RQ.TRACEPARENTS)
    return Template(
        data,
        (
            (field_at(buf, pos, _RQ.BATCH_ID), "<Q"),
            *((first + 4 * i, "<I") for i in range(n)),
            *((t, f"{TRACEPARENT_CHARS}s") for t in texts),
        ),
    )


def templated_traces(parents: Sequence[str], states: Sequence[str]) -> list[bytes] | None:
    """Each item's traceparent as a traced template's slot values, or None when the batch
    must be built (an untraced item, a traceparent of another version, a tracestate)."""
    if any(states):
        return None
    out = []
    for tp in parents:
        if len(tp) != TRACEPARENT_CHARS or not tp.isascii():
            return None
        out.append(tp.encode("ascii"))
    return out


class RequestSender:
    """The broker's end: a batch of items of one shape (up to REQUEST_TEMPLATE_ITEMS) rendered
    from its template, the family's other sizes queued in ``prebuilds`` the first time; any
    other batch built."""

    __slots__ = ("_wanted", "prebuilds")

    def __init__(self, prebuilds: Prebuilds) -> None:
        self.prebuilds = prebuilds
        self._wanted: set[BatchFamily] = set()  # families handed to prebuilds (at most its limit)

    def header(
        self,
        batch_id: int,
        family: BatchFamily,
        budgets: list[int],
        shapes: list[tuple[int, ...]] | None = None,
        traces: tuple[list[str], list[str]] | None = None,
    ) -> bytes:
        """The header of a batch of ``len(budgets)`` items of ``family``; ``shapes``: each item's
        shape when they differ (the family's shape is then the first item's); ``traces``: each
        item's (traceparent, tracestate) lists when some are traced (a traced batch is built)."""
        if traces is not None and shapes is None and len(budgets) <= REQUEST_TEMPLATE_ITEMS:
            tps = templated_traces(*traces)
            if tps is not None:  # every item traced, version 00, no tracestate
                return traced_predict_template(*family, len(budgets)).render(batch_id, *budgets, *tps)
        if traces is None and shapes is None and len(budgets) <= REQUEST_TEMPLATE_ITEMS:
            if family not in self._wanted:  # a call saved per batch once a family is queued
                self.prebuilds.want(predict_template, family, _PREBUILT)
                if len(self._wanted) < self.prebuilds.limit:
                    self._wanted.add(family)
            return predict_template(*family, len(budgets)).render(batch_id, *budgets)
        model, version, dtype, shape = family
        flat = [d for s in shapes or [shape] * len(budgets) for d in s]
        parents, states = traces or ((), ())
        return build_predict_request(
            batch_id, model, version, dtype, len(shape), flat, budgets, parents, states
        )


class PredictRequestView(NamedTuple):
    batch_id: int
    model: str
    model_version: str
    dtype: int
    ndim: int
    shapes: tuple[int, ...]  # ndim entries per item
    budgets_us: tuple[int, ...]
    traceparents: tuple[str, ...] = ()  # per item ("" untraced); () when none is traced
    tracestates: tuple[str, ...] = ()


def read_predict_request(body: Any) -> PredictRequestView:
    """A decoded PredictRequest, read straight from its bytes; raises DecodeError."""
    buf, pos = where(body)
    try:
        f = slots(buf, pos)
        tp_off = slot(f, _RQ.TRACEPARENTS)
        if tp_off:
            traces = (
                read_strings(buf, pos, tp_off),
                read_strings(buf, pos, slot(f, _RQ.TRACESTATES)),
            )
        else:
            traces = ((), ())
        return PredictRequestView(
            read_u64(buf, pos, slot(f, _RQ.BATCH_ID)),
            read_text(buf, pos, slot(f, _RQ.MODEL)),
            read_text(buf, pos, slot(f, _RQ.MODEL_VERSION)),
            read_u8(buf, pos, slot(f, _RQ.DTYPE)),
            read_u8(buf, pos, slot(f, _RQ.NDIM)),
            read_vector(buf, pos, slot(f, _RQ.SHAPES), "q"),
            read_vector(buf, pos, slot(f, _RQ.BUDGETS_US), "I"),
            *traces,
        )
    except FIELD_ERRORS as exc:
        raise DecodeError(f"PredictRequest does not decode: {type(exc).__name__}") from None


class RequestReceiver(LearntTemplates[tuple[int, tuple[int, ...], int]]):
    """A replica's end: ``match`` (inherited) reads a learnt request from its slots, giving
    ``([batch_id, budget_0, ...], (dtype, shape, n))``; ``learn_request`` keeps a request of
    items of one shape, just read the long way, as a template of itself (the broker is its
    only sender)."""

    __slots__ = ()

    def learn_request(
        self, header: bytes, body: Any, request: PredictRequestView, traced: bool = False
    ) -> bool:
        """``traced``: a receiver of traced requests, whose every item has a version-00
        traceparent and no tracestate; its matches end with each item's traceparent bytes.
        A receiver of untraced requests learns none that is traced, and the reverse."""
        n = len(request.budgets_us)
        shape = request.shapes[: request.ndim]
        if self.full or not n or request.shapes != shape * n:
            return False
        if traced != bool(request.traceparents):
            return False
        if traced and (
            len(request.traceparents) != n
            or templated_traces(request.traceparents, request.tracestates) is None
        ):
            return False
        buf, pos = where(body)
        f = slots(buf, pos)
        id_off = slot(f, _RQ.BATCH_ID)
        if not id_off:
            return False
        first = vector_start(buf, pos, slot(f, _RQ.BUDGETS_US))
        texts = strings_at(buf, pos, _RQ.TRACEPARENTS) if traced else []
        template = Template(
            header,
            (
                (pos + id_off, "<Q"),
                *((first + 4 * i, "<I") for i in range(n)),
                *((t, f"{TRACEPARENT_CHARS}s") for t in texts),
            ),
        )
        return self.learn(header, template, (request.dtype, shape, n))


# ---------------------------------------------------------------- PredictReply


def build_predict_reply(
    batch_id: int,
    compute_us: int,
    outputs: Sequence[tuple[int, int | None, Sequence[int], int, str]],
    error: int = 0,
    message: str = "",
) -> bytes:
    """``outputs``: (status, dtype, shape, error, message) per item; dtype None for none."""
    b = flatbuffers.Builder(64 + 48 * len(outputs))
    offs = []
    for status, dtype, shape, err, msg in outputs:
        tensor_off = build_tensor(b, dtype, shape) if dtype is not None else None
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
    return finish(b, schema.Body.PredictReply, _PRep.End(b))


@lru_cache(maxsize=1024)
def predict_reply_many_template(dtype: int, shape: tuple[int, ...], n: int) -> Template:
    """A PredictReply with ``n`` OK outputs of one type; render(batch_id, compute_us)."""
    ok = schema.Status.OK
    data = build_predict_reply(SENTINEL, SENTINEL, [(ok, dtype, shape, 0, "")] * n)
    buf, pos = where(decode(data)[2])
    return Template(
        data, ((field_at(buf, pos, _RP.BATCH_ID), "<Q"), (field_at(buf, pos, _RP.COMPUTE_US), "<I"))
    )


class PredictReplySender:
    """A replica's end: the template of a reply of ``n`` OK outputs of one type, the other
    sizes (up to MAX_ITEMS, or the replica's own max batch) queued in ``prebuilds``."""

    __slots__ = ("prebuilds", "sizes")

    def __init__(self, prebuilds: Prebuilds, max_batch: int = 0) -> None:
        self.prebuilds = prebuilds
        self.sizes = range(1, min(max_batch or MAX_ITEMS, MAX_ITEMS) + 1)

    def template(self, dtype: int, shape: tuple[int, ...], n: int) -> Template:
        self.prebuilds.want(predict_reply_many_template, (dtype, shape), self.sizes)
        return predict_reply_many_template(dtype, shape, n)


_BATCH_ID = {"PredictRequest": _RQ.BATCH_ID, "PredictReply": _RP.BATCH_ID}


def read_batch_id(body: Any, name: str = "PredictReply") -> int:
    """The batch id of a decoded PredictReply (or PredictRequest); 0 when it does not decode."""
    buf, pos = where(body)
    try:
        return read_u64(buf, pos, slot(slots(buf, pos), _BATCH_ID[name]))
    except FIELD_ERRORS:
        return 0


class PredictReplyView(NamedTuple):
    compute_us: int
    outputs: list[Output]  # an ERROR output's code is MODEL_ERROR when absent or unknown
    error: int
    message: str


def read_predict_reply(body: Any) -> PredictReplyView:
    """A decoded PredictReply, read straight from its bytes; raises DecodeError."""
    buf, pos = where(body)
    model_error = schema.ErrorCode.MODEL_ERROR
    try:
        f = slots(buf, pos)
        outputs: list[Output] = []
        for at in read_tables(buf, pos, slot(f, _RP.OUTPUTS)):
            o = slots(buf, at)
            if read_u8(buf, at, slot(o, _O.STATUS)) == schema.Status.OK:
                t = read_table(buf, at, slot(o, _O.OUTPUT))
                if t is None:
                    outputs.append((True, None, (), 0, ""))
                else:
                    tf = slots(buf, t)
                    dtype = read_u8(buf, t, slot(tf, _TF.DTYPE))
                    outputs.append((True, dtype, read_vector(buf, t, slot(tf, _TF.SHAPE), "q"), 0, ""))
            else:
                code = read_u16(buf, at, slot(o, _O.ERROR))
                code = code if code in ERROR_NAMES and code != schema.ErrorCode.NONE else model_error
                outputs.append((False, None, (), code, read_text(buf, at, slot(o, _O.MESSAGE))))
        return PredictReplyView(
            read_u32(buf, pos, slot(f, _RP.COMPUTE_US)),
            outputs,
            read_u16(buf, pos, slot(f, _RP.ERROR)),
            read_text(buf, pos, slot(f, _RP.MESSAGE)),
        )
    except FIELD_ERRORS as exc:
        raise DecodeError(f"PredictReply does not decode: {type(exc).__name__}") from None


class PredictReplyReceiver(LearntTemplates[tuple[Output, int]]):
    """The broker's end: ``match`` (inherited) reads a learnt reply of plain outputs from its
    slots, giving ``([batch_id, compute_us], (output, n))``; ``learn_reply`` keeps a reply just
    read the long way whose outputs are all OK and of one type as a template of itself."""

    __slots__ = ()

    def learn_reply(self, header: Buffer, body: Any, outputs: list[Output]) -> bool:
        first = outputs[0] if outputs else None
        if first is None or first[1] is None or self.full or any(o != first for o in outputs):
            return False
        buf, pos = where(body)
        f = slots(buf, pos)
        id_off, us_off = slot(f, _RP.BATCH_ID), slot(f, _RP.COMPUTE_US)
        if not id_off or not us_off:
            return False
        template = Template(bytes(buf), ((pos + id_off, "<Q"), (pos + us_off, "<I")))
        return self.learn(header, template, (first, len(outputs)))
