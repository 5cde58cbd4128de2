"""The broker's part of a trace (``ketch.tracing``; docs/tracing.md).

A Query that names a valid W3C traceparent gives each of its queries a ``QueryTrace``.
When this broker traces (OpenTelemetry configured), each traced query has a queue span
(``ketch.queue``: its arrival to its dispatch, or to its answer when it is answered
without a batch: the cache, a default, an error), child of the caller's context; each
batch that holds a traced query has one batch span (``ketch.batch``: the RPC to the
replica, send to reply), child of the first traced query's queue span and linked to every
traced query's queue span (OpenTelemetry's way for an operation done for several traces at
once). The replica is sent, per item, the context its work belongs under: the batch span
for the query the batch span is a child of, its own queue span for each other traced
query. A broker that does not trace passes each query's context on unchanged.

Untraced queries cost a ``None`` test where a span would start; nothing here runs for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ketch import tracing

if TYPE_CHECKING:
    from ketchd.registry import Batch, Model, Pending, Replica


class QueryTrace:
    """One traced query: the context its replica is sent (``traceparent``, ``tracestate``)
    and, when the broker traces, its queue span (open until dispatch or answer)."""

    __slots__ = ("queue_open", "span", "traceparent", "tracestate")

    def __init__(self, traceparent: str, tracestate: str, span: Any = None) -> None:
        self.traceparent, self.tracestate, self.span = traceparent, tracestate, span
        self.queue_open = span is not None


class Traces:
    def __init__(self) -> None:
        self.tracer = tracing.tracer("broker")  # None: this broker makes no spans

    def query(
        self, pair: tuple[str, str], app: str, model: str, request_id: int, priority: int
    ) -> QueryTrace:
        """A traced query's trace, its queue span started now (when this broker traces)."""
        t = self.tracer
        if t is None:
            return QueryTrace(*pair)
        span = t.start(
            "ketch.queue",
            parent=t.context(*pair),
            attributes={
                "ketch.app": app,
                "ketch.model": model,
                "ketch.request_id": request_id,
                "ketch.priority": priority,
            },
        )
        return QueryTrace(*t.carrier(span), span)

    def answered(self, p: Pending, how: str) -> None:
        """``p`` is answered: its queue span, if still open, ends (answered without a batch)."""
        qt = p.trace
        if qt is not None and qt.queue_open:
            qt.queue_open = False
            qt.span.set_attribute("ketch.outcome", how)
            qt.span.end()

    def batch(
        self, batch_id: int, model: Model, replica: Replica, items: list[Pending]
    ) -> tuple[Any, tuple[list[str], list[str]]] | None:
        """At the dispatch of a batch of ``items``: None when none is traced; else (its batch
        span or None, each item's (traceparent, tracestate) lists for the replica). The
        queue spans of its traced queries end here."""
        traced = [p.trace for p in items if p.trace is not None]
        if not traced:
            return None
        t = self.tracer
        if t is None:
            return None, (
                [p.trace.traceparent if p.trace else "" for p in items],
                [p.trace.tracestate if p.trace else "" for p in items],
            )
        for qt in traced:
            if qt.queue_open:
                qt.queue_open = False
                qt.span.set_attribute("ketch.outcome", "dispatched")
                qt.span.set_attribute("ketch.batch_id", batch_id)
                qt.span.end()
        first = traced[0]
        # a link to every traced query, its parent's too: OpenTelemetry's rule for an
        # operation done for a batch (a parent is optional, links are not)
        links = [t.Link(qt.span.get_span_context()) for qt in traced]
        span = t.start(
            "ketch.batch",
            parent=first.span,
            kind=t.CLIENT,
            links=links,
            attributes={
                "ketch.batch_id": batch_id,
                "ketch.model": model.name,
                "ketch.model_version": replica.version,
                "ketch.replica": replica.replica_id,
                "ketch.batch_size": len(items),
                "ketch.traced": len(traced),
            },
        )
        parent, state = t.carrier(span)
        parents, states = [], []
        for p in items:
            qt = p.trace
            if qt is None:
                parents.append("")
                states.append("")
            elif qt is first:
                parents.append(parent)
                states.append(state)
            else:
                parents.append(qt.traceparent)
                states.append(qt.tracestate)
        return span, (parents, states)

    def batch_done(self, batch: Batch, compute_ms: float, rpc_ms: float, failure: str) -> None:
        """The batch's reply came (or its replica left): its span ends."""
        t, span = self.tracer, batch.span
        if t is None or span is None:
            return
        batch.span = None
        span.set_attribute("ketch.compute_ms", compute_ms)
        span.set_attribute("ketch.rpc_ms", rpc_ms)
        if failure:
            t.fail(span, failure)
        span.end()
