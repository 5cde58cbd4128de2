"""The broker: one thread, one poll loop, all routing state.

    clients (DEALER) -> frontend ROUTER -> app -> model queue (EDF) -> batch
                                                              |
    model containers (DEALER) <- backend ROUTER <- replica with free credit (pull)

Each turn of ``run`` waits on the three sockets for at most the time to the next
deadline or heartbeat, handles every message that is waiting, answers queries whose
deadline passed (the app's default, or an explicit error), dispatches batches to
replicas that have credit, and flushes the replies gathered during the turn (one Reply
message per client per turn). Nothing here blocks: the state store writes on its own
thread.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import structlog
import zmq
from ketch import _errors as errors
from ketch import _multipart as multipart
from ketch import _protocol as proto
from ketch.wire.ErrorCode import ErrorCode
from ketch.wire.Status import Status

from ketchd.admin import AdminOps
from ketchd.batching import BatchController, decide
from ketchd.cache import PredictionCache
from ketchd.config import BrokerConfig
from ketchd.deadlines import Deadlines
from ketchd.policies import Policy, Single
from ketchd.registry import App, Batch, Fanout, Model, Pending, Replica, ReplicaState, next_batch_id
from ketchd.store import StateStore

log = structlog.get_logger("ketchd")

_DRAIN = 512  # messages taken from one socket per turn, so no socket starves the others
_EMPTY = b""
_NOBLOCK = multipart.NOBLOCK
_QUERY_TEMPLATES = 1024  # Query templates learnt, at most
_QUERY_TEMPLATE_IDS = 64  # ids in a learnt Query template, at most
_REQUEST_TEMPLATE_ITEMS = 128  # batches up to this size are rendered from a template
_REPLY_TEMPLATES = 1024  # replica reply templates learnt, at most
_REPLY_ITEMS = 64  # answers in one Reply at most (more go in several)
_PREBUILT_SIZES = range(1, _REPLY_ITEMS + 1)  # templates built ahead of need, when idle


class Broker:
    def __init__(self, config: BrokerConfig | None = None, ctx: zmq.Context | None = None) -> None:
        self.config = config or BrokerConfig()
        self.ctx = ctx or zmq.Context.instance()
        self.apps: dict[str, App] = {}
        self.models: dict[str, Model] = {}
        self.replicas: dict[bytes, Replica] = {}  # connection identity -> replica
        self.replica_ids: dict[str, bytes] = {}  # stable replica id -> identity
        self.batches: dict[int, Batch] = {}
        self.counters: Counter[str] = Counter()
        self.started = time.time()
        self.endpoints: dict[str, str] = {}
        self._deadlines = Deadlines()  # every query held, until it is answered or its deadline passes
        self._seq = itertools.count()
        self._dirty: set[Model] = set()
        self._out: dict[bytes, list[tuple[proto.ReplyFields, Any]]] = defaultdict(list)
        # plain predictions by (client, (model, version, dtype, shape)): ([id, latency_us, ...], payloads)
        self._plain_out: dict[tuple[bytes, tuple], tuple[list[int], list[Any]]] = {}
        self._held_admin: dict[int, tuple[bytes, bytes]] = {}
        self.cache = PredictionCache(self.config.cache_bytes, self.config.cache_ttl_s)
        self._flights: dict[Any, list[Pending]] = {}  # cache key -> leaders computing it
        self._batch_timers: dict[Model, float] = {}  # model -> when to look at its queue again
        self._outstanding: dict[bytes, int] = {}  # client identity -> queries held for it
        # Query messages as clients render them (proto.query_template), learnt from messages
        # parsed the long way, with their parsed fields; and replicas' replies of plain outputs
        # (proto.predict_reply_many_template), with the output's (ok, dtype, shape, code,
        # message) and count
        self._query_templates = proto.LearntTemplates(_QUERY_TEMPLATES)
        self._plain_replies = proto.LearntTemplates(_REPLY_TEMPLATES)
        self._prebuilds = proto.Prebuilds()  # client replies and batch requests, other sizes
        # recent multi-model queries, for feedback: (client, request id) and (app, input digest)
        self._recent: OrderedDict[tuple[bytes, int], Fanout] = OrderedDict()
        self._recent_inputs: OrderedDict[tuple[str, bytes], Fanout] = OrderedDict()
        self._recent_ids: OrderedDict[int, Fanout] = OrderedDict()  # by request id alone (another client)
        self._stopping = False
        self._stop_reason = ""
        self._next_housekeeping = 0.0
        self._next_policy_save = 0.0
        self.store: StateStore | None = None
        self.admin_ops = AdminOps(self)

    # ------------------------------------------------------------ life cycle

    def bind(self) -> dict[str, str]:
        """Create and bind the three sockets; returns the bound endpoints."""
        cfg = self.config
        self._start_curve()
        self.frontend = self._router(cfg.frontend, "frontend")
        self.backend = self._router(cfg.backend, "backend")
        self.admin = self._router(cfg.admin, "admin")
        return self.endpoints

    def _start_curve(self) -> None:
        self._auth = None
        cfg = self.config
        if not cfg.curve_secret:
            return
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        folders = {"frontend": cfg.curve_clients, "backend": cfg.curve_containers, "admin": cfg.curve_admins}
        flags = {"frontend": "--curve-clients", "backend": "--curve-containers", "admin": "--curve-admins"}
        missing = [flags[role] for role, folder in folders.items() if not folder]
        if missing:
            raise ValueError(f"Curve is on: {', '.join(missing)} must name folders of allowed public keys")
        self._curve_public, self._curve_secret = zmq.auth.load_certificate(cfg.curve_secret)
        if self._curve_secret is None:
            raise ValueError(f"{cfg.curve_secret} holds no secret key (use the .key_secret file)")
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        for role, folder in folders.items():
            self._auth.configure_curve(domain=role, location=folder)
        log.info("curve on", **folders)

    def _router(self, address: str, role: str) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if self._auth is not None:
            sock.zap_domain = role.encode()
            sock.curve_secretkey = self._curve_secret
            sock.curve_publickey = self._curve_public
            sock.curve_server = True
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.sndhwm = 100_000
        sock.rcvhwm = 100_000
        sock.bind(address)
        self.endpoints[role] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return sock

    def load_state(self) -> None:
        self._durable = self.ctx.socket(zmq.PAIR)
        self._durable.linger = 0
        address = f"inproc://ketchd-store-{id(self)}"
        self._durable.bind(address)
        self.store = StateStore(self.config.state_path, self.ctx, address)
        for doc in self.store.load("models"):
            model = Model.from_json(doc)
            model.queue = type(model.queue)()
            self.models[model.name] = model
        states = {doc["app"]: doc["state"] for doc in self.store.load("policies")}
        for doc in self.store.load("apps"):
            app = App.from_json(doc)
            if app.name in states:
                try:
                    app.policy = Policy.from_state(states[app.name])
                except ValueError as exc:
                    log.warning("policy state not loaded", app=app.name, error=str(exc))
            self.apps[app.name] = app
        log.info("state loaded", path=self.config.state_path, apps=len(self.apps), models=len(self.models))

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop taking queries; ``run`` returns once every held query is answered."""
        if not self._stopping:
            self._stopping = True
            self._stop_reason = reason
            log.info("broker draining", reason=reason, pending=self.pending_count())

    def pending_count(self) -> int:
        return sum(1 for p in self._deadlines.items() if not p.done)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))

    def run(self, ready: Callable[[dict[str, str]], None] | None = None) -> None:
        if not self.endpoints:
            self.bind()
        if self.store is None:
            self.load_state()
        log.info("broker listening", pid=os.getpid(), **self.endpoints)
        if ready is not None:
            ready(self.endpoints)
        poller = zmq.Poller()
        for sock in (self.backend, self.frontend, self.admin, self._durable):
            poller.register(sock, zmq.POLLIN)
        handlers = {
            self.backend: self._on_backend,
            self.frontend: self._on_frontend,
            self.admin: self._on_admin,
            self._durable: self._on_durable,
        }
        try:
            while not (self._stopping and self.pending_count() == 0):
                prebuild = bool(self._prebuilds)
                events = poller.poll(0 if prebuild else self._poll_timeout_ms())
                if prebuild and not events:  # idle: build a template before a burst needs it
                    self._prebuilds.step()
                for sock, _ in events:
                    self._drain(sock, handlers[sock])
                    if sock is self.backend:
                        self._flush()  # answers leave before the rest of the turn's work
                now = time.monotonic()
                self._expire(now)
                if now >= self._next_housekeeping:
                    self._housekeeping(now)
                self._dispatch(now)
                self._flush()
        finally:
            self.close()

    def close(self) -> None:
        if self.store is not None:
            self.save_policies()
            self.store.close()
            self.store = None
        for name in ("frontend", "backend", "admin", "_durable"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
            self._auth = None
        log.info("broker stopped", reason=self._stop_reason or "closed")

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nxt = self._next_housekeeping
        due = self._deadlines.next_due()
        if due is not None:
            nxt = min(nxt, due)
        if self._batch_timers:
            nxt = min(nxt, min(self._batch_timers.values()))
        return max(0, min(1000, int((nxt - now) * 1000) + 1))

    def _drain(self, sock: zmq.Socket, handler: Callable[[list[zmq.Frame]], None]) -> None:
        # ZMQ_EVENTS says whether another message waits; cheaper than a raised zmq.Again
        for _ in range(_DRAIN):
            try:
                frames = multipart.recv(sock, _NOBLOCK)
            except zmq.Again:
                return
            try:
                handler(frames)
            except Exception:  # a bug must not take the broker down with it
                self.counters["internal_errors"] += 1
                log.exception("handler failed")
            if not multipart.waiting(sock):
                return

    # ------------------------------------------------------------ frontend

    def _client_error(
        self, client: bytes, code: int, message: str, request_id: int = 0, retry: int = 0
    ) -> None:
        self.counters[f"client_error_{errors.code_name(code).lower()}"] += 1
        header = proto.encode(
            "Error",
            {"code": code, "message": message, "request_id": request_id, "retry_after_ms": retry},
        )
        self.frontend.send_multipart([client, header])

    @staticmethod
    def _header(frames: list[zmq.Frame], refuse: Callable[[bytes, int, str], None]) -> tuple[str, Any] | None:
        """(body name, body) of a message in the current version, or None once refused."""
        peer = frames[0].bytes
        if len(frames) < 2:
            refuse(peer, ErrorCode.BAD_MESSAGE, "empty message: a header frame is required")
            return None
        try:
            version, name, body = proto.decode(frames[1].buffer)
        except proto.DecodeError as exc:
            refuse(peer, ErrorCode.BAD_MESSAGE, str(exc))
            return None
        if version != proto.PROTOCOL_VERSION:
            refuse(
                peer,
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {version} is not supported (this broker speaks {proto.PROTOCOL_VERSION})",
            )
            return None
        return name, body

    def _on_frontend(self, frames: list[zmq.Frame]) -> None:
        client = frames[0].bytes
        found = self._query_templates.match(frames[1]) if len(frames) >= 3 else None
        if found is not None:  # a Query as a client renders it: no parse
            ids, query = found
            try:
                self._admit(client, *query, ids, frames[2:])
            except proto.FIELD_ERRORS as exc:  # as the long way below answers
                self._client_error(
                    client, ErrorCode.BAD_MESSAGE, f"Query does not decode: {type(exc).__name__}"
                )
            return
        header = self._header(frames, self._client_error)
        if header is None:
            return
        name, body = header
        try:
            if name == "Query":
                self._on_query(client, body, frames[2:])
            elif name == "Feedback":
                self._on_feedback(client, body, frames[2:])
            else:
                self._client_error(client, ErrorCode.UNKNOWN_MESSAGE, f"{name} is not a client message")
        except proto.FIELD_ERRORS as exc:  # a corrupt table: fields are read lazily
            self._client_error(client, ErrorCode.BAD_MESSAGE, f"{name} does not decode: {type(exc).__name__}")

    def _on_query(self, client: bytes, q: Any, payloads: list[zmq.Frame]) -> None:
        buf, pos = proto.where(q)  # fields read straight from the bytes (proto.slots)
        fields = proto.slots(buf, pos)
        ids = list(proto.read_vector(buf, pos, proto.slot(fields, 3), "Q"))
        if not ids:
            self._client_error(client, ErrorCode.BAD_MESSAGE, "query without request ids")
            return
        app_name = (proto.read_str(buf, pos, proto.slot(fields, 0)) or b"").decode("utf-8", "replace")
        off = proto.slot(fields, 1)
        dtype = proto.read_u8(buf, pos + off) if off else 0
        shape = proto.read_vector(buf, pos, proto.slot(fields, 2), "q")
        off = proto.slot(fields, 4)
        timeout_us = proto.read_u32(buf, pos + off) if off else 0
        off = proto.slot(fields, 5)
        priority = proto.read_i8(buf, pos + off) if off else 0
        context = (proto.read_str(buf, pos, proto.slot(fields, 6)) or b"").decode("utf-8", "replace")
        query = (app_name, dtype, tuple(shape), timeout_us, priority, context)
        self._admit(client, *query, ids, payloads)
        if len(ids) <= _QUERY_TEMPLATE_IDS and not self._query_templates.full:
            self._query_templates.learn(buf, proto.query_template(*query, len(ids)), query)

    def _admit(
        self,
        client: bytes,
        app_name: str,
        dtype: int,
        shape: tuple[int, ...],
        timeout_us: int,
        priority: int,
        context: str,
        ids: list[int],
        payloads: list[zmq.Frame],
    ) -> None:
        """Queue (or answer) the queries of one message: checks, then the app's policy."""
        now = time.monotonic()

        def refuse(code: int, message: str, retry: int = 0) -> None:
            self.counters[f"refused_{errors.code_name(code).lower()}"] += 1
            for rid in ids:
                self._reply(
                    client,
                    proto.ReplyFields(rid, Status.ERROR, error=code, message=message, retry_after_ms=retry),
                    _EMPTY,
                )

        if self._stopping:
            refuse(ErrorCode.SHUTTING_DOWN, "the broker is shutting down", self.config.retry_after_ms)
            return
        if len(payloads) != len(ids):
            refuse(
                ErrorCode.BAD_MESSAGE,
                f"query names {len(ids)} request ids but carries {len(payloads)} payload frames",
            )
            return
        app = self.apps.get(app_name)
        if app is None:
            known = ", ".join(sorted(self.apps)) or "none"
            refuse(ErrorCode.UNKNOWN_APP, f"no app named {app_name!r} (apps: {known})")
            return
        app.queries += len(ids)
        problem = self._check_input(app, dtype, shape)
        if problem:
            app.errors += len(ids)
            refuse(ErrorCode.BAD_INPUT, problem)
            return
        bad = self._bad_items(app, dtype, shape, payloads)
        if bad:  # those items fail alone: a message may carry many callers' queries
            app.errors += len(bad)
            self.counters["refused_bad_input"] += len(bad)
            for i, why in bad.items():
                self._reply(
                    client,
                    proto.ReplyFields(ids[i], Status.ERROR, error=ErrorCode.BAD_INPUT, message=why),
                    _EMPTY,
                )
            keep = [i for i in range(len(ids)) if i not in bad]
            if not keep:
                return
            ids, payloads = [ids[i] for i in keep], [payloads[i] for i in keep]
        if not app.models:
            self._answer_without_model(client, app, ids, now, f"app {app.name!r} links no model")
            return
        outstanding = self._outstanding.get(client, 0)
        if outstanding + len(ids) > self.config.max_client_outstanding:
            app.errors += len(ids)
            refuse(
                ErrorCode.OVERLOADED,
                f"this client has {outstanding} queries outstanding"
                f" (limit {self.config.max_client_outstanding})",
                self.config.retry_after_ms,
            )
            return
        if not isinstance(app.policy, Single):
            self._fan_out(
                client, app, ids, payloads, dtype, shape, timeout_us, priority, context, now, outstanding
            )
            return
        model = self.models[app.policy.select(app.models, context).send_to[0]]
        limit = model.max_queue or self.config.max_queue
        if len(model.queue) + len(ids) > limit:
            app.errors += len(ids)
            model.refused += len(ids)
            refuse(
                ErrorCode.OVERLOADED,
                f"queue of model {model.name!r} is full ({limit} queries)",
                self.config.retry_after_ms,
            )
            return
        deadline = now + (timeout_us / 1e6 if timeout_us else app.slo_ms / 1e3)
        caching = app.cache and model.deterministic and self.cache.max_bytes > 0 and model.active_version
        self._outstanding[client] = outstanding + len(ids)
        for rid, payload in zip(ids, payloads, strict=True):
            p = Pending(client, rid, app, model.name, payload, shape, dtype, now, deadline, priority)
            if caching and self._from_cache_or_flight(p, model):
                continue
            model.queue.push(p)
            self._deadlines.add(deadline, p)
        self._dirty.add(model)

    def _fan_out(
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
        outstanding: int,
    ) -> None:
        """Queries of an app with a selection policy: one Pending per selected model."""
        deadline = now + (timeout_us / 1e6 if timeout_us else app.slo_ms / 1e3)
        for rid, payload in zip(ids, payloads, strict=True):
            sel = app.policy.select(app.models, context)
            full = [
                m
                for m in sel.send_to
                if len(self.models[m].queue) >= (self.models[m].max_queue or self.config.max_queue)
            ]
            if set(sel.answer_from) <= set(full):
                app.errors += 1
                self.counters["refused_overloaded"] += 1
                item = proto.ReplyFields(
                    rid,
                    Status.ERROR,
                    error=ErrorCode.OVERLOADED,
                    message=f"queues of {', '.join(full)} are full",
                    retry_after_ms=self.config.retry_after_ms,
                )
                self._reply(client, item, _EMPTY)
                continue
            f = Fanout(
                client, rid, app, sel, context, payload, dtype, shape, now, deadline, priority=priority
            )
            self._outstanding[client] = self._outstanding.get(client, 0) + 1
            self._deadlines.add(deadline, f)
            for m in sel.send_to:
                model = self.models[m]
                if m in full:
                    f.failed[m] = f"queue of model {m!r} is full"
                    continue
                sub = Pending(b"", rid, app, m, payload, shape, dtype, now, deadline, priority, parent=f)
                caching = (
                    app.cache and model.deterministic and self.cache.max_bytes > 0 and model.active_version
                )
                if caching and self._from_cache_or_flight(sub, model):
                    continue
                model.queue.push(sub)
                self._deadlines.add(deadline, sub)
                self._dirty.add(model)

    def _sub_answered(self, p: Pending, item: proto.ReplyFields, payload: Any) -> None:
        """One model's part of a Fanout got its answer (prediction, error or default)."""
        f = p.parent
        if item.status == Status.OK:
            data = payload.buffer if isinstance(payload, zmq.Frame) else payload
            f.outputs[p.model] = (item.dtype, tuple(item.shape or ()), bytes(data), item.model_version)
        else:
            f.failed[p.model] = item.message
        if not f.done:
            sel = f.selection
            if not sel.wait_all and item.status == Status.OK and p.model in sel.answer_from:
                self._complete(f, first=p.model)
            elif f.settled(sel.answer_from):
                self._complete(f)
        if f.done and not f.shadows_recorded and f.settled(f.selection.send_to):
            self._record_shadows(f)

    def _decoded(self, f: Fanout, models: list[str]) -> dict[str, Any]:
        out = {}
        for m in models:
            raw = f.outputs.get(m)
            if raw is not None:
                try:
                    out[m] = proto.payload_to_value(raw[0], raw[1], raw[2])
                except (proto.DecodeError, *proto.FIELD_ERRORS):
                    continue
        return out

    def _record_shadows(self, f: Fanout) -> None:
        f.shadows_recorded = True
        sel = f.selection
        shadows = [m for m in sel.send_to if m not in sel.answer_from]
        if not shadows:
            return
        primary = self._decoded(f, sel.answer_from)
        if not primary:
            return
        answers = self._decoded(f, shadows)
        f.app.policy.record_shadow(
            next(iter(primary.values())), answers, [m for m in shadows if m not in answers]
        )

    def _complete(self, f: Fanout, first: str | None = None, at_deadline: bool = False) -> None:
        """Reply to the client from what has arrived."""
        f.done = True
        self._deadlines.discard(f.deadline, f)
        app = f.app
        sel = f.selection
        left = self._outstanding.get(f.client)
        if left is not None:
            if left <= 1:
                del self._outstanding[f.client]
            else:
                self._outstanding[f.client] = left - 1
        ms = (time.monotonic() - f.arrived) * 1000
        app.answered += 1
        app.latency.add(ms)
        self._remember(f)
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
            self._reply(f.client, item, payload)
            return
        answers = self._decoded(f, sel.answer_from)
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
            self._default_reply(f, why, ms, combined.answered, combined.missing, combined.confidence)
            return
        try:
            from ketch.runtime import encode_output

            dtype, shape, payload = encode_output(combined.output)
        except (TypeError, ValueError) as exc:
            app.errors += 1
            item = proto.ReplyFields(
                f.request_id,
                Status.ERROR,
                error=ErrorCode.MODEL_ERROR,
                message=f"answers do not combine: {exc}",
            )
            self._reply(f.client, item, _EMPTY)
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
        self._reply(f.client, item, payload)

    def _default_reply(
        self, f: Fanout, why: str, ms: float, answered: list[str], missing: list[str], confidence: float
    ) -> None:
        item, payload = _default_answer(
            f.app, f.request_id, why, ms, ErrorCode.DEADLINE, answered, missing, confidence
        )
        self._reply(f.client, item, payload)

    def _remember(self, f: Fanout) -> None:
        """Keep a bounded number of answered queries for feedback (by id and by input)."""
        limit = self.config.feedback_memory
        self._recent[(f.client, f.request_id)] = f
        self._recent_inputs[(f.app.name, _digest(f.payload))] = f
        self._recent_ids[f.request_id] = f
        for recent in (self._recent, self._recent_inputs, self._recent_ids):
            while len(recent) > limit:
                recent.popitem(last=False)

    def _from_cache_or_flight(self, p: Pending, model: Model) -> bool:
        """Answer ``p`` from the cache, or make it wait on an identical query in flight.

        Returns False when ``p`` must be computed; it is then the leader of its flight.
        """
        data = p.payload.buffer
        key = self.cache.key(model.name, model.active_version, p.dtype, p.shape, data)
        entry = self.cache.get(key, data)
        if entry is not None:
            model.cache_hits += 1
            p.app.cache_hits += 1
            ms = self._finish(p)
            item = proto.ReplyFields(
                p.request_id,
                Status.OK,
                entry.dtype,
                entry.shape,
                model=model.name,
                model_version=key[1],
                latency_us=int(ms * 1000),
                models_answered=(model.name,),
            )
            self._deliver(p, item, entry.output)
            return True
        leaders = self._flights.setdefault(key, [])
        for leader in leaders:
            if leader.payload.buffer == data:
                leader.followers.append(p)
                model.coalesced += 1
                self.cache.figures.coalesced += 1
                self._deadlines.add(p.deadline, p)
                return True
        p.cache_key, p.followers = key, []
        leaders.append(p)
        return False

    def _release_flight(self, p: Pending) -> list[Pending]:
        """End ``p``'s flight; returns its followers still waiting."""
        leaders = self._flights.get(p.cache_key)
        if leaders is not None:
            if p in leaders:
                leaders.remove(p)
            if not leaders:
                del self._flights[p.cache_key]
        followers = [f for f in p.followers or () if not f.done]
        p.cache_key, p.followers = None, None
        return followers

    def _promote(self, followers: list[Pending], key: Any) -> None:
        """The leader got no prediction: the first follower computes for the rest."""
        if not followers:
            return
        lead, rest = followers[0], followers[1:]
        model = self.models.get(lead.model)
        if model is None:
            for f in followers:
                self._answer_error(f, ErrorCode.NO_MODEL, f"model {lead.model!r} is gone")
            return
        lead.cache_key, lead.followers = key, rest
        self._flights.setdefault(key, []).append(lead)
        model.queue.push(lead)
        self._dirty.add(model)

    def _check_input(self, app: App, dtype: int, shape: tuple[int, ...]) -> str:
        """What is wrong with a whole message's input type for ``app`` ("" when nothing)."""
        want = app.input_shape
        if dtype != app.input_dtype or not (
            len(want) == len(shape) and all(w < 0 or w == s for w, s in zip(want, shape, strict=True))
        ):
            return (
                f"app {app.name!r} takes {proto.dtype_name(app.input_dtype)} inputs of shape "
                f"{_shape_text(want)}, got {proto.dtype_name(dtype)} of shape {_shape_text(shape)}"
            )
        if any(s < 0 for s in shape):
            return f"shape {_shape_text(shape)} has a negative dimension"
        return ""

    @staticmethod
    def _bad_items(app: App, dtype: int, shape: tuple[int, ...], payloads: list[zmq.Frame]) -> dict[int, str]:
        """The items whose payload does not fit the shape, or is not finite where the app
        takes finite numbers only, with the reason."""
        bad = {}
        nbytes = proto.expected_nbytes(dtype, shape)
        if nbytes is not None:
            for i, frame in enumerate(payloads):
                if len(frame) != nbytes:
                    bad[i] = (
                        f"item {i}: payload of {len(frame)} bytes, shape {_shape_text(shape)} needs {nbytes}"
                    )
        if app.finite_only and dtype in proto.NUMPY_DTYPES and proto.NUMPY_DTYPES[dtype].kind == "f":
            for i, frame in enumerate(payloads):
                if (
                    i not in bad
                    and not np.isfinite(np.frombuffer(frame.buffer, proto.NUMPY_DTYPES[dtype])).all()
                ):
                    bad[i] = f"NaN or infinity, and app {app.name!r} takes finite numbers only"
        return bad

    def _answer_without_model(self, client: bytes, app: App, ids: list[int], now: float, why: str) -> None:
        for rid in ids:
            p = Pending(client, rid, app, "", _EMPTY, (), 0, now, now)
            self._answer_default(p, why, code=ErrorCode.NO_MODEL)

    def _on_feedback(self, client: bytes, fb: Any, frames: list[zmq.Frame]) -> None:
        rid = fb.RequestId()
        app_name = (fb.App() or b"").decode("utf-8", "replace")
        app = self.apps.get(app_name)

        def answer(code: int, message: str = "") -> None:
            status = Status.OK if code == ErrorCode.NONE else Status.ERROR
            self._reply(client, proto.ReplyFields(rid, status, error=code, message=message), _EMPTY)

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
        label_t = fb.Label()
        input_t = fb.Input()
        if label_t is None or len(frames) != (2 if input_t is not None else 1):
            answer(
                ErrorCode.BAD_MESSAGE, "feedback needs a label (and its input frame when it names the input)"
            )
            return
        if input_t is not None:
            f = self._recent_inputs.get((app_name, _digest(frames[0].buffer)))
        else:
            # the same client first; then any client (feedback often comes from elsewhere)
            f = self._recent.get((client, fb.QueryId())) or self._recent_ids.get(fb.QueryId())
        if f is None or f.app is not app:
            answer(
                ErrorCode.NOT_FOUND,
                "no recent query of this app matches (answered queries are kept for a while)",
            )
            return
        try:
            shape = tuple(proto.numpy_vector(label_t, "Shape", np.dtype("<i8")).tolist())
            label = proto.payload_to_value(label_t.Dtype(), shape, frames[-1].buffer)
        except (proto.DecodeError, *proto.FIELD_ERRORS) as exc:
            answer(ErrorCode.BAD_INPUT, f"label does not decode: {exc}")
            return
        answers = self._decoded(f, list(f.outputs))
        try:
            app.policy.feedback(answers, label, f.context, selection=f.selection)
        except (ValueError, TypeError) as exc:
            answer(ErrorCode.BAD_INPUT, f"feedback not taken: {exc}")
            return
        app.policy_dirty = True
        answer(ErrorCode.NONE)

    # ------------------------------------------------------------ answers

    def _reply(self, client: bytes, item: proto.ReplyFields, payload: Any) -> None:
        self._out[client].append((item, payload))

    def _deliver(self, p: Pending, item: proto.ReplyFields, payload: Any) -> None:
        """A query's answer goes to its client, or to its Fanout when it is one model's part."""
        if p.parent is None:
            self._reply(p.client, item, payload)
        else:
            self._sub_answered(p, item, payload)

    def _flush(self) -> None:
        if self._plain_out:
            plain, self._plain_out = self._plain_out, {}
            for (client, family), (values, payloads) in plain.items():
                self._send_plain(client, family, values, payloads)
        if not self._out:
            return
        out, self._out = self._out, defaultdict(list)
        for client, entries in out.items():
            values = _plain_values(entries)
            if values is not None:  # plain predictions after all (a cache leader's, an ensemble's first)
                item = entries[0][0]
                family = (item.model, item.model_version, item.dtype, tuple(item.shape or ()))
                self._send_plain(client, family, values, [payload for _, payload in entries])
                continue
            for at in range(0, len(entries), _REPLY_ITEMS):
                chunk = entries[at : at + _REPLY_ITEMS]
                header = proto.build_reply([item for item, _ in chunk])
                multipart.send(self.frontend, [client, header, *[payload for _, payload in chunk]])

    def _send_plain(self, client: bytes, family: tuple, values: list[int], payloads: list[Any]) -> None:
        """Plain predictions of one model version and output type (``family``), rendered
        from its reply templates with an (id, latency) pair per answer, in Replies of at
        most 64 (the sizes built ahead)."""
        n = len(payloads)
        for at in range(0, n, _REPLY_ITEMS):
            end = min(n, at + _REPLY_ITEMS)
            header = proto.reply_ok_many_template(*family, end - at).render(*values[2 * at : 2 * end])
            multipart.send(self.frontend, [client, header, *payloads[at:end]])
        self._prebuilds.want(proto.reply_ok_many_template, family, _PREBUILT_SIZES)

    def _finish(self, p: Pending) -> float:
        """Mark a query answered; returns its latency in ms."""
        if p.cache_key is not None:
            # reached only when an answer path did not release the flight itself
            self._promote(self._release_flight(p), p.cache_key)
        p.done = True
        p.payload = _EMPTY  # whatever still holds the query need not hold its input
        self._deadlines.discard(p.deadline, p)  # so that its objects go now, not at the deadline
        if p.queued:
            self.models[p.model].queue.discard(p)
        left = self._outstanding.get(p.client)
        if left is not None:
            if left <= 1:
                del self._outstanding[p.client]
            else:
                self._outstanding[p.client] = left - 1
        ms = (time.monotonic() - p.arrived) * 1000
        if p.parent is None:  # a Fanout keeps the figures of its parts itself
            p.app.answered += 1
            p.app.latency.add(ms)
        return ms

    def _answer_output(
        self, p: Pending, replica: Replica, dtype: int, shape: tuple[int, ...], payload: Any
    ) -> None:
        if p.cache_key is not None:
            key = p.cache_key
            followers = self._release_flight(p)
            out = payload.buffer if isinstance(payload, zmq.Frame) else payload
            self.cache.put((*key[:1], replica.version, *key[2:]), p.payload.buffer, dtype, shape, out)
            for f in followers:
                self._answer_output(f, replica, dtype, shape, bytes(out))
        ms = self._finish(p)
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
        self._deliver(p, item, payload)

    def _answer_error(self, p: Pending, code: int, message: str) -> None:
        if p.cache_key is not None and code == ErrorCode.MODEL_ERROR:
            # the model fails this input: identical queries waiting on it share the error
            for f in self._release_flight(p):
                self._answer_error(f, code, message)
        ms = self._finish(p)
        if p.parent is None:
            p.app.errors += 1
        item = proto.ReplyFields(
            p.request_id, Status.ERROR, error=code, message=message, latency_us=int(ms * 1000)
        )
        self._deliver(p, item, _EMPTY)

    def _answer_default(self, p: Pending, why: str, code: int = ErrorCode.DEADLINE) -> None:
        if p.parent is not None:  # one model of several gave no answer: its Fanout decides
            self._finish(p)
            self._deliver(p, proto.ReplyFields(p.request_id, Status.DEFAULT, message=why), _EMPTY)
            return
        ms = self._finish(p)
        missing = [p.model] if p.model else []
        item, payload = _default_answer(p.app, p.request_id, why, ms, code, [], missing, 0.0)
        self._deliver(p, item, payload)

    def _expire(self, now: float) -> None:
        for p in self._deadlines.due(now):
            if p.done:
                continue
            if isinstance(p, Fanout):
                self._complete(p, at_deadline=True)
                continue
            model = self.models.get(p.model)
            slo = (p.deadline - p.arrived) * 1000
            if p.replica is not None:
                why = f"deadline: model {p.model!r} did not answer within {slo:.0f} ms"
            elif model is None or not any(model.live_replicas()):
                version = model.active_version if model else None
                why = (
                    f"no replica: model {p.model!r}"
                    + (f" version {version!r}" if version else "")
                    + " has no live replica"
                )
            else:
                why = f"deadline: query waited {slo:.0f} ms in the queue of model {p.model!r}"
                if p.queued or p.followers is not None:
                    model.dropped += 1
            self.counters["deadline_defaults"] += 1
            self._answer_default(p, why)

    # ------------------------------------------------------------ dispatch

    def _dispatch(self, now: float) -> None:
        for model, at in list(self._batch_timers.items()):
            if at <= now:
                self._dirty.add(model)
        if not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        for model in dirty:
            self._dispatch_model(model, now)

    def _dispatch_model(self, model: Model, now: float) -> None:
        """Send batches while a replica has credit and the batch controller says go."""
        queue = model.queue
        self._batch_timers.pop(model, None)
        while len(queue):
            # pull: the replica that can start soonest (then: with most credit) takes the next batch
            replica, best = None, (0.0, 0)
            for r in model.live_replicas():
                credit = r.free_credit
                if credit > 0:
                    key = (r.busy_ms(now) if r.inflight else 0.0, -credit)
                    if replica is None or key < best:
                        replica, best = r, key
            if replica is None:
                return
            busy = best[0]
            if replica.inflight:
                # pipelining: send the next batch just in time to hide the round trip,
                # not earlier, so it carries what arrives while the current one computes
                lead = max(1.0, 2 * replica.rpc_ewma_ms)
                if busy > lead:
                    self._batch_timers[model] = now + (busy - lead) / 1000
                    return
            controller = replica.controller
            if len(queue) == 1 and controller.policy.batch_delay_ms <= 0:
                send = 1  # one query is all there is to send (as decide() says, without asking)
            else:
                head = queue.peek()
                decision = decide(
                    controller, len(queue), (head.deadline - now) * 1000, (now - head.arrived) * 1000, busy
                )
                if decision.send == 0:  # wait a little to fill the batch
                    self._batch_timers[model] = now + decision.wait_ms / 1000
                    return
                send = decision.send
            items = []
            # a query that cannot finish in time even alone is not computed for nothing:
            # it gets its answer (the default) now, and its place goes to one that can
            fastest = controller.fastest_ms()
            needs = busy + max(1.5 * fastest, fastest + 1.0) if fastest is not None else 0.0
            hopeless = now + needs / 1000
            for p in queue.take(send):
                if p.deadline <= now:
                    continue  # answered by _expire
                if p.deadline < hopeless:
                    model.dropped += 1
                    left = (p.deadline - now) * 1000
                    self._answer_default(
                        p,
                        f"deadline: {left:.1f} ms left, model {model.name!r} needs about {needs:.1f} ms",
                    )
                    continue
                items.append(p)
                model.queue_wait_ms.add((now - p.arrived) * 1000)
            if items:
                budget = (min(p.deadline for p in items) - now) * 1000 - busy
                self._send_batch(model, replica, items, now, budget)

    def _send_batch(
        self, model: Model, replica: Replica, items: list[Pending], now: float, budget_ms: float
    ) -> None:
        batch_id = next_batch_id()
        budgets = [max(0, min(0xFFFFFFFF, int((p.deadline - now) * 1e6))) for p in items]
        shape = items[0].shape
        if len(items) <= _REQUEST_TEMPLATE_ITEMS and all(p.shape == shape for p in items):
            family = (model.name, replica.version, items[0].dtype, shape)
            header = proto.predict_template(*family, len(items)).render(batch_id, *budgets)
            self._prebuilds.want(proto.predict_template, family, _PREBUILT_SIZES)
        else:
            shapes = [d for p in items for d in p.shape]
            header = proto.build_predict_request(
                batch_id, model.name, replica.version, items[0].dtype, len(shape), shapes, budgets
            )
        multipart.send(self.backend, [replica.identity, header, *[p.payload for p in items]])
        # the books after the send: the replica computes meanwhile
        batch = Batch(batch_id, replica, items, now, budget_ms)
        replica.sizes.add(len(items))
        for p in items:
            p.replica = replica
        self.batches[batch_id] = batch
        replica.inflight[batch_id] = batch
        replica.refresh_state()
        replica.last_sent = now
        replica.batches += 1
        replica.items += len(items)
        model.batches += 1
        model.batched_items += len(items)

    # ------------------------------------------------------------ backend

    def _backend_error(self, identity: bytes, code: int, message: str) -> None:
        self.counters[f"container_error_{errors.code_name(code).lower()}"] += 1
        self.backend.send_multipart([identity, proto.encode("Error", {"code": code, "message": message})])

    def _on_backend(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        replica = self.replicas.get(identity)
        found = self._plain_replies.match(frames[1]) if replica is not None and len(frames) > 2 else None
        if found is not None and len(frames) == 2 + found[1][1]:  # plain outputs: no parse
            (batch_id, compute_us), (output, n) = found
            now = replica.last_seen = time.monotonic()
            try:
                self._batch_done(replica, batch_id, compute_us / 1000, [output] * n, "", frames[2:], now)
            except proto.FIELD_ERRORS as exc:  # as the long way below answers
                self._backend_error(
                    identity, ErrorCode.BAD_MESSAGE, f"PredictReply does not decode: {type(exc).__name__}"
                )
            return
        header = self._header(frames, self._backend_error)
        if header is None:
            return
        name, body = header
        try:
            self._on_container_message(identity, name, body, frames)
        except proto.FIELD_ERRORS as exc:  # a corrupt table: fields are read lazily
            self._backend_error(
                identity, ErrorCode.BAD_MESSAGE, f"{name} does not decode: {type(exc).__name__}"
            )

    def _on_container_message(self, identity: bytes, name: str, body: Any, frames: list[zmq.Frame]) -> None:
        now = time.monotonic()
        if name == "Hello":
            self._on_hello(identity, body, now)
            return
        replica = self.replicas.get(identity)
        if replica is None:
            if name == "PredictReply":  # from a connection declared dead or replaced: discarded
                self.counters["late_or_unknown_replies"] += 1
            self._backend_error(identity, ErrorCode.BAD_MESSAGE, "send Hello first")
            return
        replica.last_seen = now
        if name == "PredictReply":
            self._on_predict_reply(replica, body, frames[2:], now)
        elif name == "Heartbeat":
            pass
        elif name == "Ready":
            replica.credits = body.Credits()
            replica.refresh_state()
            self._dirty.add(self.models[replica.model])
        elif name == "Goodbye":
            reason = (body.Reason() or b"").decode("utf-8", "replace")
            self._replica_gone(replica, f"goodbye: {reason}" if reason else "goodbye", now)
        else:
            self._backend_error(identity, ErrorCode.UNKNOWN_MESSAGE, f"{name} is not a container message")

    def _on_hello(self, identity: bytes, h: Any, now: float) -> None:
        name = (h.Model() or b"").decode("utf-8", "replace")
        version = (h.ModelVersion() or b"").decode("utf-8", "replace")
        replica_id = (h.ReplicaId() or b"").decode("utf-8", "replace") or identity.hex()
        tensor = h.Input()
        if not name or not version or tensor is None:
            self._backend_error(identity, ErrorCode.BAD_MESSAGE, "hello needs model, model_version and input")
            return
        if tensor.Dtype() not in proto.DTYPE_NAMES:
            self._backend_error(
                identity, ErrorCode.BAD_MESSAGE, f"hello names unknown dtype {tensor.Dtype()}"
            )
            return
        old = self.replicas.get(identity)
        if old is not None:
            self._replica_gone(old, "hello again on the same connection", now)
        old_identity = self.replica_ids.get(replica_id)
        if old_identity is not None and old_identity in self.replicas:
            self._replica_gone(self.replicas[old_identity], "replaced by a new connection", now)
        model = self.models.get(name)
        if model is None:
            model = self.models[name] = Model(name)
        if not h.Deterministic():
            model.deterministic = False
        if version not in model.known_versions:
            model.known_versions.append(version)
        if model.active_version is None:
            model.set_version(version)
        self.persist_model(model)
        replica = Replica(
            identity=identity,
            replica_id=replica_id,
            model=name,
            version=version,
            input_dtype=tensor.Dtype(),
            input_shape=tuple(proto.numpy_vector(tensor, "Shape", np.dtype("<i8")).tolist()),
            sdk=(h.Sdk() or b"").decode("utf-8", "replace"),
            pid=h.Pid(),
            credits=h.Credits(),
            max_batch=h.MaxBatch(),
            deterministic=h.Deterministic(),
            connected=now,
            last_seen=now,
            last_sent=now,
        )
        replica.controller = BatchController(model.policy(self.config.max_batch, replica.max_batch))
        self.replicas[identity] = replica
        self.replica_ids[replica_id] = identity
        model.replicas[identity] = replica
        welcome = proto.encode(
            "Welcome", {"heartbeat_ms": self.config.heartbeat_ms, "dead_after_ms": self.config.dead_after_ms}
        )
        self.backend.send_multipart([identity, welcome])
        replica.move(ReplicaState.READY)
        replica.refresh_state()
        self._dirty.add(model)
        log.info(
            "replica joined",
            model=name,
            version=version,
            replica=replica_id,
            sdk=replica.sdk,
            pid=replica.pid,
        )

    def _on_predict_reply(self, replica: Replica, r: Any, payloads: list[zmq.Frame], now: float) -> None:
        buf, pos = proto.where(r)
        off = proto.slot(proto.slots(buf, pos), 0)
        batch_id = proto.read_u64(buf, pos + off) if off else 0
        batch = replica.inflight.get(batch_id)
        if batch is None:
            self.counters["late_or_unknown_replies"] += 1
            return
        try:  # read the whole reply before answering anyone: a corrupt one fails as a whole
            compute_ms, outputs, failure = _read_predict_reply(r, len(batch.items), len(payloads))
        except proto.FIELD_ERRORS as exc:
            compute_ms, outputs, failure = 0.0, [], f"reply does not decode ({type(exc).__name__})"
        first = outputs[0] if outputs and not failure else None
        if (
            first
            and first[1] is not None
            and not self._plain_replies.full
            and all(o == first for o in outputs)
        ):
            # outputs all OK and of one type: a later reply equal to this one outside the
            # batch id and the compute time is the same reply, so it is its own template
            fields = proto.slots(buf, pos)
            id_off, us_off = proto.slot(fields, 0), proto.slot(fields, 1)
            if id_off and us_off:
                template = proto.Template(bytes(buf), ((pos + id_off, "<Q"), (pos + us_off, "<I")))
                self._plain_replies.learn(buf, template, (first, len(outputs)))
        self._batch_done(replica, batch_id, compute_ms, outputs, failure, payloads, now)

    def _batch_done(
        self,
        replica: Replica,
        batch_id: int,
        compute_ms: float,
        outputs: list[tuple],
        failure: str,
        payloads: list[zmq.Frame],
        now: float,
    ) -> None:
        """Answer the queries of a batch from its reply, and learn from its timing."""
        batch = replica.inflight.pop(batch_id, None)
        if batch is None:
            self.counters["late_or_unknown_replies"] += 1
            return
        del self.batches[batch_id]
        replica.refresh_state()
        model = self.models[replica.model]
        self._dirty.add(model)
        items = batch.items
        if not failure and len(outputs) != len(items):
            failure = f"returned {len(outputs)} outputs for a batch of {len(items)}"
        # feed the controller with compute + RPC; time spent queued behind an earlier
        # batch at the replica is neither (the replica computes one batch at a time)
        started = max(batch.sent, replica.last_reply)
        rpc_ms = max(0.0, (now - started) * 1000 - compute_ms)
        replica.last_reply = now
        replica.compute_ms.add(compute_ms)
        replica.rpc_ms.add(rpc_ms)
        replica.rpc_ewma_ms += 0.1 * (rpc_ms - replica.rpc_ewma_ms)
        replica.compute_ewma_ms += 0.1 * (compute_ms - replica.compute_ewma_ms)
        replica.controller.observe(len(items), compute_ms + rpc_ms, batch.budget_ms)
        if failure:
            replica.errors += 1
            model.errors += 1
            for p in items:
                if not p.done:
                    self._answer_error(p, ErrorCode.MODEL_ERROR, f"model {replica.model!r} {failure}")
            return
        first = outputs[0]
        if first[0] and first[1] is not None and all(o == first for o in outputs):
            self._answer_plain(replica, items, first, payloads)
            return
        for i, (p, output) in enumerate(zip(items, outputs, strict=True)):
            if not p.done:
                self._answer_item(p, replica, i, output, payloads[i])

    def _answer_item(self, p: Pending, replica: Replica, i: int, output: tuple, payload: Any) -> None:
        """Answer ``p`` from output ``i`` of its batch: the prediction, or why there is none."""
        ok, dtype, shape, code, message = output
        if not ok:
            self._answer_error(p, code, f"model {replica.model!r}: {message}")
            return
        problem = "has no type" if dtype is None else _output_problem(dtype, shape, len(payload))
        if problem:
            self.counters["bad_outputs"] += 1
            self._answer_error(p, ErrorCode.MODEL_ERROR, f"model {replica.model!r} output {i}: {problem}")
            return
        self._answer_output(p, replica, dtype, shape, payload)

    def _answer_plain(
        self, replica: Replica, items: list[Pending], output: tuple, payloads: list[Any]
    ) -> None:
        """A batch whose outputs are all OK and of one type (the common case). A query that is
        a client's own (not one model's part of an ensemble, not a cache leader) with an
        output of the right size is answered as two values of a reply template, its id and
        latency (flushed by ``_flush``), without a ReplyFields and its checks of its own."""
        _, dtype, shape, _, _ = output
        want = proto.expected_nbytes(dtype, shape)  # None: any size fits (or an unknown dtype)
        typed = not _output_problem(dtype, shape, want or 0)  # the per-item check, minus the size
        family = (replica.model, replica.version, dtype, shape)
        plain = self._plain_out
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
                self._answer_item(p, replica, i, output, payload)
                continue
            latency_us = max(1, int(self._finish(p) * 1000))
            answers = plain.get((p.client, family))
            if answers is None:
                answers = plain[(p.client, family)] = ([], [])
            answers[0].extend((p.request_id, latency_us))
            answers[1].append(payload)

    def _replica_gone(self, replica: Replica, reason: str, now: float) -> None:
        """Forget a replica; re-queue (once) or answer exactly the queries it held."""
        if replica.state is not ReplicaState.DEAD:
            replica.move(ReplicaState.DEAD)
        self.replicas.pop(replica.identity, None)
        if self.replica_ids.get(replica.replica_id) == replica.identity:
            del self.replica_ids[replica.replica_id]
        model = self.models.get(replica.model)
        if model is not None:
            model.replicas.pop(replica.identity, None)
            self._dirty.add(model)
        requeued = failed = 0
        for batch in replica.inflight.values():
            self.batches.pop(batch.batch_id, None)
            for p in batch.items:
                if p.done:
                    continue
                p.replica = None
                if not p.requeued and p.deadline > now and model is not None:
                    p.requeued = True
                    model.queue.push(p)
                    requeued += 1
                else:
                    failed += 1
                    self._answer_default(
                        p, f"replica {replica.replica_id} of model {replica.model!r} died: {reason}"
                    )
        replica.inflight.clear()
        log.info(
            "replica left",
            model=replica.model,
            replica=replica.replica_id,
            reason=reason,
            requeued=requeued,
            failed=failed,
        )

    def _housekeeping(self, now: float) -> None:
        cfg = self.config
        self._next_housekeeping = now + cfg.heartbeat_ms / 4000
        if now >= self._next_policy_save:
            self._next_policy_save = now + 1.0
            self.save_policies()
        heartbeat = None
        for replica in list(self.replicas.values()):
            if now - replica.last_seen > cfg.dead_after_ms / 1000:
                self._replica_gone(replica, f"silent for {cfg.dead_after_ms} ms", now)
            elif now - replica.last_sent > cfg.heartbeat_ms / 1000:
                heartbeat = heartbeat or proto.encode("Heartbeat", {})
                self.backend.send_multipart([replica.identity, heartbeat])
                replica.last_sent = now

    # ------------------------------------------------------------ admin

    def _on_admin(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        writes = self.store.writes_queued if self.store is not None else 0
        reply = json.dumps(self.admin_ops.handle(frames[-1].bytes if len(frames) > 1 else b"")).encode(
            "utf-8"
        )
        if self.store is not None and self.store.writes_queued != writes:
            # acknowledge a change only once it is on disk
            token = next(self._seq)
            self._held_admin[token] = (identity, reply)
            self.store.notify(token)
        else:
            self.admin.send_multipart([identity, reply])

    def _on_durable(self, frames: list[zmq.Frame]) -> None:
        held = self._held_admin.pop(int.from_bytes(frames[0].bytes, "little"), None)
        if held is not None:
            self.admin.send_multipart(list(held))

    def persist_app(self, app: App) -> None:
        if self.store is not None:
            self.store.put("apps", app.name, app.to_json())

    def save_policies(self, everything: bool = False) -> None:
        """Write the learned state of the policies that changed (at most once a second)."""
        if self.store is None:
            return
        for app in self.apps.values():
            if app.policy_dirty or everything:
                app.policy_dirty = False
                self.store.put("policies", app.name, {"app": app.name, "state": app.policy.state()})

    def persist_model(self, model: Model) -> None:
        if self.store is not None:
            self.store.put("models", model.name, model.to_json())

    def forget_app(self, name: str) -> None:
        if self.store is not None:
            self.store.delete("apps", name)

    def mark_dirty(self, model: Model) -> None:
        self._dirty.add(model)

    def drain(self, replica: Replica, reason: str) -> None:
        """Stop sending work to ``replica`` and ask it to finish what it holds and leave."""
        if replica.state in (ReplicaState.READY, ReplicaState.BUSY):
            replica.move(ReplicaState.DRAINING)
        self.backend.send_multipart([replica.identity, proto.encode("Shutdown", {"reason": reason})])
        replica.last_sent = time.monotonic()
        log.info("replica draining", model=replica.model, replica=replica.replica_id, reason=reason)

    def reconfigure(self, model: Model) -> None:
        """Give every replica of ``model`` the model's current batching policy."""
        for replica in model.replicas.values():
            replica.controller.policy = model.policy(self.config.max_batch, replica.max_batch)
        self._dirty.add(model)


def _plain_values(entries: list[tuple[proto.ReplyFields, Any]]) -> list[int] | None:
    """(request id, latency) of each answer, in order, when every one is a plain prediction of
    one model version and output type (a reply template renders them); None otherwise.

    Ids and latencies of 0 are left to the builder, which omits fields at their default."""
    first = entries[0][0]
    if first.dtype is None or first.models_answered != (first.model,):
        return None
    values = []
    for item, _ in entries:
        if (
            item.status != Status.OK
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
    return values


def _shape_text(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("any" if d < 0 else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _output_problem(dtype: int, shape: tuple[int, ...], nbytes: int) -> str:
    """Why a model's output does not hold together ('' when it does)."""
    if dtype not in proto.DTYPE_NAMES:
        return f"unknown dtype {dtype}"
    if shape and min(shape) < 0:
        return f"negative dimension in shape {_shape_text(shape)}"
    want = proto.expected_nbytes(dtype, shape)
    if want is not None and want != nbytes:
        shape_text = _shape_text(shape)
        return f"{nbytes} bytes do not fit {proto.dtype_name(dtype)} of shape {shape_text} ({want} bytes)"
    return ""


def _read_predict_reply(r: Any, size: int, payloads: int) -> tuple[float, list[tuple], str]:
    """(compute ms, per output (ok, dtype, shape, code, message), whole-batch failure)."""
    buf, pos = proto.where(r)
    fields = proto.slots(buf, pos)
    off = proto.slot(fields, 1)
    compute_ms = (proto.read_u32(buf, pos + off) if off else 0) / 1000
    n = proto.read_length(buf, pos, proto.slot(fields, 2))
    if n == 0:
        message = (proto.read_str(buf, pos, proto.slot(fields, 4)) or b"").decode("utf-8", "replace")
        return compute_ms, [], f"failed the batch: {message or 'the model failed without a message'}"
    if n != size or payloads != n:
        return compute_ms, [], f"returned {n} outputs and {payloads} payloads for a batch of {size}"
    outputs = []
    for at in proto.read_tables(buf, pos, proto.slot(fields, 2)):
        out = proto.slots(buf, at)
        off = proto.slot(out, 0)
        if (proto.read_u8(buf, at + off) if off else 0) == Status.OK:
            tensor = proto.read_table(buf, at, proto.slot(out, 1))
            if tensor is None:
                outputs.append((True, None, (), 0, ""))
            else:
                dtype, shape = proto.read_tensor(buf, tensor)
                outputs.append((True, dtype, shape, 0, ""))
        else:
            off = proto.slot(out, 2)
            code = proto.read_u16(buf, at + off) if off else 0
            code = code if code in proto.ERROR_NAMES and code != ErrorCode.NONE else ErrorCode.MODEL_ERROR
            message = (proto.read_str(buf, at, proto.slot(out, 3)) or b"").decode("utf-8", "replace")
            outputs.append((False, None, (), code, message))
    return compute_ms, outputs, ""


def _digest(data: Any) -> bytes:
    from ketchd.cache import digest128

    return digest128(data)


def _default_answer(
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
        return item, _EMPTY
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
