"""Answering queries: every query held by the broker ends here, exactly once.

A query (``Pending``) is answered with its model's output, an error, or the app's default
(at its deadline, or when no model can answer). ``finish`` takes it out of everything that
holds it (deadlines, its model's queue, its client's count, its cache flight); the answer
goes to the client (``Replies``) or, for one model's part of a multi-model query, to its
``Fanout`` (``Ensembles``). A batch whose outputs are all OK and of one type is answered in
bulk (``answer_plain``).
"""

from __future__ import annotations

import json
import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

import zmq
from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status
from ketch.protocol.limits import U32_MAX

from ketchd.registry import App, Fanout, Pending, Replica
from ketchd.stats import LATENCY_BUCKETS_S, Histogram

if TYPE_CHECKING:
    from ketchd.broker import Broker

EMPTY = b""


class Answers:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def deliver(self, p: Pending, item: proto.ReplyFields, payload: Any) -> None:
        """A query's answer goes to its client, or to its Fanout when it is one model's part."""
        if p.parent is None:
            self.broker.replies.reply(p.client, item, payload)
        else:
            self.broker.ensembles.sub_answered(p, item, payload)

    def finish(self, p: Pending, duration: Histogram | None = None) -> float:
        """Mark a query answered; returns its latency in ms. A client's own query (not one
        model's part of an ensemble) counts to its app's figures, its end-to-end latency to
        ``duration`` (its app's histogram of the model and version that answered), or to its
        app's ("", "") histogram for an answer no model gave (a default, an error)."""
        b = self.broker
        key = p.cache_key
        if key is not None:
            # reached only when an answer path did not release the flight itself (release
            # clears p.cache_key, so the key is taken first)
            b.flights.promote(b.flights.release(p), key)
        p.done = True
        if p.trace is not None:
            b.traces.answered(p, "answered")
        p.payload = EMPTY  # whatever still holds the query need not hold its input
        b.deadlines.discard(p.deadline, p)  # so that its objects go now, not at the deadline
        if p.queued:
            b.models[p.model].lane(p.version).queue.discard(p)
        self.release_client(p)
        seconds = time.monotonic() - p.arrived
        ms = seconds * 1000
        if p.parent is None:  # a Fanout keeps the figures of its parts itself
            app = p.app
            app.answered += 1
            app.latency.add(ms)
            if duration is None:
                duration = app.durations.get("", "")
            duration.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # .observe, inline
            duration.sum += seconds
        return ms

    def release_client(self, p: Pending | Fanout) -> None:
        """What ``p`` (a query, or an ensemble's query) counted to its client: one outstanding
        query and its payload bytes."""
        b = self.broker
        outstanding = b.outstanding
        left = outstanding.get(p.client)
        if left is not None:
            if left <= 1:
                del outstanding[p.client]
            else:
                outstanding[p.client] = left - 1
        n = p.nbytes
        if n:  # its payload bytes, counted to its client (Limits)
            p.nbytes = 0
            b.held_bytes -= n
            held = b.client_bytes
            n = held.get(p.client, n) - n
            if n > 0:
                held[p.client] = n
            else:
                held.pop(p.client, None)

    def answer_output(
        self, p: Pending, replica: Replica, dtype: int, shape: tuple[int, ...], payload: Any
    ) -> None:
        if p.cache_key is not None:
            key = p.cache_key
            flights = self.broker.flights
            followers = flights.release(p)
            out = payload.buffer if isinstance(payload, zmq.Frame) else payload
            data = p.payload.buffer if isinstance(p.payload, zmq.Frame) else p.payload
            try:  # under the version and fingerprint of the replica that computed it, as its own
                fp, version = replica.fingerprint, replica.version  # cache.version_key, inline
                key = (key[0], f"{version}\x00{fp}" if fp else version, *key[2:])
                flights.cache.put(key, data, dtype, shape, out, replica.identity)
            except Exception as exc:  # a bug of the cache: the answer still goes, uncached
                self.broker.faults.internal_error("the prediction cache storing an answer", exc)
            for f in followers:
                self.answer_output(f, replica, dtype, shape, bytes(out))
        own = p.parent is None  # a client's own query, not one model's part of an ensemble
        ms = self.finish(p, p.app.durations.get(replica.model, replica.version) if own else None)
        item = proto.ReplyFields(
            p.request_id,
            Status.OK,
            dtype,
            shape,
            model=replica.model,
            model_version=replica.version,
            latency_us=int(ms * 1000),
            models_answered=(replica.model,),
        )
        self.deliver(p, item, payload)

    def answer_error(self, p: Pending, code: int, message: str) -> None:
        if p.cache_key is not None and code == ErrorCode.MODEL_ERROR:
            # the model fails this input: identical queries waiting on it share the error
            for f in self.broker.flights.release(p):
                self.answer_error(f, code, message)
        ms = self.finish(p)
        if p.parent is None:
            p.app.errors += 1
        item = proto.ReplyFields(
            p.request_id, Status.ERROR, error=code, message=message, latency_us=int(ms * 1000)
        )
        self.deliver(p, item, EMPTY)

    def answer_default(self, p: Pending, why: str, code: int = ErrorCode.DEADLINE) -> None:
        if p.parent is not None:  # one model of several gave no answer: its Fanout decides
            self.finish(p)
            self.deliver(p, proto.ReplyFields(p.request_id, Status.DEFAULT, message=why), EMPTY)
            return
        ms = self.finish(p)
        missing = [p.model] if p.model else []
        item, payload = default_answer(p.app, p.request_id, why, ms, code, [], missing, 0.0)
        self.deliver(p, item, payload)

    def answer_item(self, p: Pending, replica: Replica, i: int, output: proto.Output, payload: Any) -> None:
        """Answer ``p`` from output ``i`` of its batch: the prediction, or why there is none."""
        ok, dtype, shape, code, message = output
        if not ok:
            self.answer_error(p, code, f"model {replica.model!r}: {message}")
            return
        problem = "has no type" if dtype is None else output_problem(dtype, shape, len(payload))
        if problem or dtype is None:
            self.broker.counters["bad_outputs"] += 1
            self.answer_error(p, ErrorCode.MODEL_ERROR, f"model {replica.model!r} output {i}: {problem}")
            return
        self.answer_output(p, replica, dtype, shape, payload)

    def answer_plain(
        self, replica: Replica, items: list[Pending], output: proto.Output, payloads: list[Any]
    ) -> None:
        """A batch whose outputs are all OK and of one type (the common case). A query that is
        a client's own (not one model's part of an ensemble, not a cache leader) with an
        output of the right size is answered as two values of a reply template, its id and
        latency (sent by ``Replies.flush``), without a ReplyFields and its checks of its own."""
        _, dtype, shape, _, _ = output
        assert dtype is not None
        want = proto.expected_nbytes(dtype, shape)  # None: any size fits (or an unknown dtype)
        typed = not output_problem(dtype, shape, want or 0)  # the per-item check, minus the size
        family = (replica.model, replica.version, dtype, shape)
        plain = self.broker.replies.plain_out
        finish = self.finish
        app, duration = None, None  # the histogram of the last query's app (a batch is mostly one app's)
        for i, (p, payload) in enumerate(zip(items, payloads, strict=True)):
            if p.done:
                continue
            if (
                not typed
                or (want is not None and len(payload) != want)
                or p.parent is not None
                or p.cache_key is not None
                or not p.request_id
            ):  # the way of any other answer, which says what is wrong, if anything
                self.answer_item(p, replica, i, output, payload)
                continue
            if p.app is not app:
                app = p.app
                labels = (replica.model, replica.version)
                duration = app.durations.by_labels.get(labels) or app.durations.get(*labels)
            latency_us = max(1, int(finish(p, duration) * 1000))
            if latency_us > U32_MAX:  # a uint32 field: saturates
                latency_us = U32_MAX
            answers = plain.get((p.client, family))
            if answers is None:
                answers = plain[(p.client, family)] = ([], [])
            answers[0].extend((p.request_id, latency_us))
            answers[1].append(payload)

    def expire(self, now: float) -> None:
        """Answer every query whose deadline has passed: its Fanout's reply, or the default."""
        b = self.broker
        for p in b.deadlines.due(now):
            if p.done:
                continue
            if isinstance(p, Fanout):
                b.ensembles.complete(p, at_deadline=True)
                continue
            model = b.models.get(p.model)
            slo = (p.deadline - p.arrived) * 1000
            if p.replica is not None:
                p.replica.late += 1
                why = f"deadline: model {p.model!r} did not answer within {slo:.0f} ms"
            elif model is None or not any(model.live_replicas(p.version or None)):
                version = p.version or (model.active_version if model else None)
                why = (
                    f"no replica: model {p.model!r}"
                    + (f" version {version!r}" if version else "")
                    + " has no live replica"
                )
            else:
                why = f"deadline: query waited {slo:.0f} ms in the queue of model {p.model!r}"
                if p.queued or p.followers is not None:
                    model.dropped += 1
            b.counters["deadline_defaults"] += 1
            self.answer_default(p, why)


def default_answer(
    app: App,
    request_id: int,
    why: str,
    ms: float,
    code: int,
    answered: list[str],
    missing: list[str],
    confidence: float,
) -> tuple[proto.ReplyFields, bytes]:
    """The app's default output with the reason, or the error ``code`` when it has none."""
    if not app.has_default:
        app.errors += 1
        item = proto.ReplyFields(
            request_id,
            Status.ERROR,
            error=code,
            message=f"{why}; app {app.name!r} has no default output",
            latency_us=int(ms * 1000),
            models_answered=tuple(answered),
            models_missing=tuple(missing),
        )
        return item, EMPTY
    app.defaults += 1
    item = proto.ReplyFields(
        request_id,
        Status.DEFAULT,
        proto.JSON,
        (),
        message=why,
        latency_us=int(ms * 1000),
        confidence=float(confidence),
        models_answered=tuple(answered),
        models_missing=tuple(missing),
    )
    return item, json.dumps(app.default).encode("utf-8")


def shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("any" if d < 0 else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def output_problem(dtype: int, shape: tuple[int, ...], nbytes: int) -> str:
    """Why a model's output does not hold together ('' when it does)."""
    if dtype not in proto.DTYPE_NAMES:
        return f"unknown dtype {dtype}"
    if shape and min(shape) < 0:
        return f"negative dimension in shape {shape_text(shape)}"
    want = proto.expected_nbytes(dtype, shape)
    if want is not None and want != nbytes:
        shape_text_ = shape_text(shape)
        return f"{nbytes} bytes do not fit {proto.dtype_name(dtype)} of shape {shape_text_} ({want} bytes)"
    return ""
