"""The frontend: client messages in, queries checked and admitted (or refused at once).

A Query is read from a learnt template when it is one (``QueryReceiver``), else the long
way. Its queries are checked as a whole (the app, the input type, the client's and the
queue's limits) and one by one (payload size, finiteness): every refused query gets an
explicit answer. An admitted query goes to its app's policy: a ``single`` app queues it on
its model (through the cache, ``Flights``); any other fans out (``Ensembles``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import zmq
from ketch import errors, tracing
from ketch import protocol as proto
from ketch.pins import no_version, split_pin
from ketch.protocol import ErrorCode, Status

from ketchd.answers import EMPTY, shape_text
from ketchd.convert import to_app_dtype
from ketchd.policies import Single
from ketchd.registry import App, Model, Pending

if TYPE_CHECKING:
    from ketchd.broker import Broker

_QUERY_TEMPLATES = 1024  # Query templates learnt, at most


class Admission:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # Query messages as clients render them (proto.query_template), learnt from messages
        # read the long way, with their query type
        self.queries = proto.QueryReceiver(_QUERY_TEMPLATES)
        # and traced ones (a version-00 traceparent, no tracestate), whose matches end with it
        self.traced_queries = proto.QueryReceiver(_QUERY_TEMPLATES)

    def client_error(
        self, client: bytes, code: int, message: str, request_id: int = 0, retry: int = 0
    ) -> None:
        """A message-level Error to a client (no request id to answer, or none readable)."""
        b = self.broker
        b.counters[f"client_error_{errors.code_name(code).lower()}"] += 1
        header = proto.encode(
            "Error",
            {"code": code, "message": message, "request_id": request_id, "retry_after_ms": retry},
        )
        b.frontend.send_multipart([client, header])

    def on_frontend(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        found = self.queries.match(frames[1]) if len(frames) >= 3 else None
        if found is not None:  # a Query as a client renders it: no parse
            ids, query = found
            self.admit(client, *query, ids, frames[2:])
            return
        if self.traced_queries and len(frames) >= 3:
            found = self.traced_queries.match(frames[1])
            if found is not None:  # a traced Query as a client renders it
                values, query = found
                traceparent = values.pop().decode("latin-1")
                self.admit(client, *query, values, frames[2:], tracing.clean(traceparent, ""))
                return
        if len(frames) < 2:
            self.client_error(client, ErrorCode.BAD_MESSAGE, "empty message: a header frame is required")
            return
        trace = None
        try:  # decoding only: a bug past it is not the client's fault (Faults)
            name, body = proto.decode_current(frames[1].buffer)
            if name == "Query":
                read = self.broker.limits.read_query(client, body)  # None: over the limits, answered
                if read is None:
                    return
                query, ids = read
                trace = proto.read_query_trace(body)
            elif name == "Feedback":
                feedback = proto.read_fields(name, body)
            else:
                self.client_error(client, ErrorCode.UNKNOWN_MESSAGE, f"{name} is not a client message")
                return
        except proto.UnknownMessage as exc:
            self.client_error(client, ErrorCode.UNKNOWN_MESSAGE, str(exc))
            return
        except proto.UnsupportedVersion as exc:
            self.client_error(
                client,
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {exc.version} is not supported"
                f" (this broker speaks {proto.versions.describe(proto.PROTOCOL_VERSIONS)})",
            )
            return
        except proto.DecodeError as exc:
            self.client_error(client, ErrorCode.BAD_MESSAGE, str(exc))
            return
        if name == "Feedback":
            self.broker.ensembles.on_feedback(client, feedback, frames[2:])
            return
        if not ids:
            self.client_error(client, ErrorCode.BAD_MESSAGE, "query without request ids")
            return
        if trace is not None:
            trace = tracing.clean(*trace)  # not a valid traceparent: an untraced query
        self.admit(client, *query, ids, frames[2:], trace)
        if trace is None:
            self.queries.learn_query(body, query, len(ids))
        elif not trace[1]:
            self.traced_queries.learn_query(body, query, len(ids), traced=True)

    def admit(
        self,
        client: bytes,
        app_name: str,
        dtype: int,
        shape: tuple[int, ...],
        timeout_us: int,
        priority: int,
        context: str,
        model_version: str,
        ids: list[int],
        payloads: list[zmq.Frame],
        trace: tuple[str, str] | None = None,
    ) -> None:
        """Queue (or answer) the queries of one message: checks, then the app's policy;
        ``trace``: the caller's W3C (traceparent, tracestate), already checked."""
        b = self.broker
        cfg = b.config
        now = time.monotonic()

        def refuse(code: int, message: str, retry: int = 0) -> None:
            b.counters[f"refused_{errors.code_name(code).lower()}"] += 1
            for rid in ids:
                item = proto.ReplyFields(rid, Status.ERROR, error=code, message=message, retry_after_ms=retry)
                b.replies.reply(client, item, EMPTY)

        if b.stopping:
            refuse(ErrorCode.SHUTTING_DOWN, "the broker is shutting down", cfg.retry_after_ms)
            return
        if len(payloads) != len(ids):
            refuse(
                ErrorCode.BAD_MESSAGE,
                f"query names {len(ids)} request ids but carries {len(payloads)} payload frames",
            )
            return
        app = b.apps.get(app_name)
        if app is None:
            names = sorted(b.apps)
            known = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
            refuse(ErrorCode.UNKNOWN_APP, f"no app named {app_name!r} (apps: {known or 'none'})")
            return
        app.queries += len(ids)
        if dtype != app.input_dtype:  # float32 for a float64 app, say: converted when lossless
            converted, why = to_app_dtype(app, dtype, shape, payloads)
            if why:
                app.errors += len(ids)
                refuse(ErrorCode.BAD_INPUT, why)
                return
            if converted:
                dtype, payloads = app.input_dtype, converted
        problem = check_input(app, dtype, shape)
        if problem:
            app.errors += len(ids)
            refuse(ErrorCode.BAD_INPUT, problem)
            return
        bad = bad_items(app, dtype, shape, payloads)
        if bad:  # those items fail alone: a message may carry many callers' queries
            app.errors += len(bad)
            b.counters["refused_bad_input"] += len(bad)
            for i, why in bad.items():
                item = proto.ReplyFields(ids[i], Status.ERROR, error=ErrorCode.BAD_INPUT, message=why)
                b.replies.reply(client, item, EMPTY)
            keep = [i for i in range(len(ids)) if i not in bad]
            if not keep:
                return
            ids, payloads = [ids[i] for i in keep], [payloads[i] for i in keep]
        if not app.models:
            self.answer_without_model(client, app, ids, now, f"app {app.name!r} links no model")
            return
        outstanding = b.outstanding.get(client, 0)
        if outstanding + len(ids) > cfg.max_client_outstanding:
            app.errors += len(ids)
            refuse(
                ErrorCode.OVERLOADED,
                f"this client has {outstanding} queries outstanding (limit {cfg.max_client_outstanding})",
                cfg.retry_after_ms,
            )
            return
        nbytes = sum(map(len, payloads))
        if (
            b.held_bytes + nbytes > cfg.max_held_bytes
            or b.client_bytes.get(client, 0) + nbytes > cfg.max_client_bytes
        ):
            app.errors += len(ids)
            refuse(ErrorCode.OVERLOADED, b.limits.bytes_refusal(client, nbytes), cfg.retry_after_ms)
            return
        if model_version:  # pinned: that version's lane, whatever the app's selection
            try:
                model = pinned_lane(b.models, app, model_version)
            except errors.RequestError as exc:
                app.errors += len(ids)
                refuse(exc.code, exc.message)
                return
        elif not isinstance(app.policy, Single):
            b.ensembles.fan_out(
                client, app, ids, payloads, dtype, shape, timeout_us, priority, context, now, trace
            )
            return
        else:
            try:
                model = b.models[app.policy.select(app.models, context).send_to[0]]
            except Exception as exc:  # a policy's bug: these queries get INTERNAL, the loop goes on
                b.faults.internal_error(f"app {app.name!r}'s policy choosing a model", exc)
                refuse(ErrorCode.INTERNAL, b.faults.message("choosing a model", exc))
                return
        deadline = now + (timeout_us / 1e6 if timeout_us else app.slo_ms / 1e3)
        # admit in order what fits, in the queue's bound and in time (ketchd.overload);
        # each query past that is refused alone, and one answered from the cache needs no room
        take = admissible = b.overload.admissible(model, now, deadline, priority)
        flights = b.flights
        deterministic = b.models[model.name].deterministic if model.pinned else model.deterministic
        caching = app.cache and deterministic and flights.cache.max_bytes > 0 and model.active_version
        b.outstanding[client] = outstanding + len(ids)
        b.held_bytes += nbytes
        b.client_bytes[client] = b.client_bytes.get(client, 0) + nbytes
        queue, deadlines = model.queue, b.deadlines
        for rid, payload in zip(ids, payloads, strict=True):
            p = Pending(client, rid, app, model.name, payload, shape, dtype, now, deadline, priority)
            p.nbytes = len(payload)
            if model_version:
                p.version = model.active_version or ""
            if trace is not None:
                p.trace = b.traces.query(trace, app.name, model.name, rid, priority)
            if caching and flights.from_cache_or_flight(p, model, lead=take > 0):
                continue
            if take <= 0:
                b.overload.refuse(p, model, now)
                continue
            take -= 1
            queue.push(p)
            deadlines.add(deadline, p)
        model.admitted += max(0, admissible) - max(0, take)  # queued (take falls by one each)
        model.latest_deadline = deadline
        b.dispatcher.dirty.add(model)

    def answer_without_model(self, client: bytes, app: App, ids: list[int], now: float, why: str) -> None:
        answers = self.broker.answers
        for rid in ids:
            p = Pending(client, rid, app, "", EMPTY, (), 0, now, now)
            answers.answer_default(p, why, code=ErrorCode.NO_MODEL)


def pinned_lane(models: dict[str, Model], app: App, model_version: str) -> Model:
    """The lane (``Model.lane``) of the version a query pins (``ketch.pins``), past the app's
    selection; NotFound for a version the model does not have."""
    name, version = split_pin(app.name, app.models, model_version)
    model = models.get(name)
    if model is None or not version or version not in model.known_versions:
        raise no_version(name, version, model.known_versions if model is not None else ())
    return model.lane(version)


def check_input(app: App, dtype: int, shape: tuple[int, ...]) -> str:
    """What is wrong with a whole message's input type for ``app`` ("" when nothing)."""
    want = app.input_shape
    if dtype != app.input_dtype or not (
        len(want) == len(shape) and all(w < 0 or w == s for w, s in zip(want, shape, strict=True))
    ):
        return (
            f"app {app.name!r} takes {proto.dtype_name(app.input_dtype)} inputs of shape "
            f"{shape_text(want)}, got {proto.dtype_name(dtype)} of shape {shape_text(shape)}"
        )
    if any(s < 0 for s in shape):
        return f"shape {shape_text(shape)} has a negative dimension"
    return ""


def bad_items(app: App, dtype: int, shape: tuple[int, ...], payloads: list[zmq.Frame]) -> dict[int, str]:
    """The items whose payload does not fit the shape, or is not finite where the app takes
    finite numbers only, with the reason."""
    bad = {}
    nbytes = proto.expected_nbytes(dtype, shape)
    if nbytes is not None:
        for i, frame in enumerate(payloads):
            if len(frame) != nbytes:
                bad[i] = f"item {i}: payload of {len(frame)} bytes, shape {shape_text(shape)} needs {nbytes}"
    np_dtype = proto.NUMPY_DTYPES.get(dtype)
    if app.finite_only and np_dtype is not None and np_dtype.kind == "f":
        for i, frame in enumerate(payloads):
            if i not in bad and not np.isfinite(np.frombuffer(frame.buffer, np_dtype)).all():
                bad[i] = f"NaN or infinity, and app {app.name!r} takes finite numbers only"
    return bad
