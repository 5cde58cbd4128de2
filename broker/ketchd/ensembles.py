"""Queries that a selection policy sends to several models (or learns from), and feedback.

An app whose policy is not ``single`` fans each query out: one ``Pending`` per selected
model, gathered by a ``Fanout`` that replies at the first answer (``weighted``, ``exp3``,
``shadow``) or when every answering model has answered, or at the deadline with those that
arrived, whichever is first: a straggler never holds a reply. Answered queries are kept
(bounded) for feedback, which the policy learns from.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import zmq
from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status

from ketchd.answers import EMPTY, default_answer
from ketchd.cache import digest128
from ketchd.policies import Single
from ketchd.registry import App, Fanout, Pending

if TYPE_CHECKING:
    from ketchd.broker import Broker


# bytes charged per remembered query beyond its outputs and context: the Fanout, its selection
# and the three table slots (measured with tracemalloc: 1.5-2.2 KiB)
_ENTRY_OVERHEAD = 2048


class Recent:
    """Answered multi-model queries kept for feedback, oldest out, bounded in count and in
    bytes (their outputs, their context and a fixed overhead each; their inputs are not
    kept, only a digest of each).

    By request id they are the client's own: the key is its *owner*, the connection that
    sent it, or with CurveZMQ on the client's public key (so the same key holder may name
    it from another connection, a gateway worker or the CLI). By input, any client that
    has the input may name the latest query of that app with it.
    """

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self.by_id: OrderedDict[tuple[bytes, int], Fanout] = OrderedDict()
        self.by_input: OrderedDict[tuple[str, bytes], Fanout] = OrderedDict()
        self.sizes: OrderedDict[int, tuple[Fanout, tuple[bytes, int], tuple[str, bytes], int]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.sizes)

    def add(self, f: Fanout, owner: bytes, digest: bytes) -> None:
        size = _ENTRY_OVERHEAD + len(f.context) + sum(len(o[2]) for o in f.outputs.values())
        if size > self.max_bytes or not self.max_count:
            return
        by_id, by_input = (owner, f.request_id), (f.app.name, digest)
        old = self.by_id.get(by_id)
        if old is not None:
            self._drop(old)
        self.by_id[by_id] = f
        self.by_input[by_input] = f
        self.sizes[id(f)] = (f, by_id, by_input, size)
        self.bytes += size
        self._trim()

    def grow(self, f: Fanout, nbytes: int) -> None:
        """A straggler's output joined a remembered query: count it (and trim)."""
        entry = self.sizes.get(id(f))
        if entry is not None:
            self.sizes[id(f)] = (*entry[:3], entry[3] + nbytes)
            self.bytes += nbytes
            self._trim()

    def _trim(self) -> None:
        while self.sizes and (self.bytes > self.max_bytes or len(self.sizes) > self.max_count):
            self._drop(next(iter(self.sizes.values()))[0])

    def _drop(self, f: Fanout) -> None:
        entry = self.sizes.pop(id(f), None)
        if entry is None:
            return
        _, by_id, by_input, size = entry
        self.bytes -= size
        if self.by_id.get(by_id) is f:
            del self.by_id[by_id]
        if self.by_input.get(by_input) is f:
            del self.by_input[by_input]


class Ensembles:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        cfg = broker.config
        self.recent = Recent(cfg.feedback_memory, cfg.feedback_memory_bytes)  # for feedback

    def fan_out(
        self,
        client: bytes,
        app: App,
        ids: list[int],
        payloads: list[zmq.Frame],
        dtype: int,
        shape: tuple[int, ...],
        timeout_us: int,
        priority: int,
        context: str,
        now: float,
        trace: tuple[str, str] | None = None,
    ) -> None:
        """Queries of an app with a selection policy: one Pending per selected model (each a
        queue span of its own in a traced query's trace)."""
        b = self.broker
        cfg = b.config
        deadline = now + (timeout_us / 1e6 if timeout_us else app.slo_ms / 1e3)
        for rid, payload in zip(ids, payloads, strict=True):
            try:
                sel = app.policy.select(app.models, context)
            except Exception as exc:  # a policy's bug: this query gets INTERNAL, the loop goes on
                b.faults.internal_error(f"app {app.name!r}'s policy choosing models", exc)
                app.errors += 1
                item = proto.ReplyFields(
                    rid,
                    Status.ERROR,
                    error=ErrorCode.INTERNAL,
                    message=b.faults.message("choosing models", exc),
                )
                b.replies.reply(client, item, EMPTY)
                continue
            # models whose queue is full, or whose queue ahead would keep it past its deadline
            full = [
                m for m in sel.send_to if b.overload.admissible(b.models[m], now, deadline, priority) <= 0
            ]
            if set(sel.answer_from) <= set(full):
                app.errors += 1
                b.counters["refused_overloaded"] += 1
                item = proto.ReplyFields(
                    rid,
                    Status.ERROR,
                    error=ErrorCode.OVERLOADED,
                    message=f"no room in time at model {', '.join(full)} (queue full or overloaded)",
                    retry_after_ms=cfg.retry_after_ms,
                )
                b.replies.reply(client, item, EMPTY)
                continue
            f = Fanout(
                client, rid, app, sel, context, payload, dtype, shape, now, deadline, priority=priority
            )
            f.nbytes = n = len(payload)
            b.held_bytes += n
            b.client_bytes[client] = b.client_bytes.get(client, 0) + n
            b.outstanding[client] = b.outstanding.get(client, 0) + 1
            b.deadlines.add(deadline, f)
            for m in sel.send_to:
                model = b.models[m]
                if m in full:
                    f.failed[m] = f"model {m!r} has no room in time (queue full or overloaded)"
                    continue
                sub = Pending(b"", rid, app, m, payload, shape, dtype, now, deadline, priority, parent=f)
                if trace is not None:
                    sub.trace = b.traces.query(trace, app.name, m, rid, priority)
                caching = app.cache and model.deterministic and b.cache.max_bytes > 0 and model.active_version
                if caching and b.flights.from_cache_or_flight(sub, model):
                    continue
                model.queue.push(sub)
                model.admitted += 1
                model.latest_deadline = deadline
                b.deadlines.add(deadline, sub)
                b.dispatcher.dirty.add(model)

    def sub_answered(self, p: Pending, item: proto.ReplyFields, payload: Any) -> None:
        """One model's part of a Fanout got its answer (prediction, error or default)."""
        f = p.parent
        assert f is not None
        if item.status == Status.OK:
            assert item.dtype is not None
            data = payload.buffer if isinstance(payload, zmq.Frame) else payload
            f.outputs[p.model] = (item.dtype, tuple(item.shape or ()), bytes(data), item.model_version)
            if f.done:  # a straggler: its answer is kept for feedback, and counted
                self.recent.grow(f, len(data))
        else:
            f.failed[p.model] = item.message
        if not f.done:
            sel = f.selection
            if not sel.wait_all and item.status == Status.OK and p.model in sel.answer_from:
                self.complete(f, first=p.model)
            elif f.settled(sel.answer_from):
                self.complete(f)
        if f.done and not f.shadows_recorded and f.settled(f.selection.send_to):
            self.record_shadows(f)

    @staticmethod
    def decoded(f: Fanout, models: list[str]) -> dict[str, Any]:
        """The outputs of ``models`` that arrived, as values (those that do not decode left out)."""
        out = {}
        for m in models:
            raw = f.outputs.get(m)
            if raw is not None:
                try:
                    out[m] = proto.payload_to_value(raw[0], raw[1], raw[2])
                except proto.DecodeError:
                    continue
        return out

    def record_shadows(self, f: Fanout) -> None:
        f.shadows_recorded = True
        sel = f.selection
        shadows = [m for m in sel.send_to if m not in sel.answer_from]
        if not shadows:
            return
        primary = self.decoded(f, sel.answer_from)
        if not primary:
            return
        answers = self.decoded(f, shadows)
        try:
            f.app.policy.record_shadow(
                next(iter(primary.values())), answers, [m for m in shadows if m not in answers]
            )
        except Exception as exc:  # a policy's bug: figures only, the client has its answer
            self.broker.faults.internal_error(f"app {f.app.name!r}'s policy recording shadows", exc)

    def release(self, f: Fanout) -> float:
        """Mark a Fanout answered: out of the deadlines and its client's counts; its latency (ms)."""
        b = self.broker
        f.done = True
        b.deadlines.discard(f.deadline, f)
        b.answers.release_client(f)
        return (time.monotonic() - f.arrived) * 1000

    def fail(self, f: Fanout, message: str) -> None:
        """Answer a Fanout INTERNAL (a bug left it unanswered)."""
        if not f.done:
            self.release(f)
        f.app.errors += 1
        item = proto.ReplyFields(f.request_id, Status.ERROR, error=ErrorCode.INTERNAL, message=message)
        self.broker.replies.reply(f.client, item, EMPTY)

    def complete(self, f: Fanout, first: str | None = None, at_deadline: bool = False) -> None:
        """Reply to the client from what has arrived: exactly once, even when the policy or
        its combiner raises (then INTERNAL)."""
        ms = self.release(f)
        f.app.answered += 1
        f.app.latency.add(ms)
        f.app.durations.get("", "").observe(ms / 1000)
        try:
            self.remember(f)
            self._reply(f, ms, first, at_deadline)
        except Exception as exc:  # a bug of the policy, its combiner or here: INTERNAL, counted
            where = f"app {f.app.name!r} combining its models' answers"
            self.broker.faults.internal_error(where, exc)
            self.fail(f, self.broker.faults.message(where, exc))

    def _reply(self, f: Fanout, ms: float, first: str | None, at_deadline: bool) -> None:
        b = self.broker
        app = f.app
        sel = f.selection
        if first is not None:  # the first answer goes as it came, undecoded
            dtype, shape, payload, version = f.outputs[first]
            item = proto.ReplyFields(
                f.request_id,
                Status.OK,
                dtype,
                shape,
                model=first,
                model_version=version,
                latency_us=int(ms * 1000),
                models_answered=(first,),
            )
            b.replies.reply(f.client, item, payload)
            return
        answers = self.decoded(f, sel.answer_from)
        combined = app.policy.combine(answers, sel.answer_from, f.context)
        if app.policy.use_default(combined):
            if not combined.answered:
                reasons = "; ".join(f"{m}: {why}" for m, why in f.failed.items() if m in sel.answer_from)
                why = (
                    f"deadline: no model answered within {(f.deadline - f.arrived) * 1000:.0f} ms"
                    if at_deadline
                    else f"no model answered ({reasons})"
                )
            else:
                why = (
                    f"confidence {combined.confidence:.2f} is below the app's minimum "
                    f"{app.policy.options().get('min_confidence', 0):.2f}"
                )
            item, payload = default_answer(
                app, f.request_id, why, ms, ErrorCode.DEADLINE, combined.answered, combined.missing,
                combined.confidence,
            )  # fmt: skip
            b.replies.reply(f.client, item, payload)
            return
        try:
            dtype, shape, payload = proto.encode_output(combined.output)
        except (TypeError, ValueError) as exc:
            app.errors += 1
            item = proto.ReplyFields(
                f.request_id,
                Status.ERROR,
                error=ErrorCode.MODEL_ERROR,
                message=f"answers do not combine: {exc}",
            )
            b.replies.reply(f.client, item, EMPTY)
            return
        model = combined.model or (combined.answered[0] if combined.answered else "")
        item = proto.ReplyFields(
            f.request_id,
            Status.OK,
            dtype,
            shape,
            model=model,
            model_version=f.outputs[model][3] if model in f.outputs else "",
            latency_us=int(ms * 1000),
            confidence=float(combined.confidence),
            models_answered=tuple(combined.answered),
            models_missing=tuple(combined.missing),
        )
        b.replies.reply(f.client, item, payload)

    def remember(self, f: Fanout) -> None:
        """Keep an answered query for feedback (``Recent``: bounded in count and bytes), by its
        owner and request id and by the digest of its input, which is then let go."""
        payload = f.payload
        digest = digest128(_data(payload))
        self.recent.add(f, self.owner(f.client, payload), digest)
        f.payload = EMPTY

    def owner(self, client: bytes, frame: Any) -> bytes:
        """Who sent a message: its connection, or with CurveZMQ on, the client's public key
        (read from ``frame``, any frame of that message)."""
        if self.broker.config.curve_secret and isinstance(frame, zmq.Frame):
            try:
                user = frame.get("User-Id")
            except zmq.ZMQError:  # no such property: not authenticated by Curve
                user = None
            if isinstance(user, str) and user:
                return b"key:" + user.encode()
        return client

    def on_feedback(self, client: bytes, fb: dict[str, Any], frames: list[zmq.Frame]) -> None:
        """A Feedback message (its fields read by ``proto.read_fields``) and its payloads."""
        b = self.broker
        rid, app_name = fb["request_id"], fb["app"]
        app = b.apps.get(app_name)

        def answer(code: int, message: str = "") -> None:
            status = Status.OK if code == ErrorCode.NONE else Status.ERROR
            b.replies.reply(client, proto.ReplyFields(rid, status, error=code, message=message), EMPTY)

        if app is None:
            answer(ErrorCode.UNKNOWN_APP, f"no app named {app_name!r}")
            return
        if isinstance(app.policy, Single):
            answer(
                ErrorCode.INVALID,
                f"app {app_name!r} uses the single policy, which learns nothing from feedback; "
                f"choose one that does: ketch app set-policy {app_name} exp3 (or exp4, weighted, shadow)",
            )
            return
        label_t, input_t = fb["label"], fb["input"]
        if label_t is None or len(frames) != (2 if input_t is not None else 1):
            answer(
                ErrorCode.BAD_MESSAGE, "feedback needs a label (and its input frame when it names the input)"
            )
            return
        too_large = b.limits.feedback_problem(frames)
        if too_large:
            answer(ErrorCode.TOO_LARGE, too_large)
            return
        if input_t is not None:
            f = self.recent.by_input.get((app_name, digest128(frames[0].buffer)))
        else:  # a query id names one of this client's own queries, never another's
            f = self.recent.by_id.get((self.owner(client, frames[-1]), fb["query_id"]))
        if f is None or f.app is not app:
            answer(
                ErrorCode.NOT_FOUND,
                "no recent query of this app matches (by query id: one of this client's own;"
                " answered queries are kept for a while)",
            )
            return
        try:
            label = proto.payload_to_value(label_t["dtype"], label_t["shape"], frames[-1].buffer)
        except proto.DecodeError as exc:
            answer(ErrorCode.BAD_INPUT, f"label does not decode: {exc}")
            return
        answers = self.decoded(f, list(f.outputs))
        try:
            app.policy.feedback(answers, label, f.context, selection=f.selection)
        except (ValueError, TypeError) as exc:  # the policy's word: this label does not fit
            answer(ErrorCode.BAD_INPUT, f"feedback not taken: {exc}")
            return
        except Exception as exc:  # a policy's bug: INTERNAL, counted, the loop goes on
            where = f"app {app_name!r}'s policy learning from feedback"
            b.faults.internal_error(where, exc)
            answer(ErrorCode.INTERNAL, b.faults.message(where, exc))
            return
        app.policy_dirty = True
        answer(ErrorCode.NONE)


def _data(payload: Any) -> Any:
    return payload.buffer if isinstance(payload, zmq.Frame) else payload
