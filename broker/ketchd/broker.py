"""The broker: one thread, one poll loop, all routing state.

    clients (DEALER) -> frontend ROUTER -> app -> model queue (EDF) -> batch
                                                              |
    model containers (DEALER) <- backend ROUTER <- replica with free credit (pull)

Each turn of ``run`` waits on the sockets for at most the time to the next deadline or
heartbeat, handles every message that is waiting, answers queries whose deadline passed
(the app's default, or an explicit error), dispatches batches to replicas that have
credit, and flushes the replies gathered during the turn (one Reply message per client per
turn). Nothing here blocks: the state store writes on its own thread.

``Broker`` owns the state (apps, models, replicas, batches, the queries held) and the loop;
the work is done by its collaborators, each the owner of one concept and called only from
the loop (no threads, no locks):

    admission.Admission    the frontend: client messages, checks, the single-model path
    overload.Overload      admission by capacity: what cannot finish in time is refused at once
    ensembles.Ensembles    queries fanned out to several models, and feedback
    flights.Flights        the prediction cache and single-flight of identical queries
    dispatch.Dispatcher    batches from model queues to replicas
    containers.Containers  the backend: replicas' hellos, replies, heartbeats and deaths
    peers.Connections      replicas' connections: one that closes ends its replica at once
    answers.Answers        every answer to a query, and deadlines passing
    replies.Replies        the one reply sender
    persistence.Persistence  the state store and the admin socket
    limits.Limits          what one message and one client may cost; refusals beyond
    faults.Faults          a bug on the loop: counted, logged, its queries answered INTERNAL

No exception ends the loop: a handler that raises, or any step of a turn, is a bug that
``Faults`` counts and logs, and whatever it left unanswered is answered ``INTERNAL``.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import structlog
import zmq
from ketch import protocol as proto
from ketch.protocol import multipart

from ketchd.admin import AdminOps
from ketchd.admission import Admission
from ketchd.answers import Answers
from ketchd.cache import PredictionCache
from ketchd.config import BrokerConfig
from ketchd.containers import Containers
from ketchd.deadlines import Deadlines
from ketchd.dispatch import Dispatcher
from ketchd.ensembles import Ensembles
from ketchd.faults import Faults
from ketchd.flights import Flights
from ketchd.limits import Limits
from ketchd.memory import Trimmer
from ketchd.metrics import MetricsEndpoint
from ketchd.overload import Overload
from ketchd.peers import Connections
from ketchd.persistence import Persistence
from ketchd.registry import App, Batch, Model, Replica
from ketchd.replies import Replies
from ketchd.sockets import Sockets

log = structlog.get_logger("ketchd")

_DRAIN = 512  # messages taken from one socket per turn, so no socket starves the others
_NOBLOCK = multipart.NOBLOCK

Handler = Callable[[list[zmq.Frame]], None]


class Broker:
    def __init__(self, config: BrokerConfig | None = None, ctx: zmq.Context[Any] | None = None) -> None:
        self.config = config or BrokerConfig()
        self.ctx: zmq.Context[Any] = ctx or zmq.Context.instance()
        self.apps: dict[str, App] = {}
        self.models: dict[str, Model] = {}
        self.replicas: dict[bytes, Replica] = {}  # connection identity -> replica
        self.replica_ids: dict[str, bytes] = {}  # stable replica id -> identity
        self.batches: dict[int, Batch] = {}
        self.counters: Counter[str] = Counter()
        self.started = time.time()
        self.deadlines = Deadlines()  # every query held, until it is answered or its deadline passes
        self.outstanding: dict[bytes, int] = {}  # client identity -> queries held for it
        self.client_bytes: dict[bytes, int] = {}  # client identity -> payload bytes held for it
        self.held_bytes = 0  # payload bytes of every query held
        self.cache = PredictionCache(self.config.cache_bytes, self.config.cache_ttl_s)
        self.prebuilds = proto.Prebuilds()  # client replies and batch requests, other sizes
        self.sockets = Sockets(self.config, self.ctx)
        self.limits = Limits(self)
        self.faults = Faults(self)
        self.trimmer = Trimmer()  # memory back to the system after a burst
        self.persistence = Persistence(self)
        self.replies = Replies(self, self.prebuilds)
        self.answers = Answers(self)
        self.flights = Flights(self, self.cache)
        self.admission = Admission(self)
        self.overload = Overload(self)
        self.ensembles = Ensembles(self)
        self.dispatcher = Dispatcher(self, self.prebuilds)
        self.containers = Containers(self)
        self.connections = Connections(self)
        self.admin_ops = AdminOps(self)
        self.metrics = MetricsEndpoint(self)
        self.stopping = False  # draining: no new queries; ``run`` returns once all are answered
        self._stop_reason = ""
        self._next_housekeeping = 0.0
        self._next_policy_save = 0.0

    # ------------------------------------------------------------ life cycle

    @property
    def endpoints(self) -> dict[str, str]:
        return self.sockets.endpoints

    def bind(self) -> dict[str, str]:
        """Create and bind the three sockets, and the ``/metrics`` server when configured;
        returns the bound endpoints (``metrics``: the URL to scrape)."""
        cfg = self.config
        self.sockets.start_curve()
        self.frontend = self.sockets.router(cfg.frontend, "frontend")
        self.backend = self.sockets.router(cfg.backend, "backend")
        self.connections.start(self.backend)
        self.admin = self.sockets.router(cfg.admin, "admin")
        if cfg.metrics:
            self.sockets.endpoints["metrics"] = self.metrics.start(cfg.metrics)
        return self.endpoints

    def load_state(self) -> None:
        self.persistence.load()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop taking queries; ``run`` returns once every held query is answered."""
        if not self.stopping:
            self.stopping = True
            self._stop_reason = reason
            log.info("broker draining", reason=reason, pending=self.pending_count())

    def memory_figures(self) -> dict[str, int]:
        """What the broker's memories hold, in bytes, against their bounds (``ketch stats``)."""
        cfg, recent = self.config, self.ensembles.recent
        return {
            "held_bytes": self.held_bytes,
            "max_held_bytes": cfg.max_held_bytes,
            "clients_holding": len(self.client_bytes),
            "feedback_bytes": recent.bytes,
            "feedback_queries": len(recent),
            "max_feedback_bytes": cfg.feedback_memory_bytes,
            "heap_free_bytes": self.trimmer.free_bytes(),
            "trims": self.trimmer.trims,
        }

    def pending_count(self) -> int:
        return sum(1 for p in self.deadlines.items() if not p.done)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.request_stop(signal.Signals(signum).name))

    def run(self, ready: Callable[[dict[str, str]], None] | None = None) -> None:
        if not self.endpoints:
            self.bind()
        if self.persistence.store is None:
            self.load_state()
        durable = self.persistence.durable
        assert durable is not None
        log.info("broker listening", pid=os.getpid(), **self.endpoints)
        if ready is not None:
            ready(self.endpoints)
        poller = zmq.Poller()
        monitor = self.connections.monitor
        assert monitor is not None
        # the backend before the monitor: what a replica sent before its connection closed
        # (its last replies, its Goodbye) is read before the close is acted on
        for sock in (self.backend, monitor, self.frontend, self.admin, durable):
            poller.register(sock, zmq.POLLIN)
        handlers: dict[zmq.Socket[Any], Handler] = {
            monitor: self.on_monitor,
            self.backend: self.containers.on_backend,
            self.frontend: self.admission.on_frontend,
            self.admin: self.persistence.on_admin,
            durable: self.persistence.on_durable,
        }
        if self.metrics.sock is not None:
            poller.register(self.metrics.sock, zmq.POLLIN)
            handlers[self.metrics.sock] = self.metrics.on_request
        self.trimmer.start()
        prebuilds, answers, dispatcher, replies = self.prebuilds, self.answers, self.dispatcher, self.replies
        try:
            while not (self.stopping and self.pending_count() == 0):
                try:  # a turn, inline (a call per turn is a call per query at low load)
                    prebuild = bool(prebuilds)
                    events = poller.poll(0 if prebuild else self._poll_timeout_ms())
                    if prebuild and not events:  # idle: build a template before a burst needs it
                        prebuilds.step()
                    for sock, _ in events:
                        self._drain(sock, handlers[sock])
                        if sock is self.backend:
                            replies.flush()  # answers leave before the rest of the turn's work
                    now = time.monotonic()
                    answers.expire(now)
                    if now >= self._next_housekeeping:
                        self._housekeeping(now)
                    dispatcher.dispatch(now)
                    replies.flush()
                except zmq.ContextTerminated:
                    raise
                except Exception as exc:  # a bug: the loop goes on, and what it left is answered
                    self.faults.internal_error("the broker loop", exc)
                    self.faults.sweep("the broker loop", exc)
        finally:
            self.close()

    def close(self) -> None:
        self.metrics.close()
        self.trimmer.stop()
        self.persistence.close()
        self.connections.close(getattr(self, "backend", None))
        for name in ("frontend", "backend", "admin"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        self.sockets.stop_curve()
        log.info("broker stopped", reason=self._stop_reason or "closed")

    def on_monitor(self, frames: list[zmq.Frame]) -> None:
        """A replica's connection closed: first the messages it sent before (its last replies
        or its Goodbye, waiting on the backend), then the close."""
        self._drain(self.backend, self.containers.on_backend)
        self.connections.on_monitor(frames)

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        nxt = self._next_housekeeping
        due = self.deadlines.next_due()
        if due is not None:
            nxt = min(nxt, due)
        timers = self.dispatcher.timers
        if timers:
            nxt = min(nxt, min(timers.values()))
        return max(0, min(1000, int((nxt - now) * 1000) + 1))

    def _drain(self, sock: zmq.Socket[Any], handler: Handler) -> None:
        # ZMQ_EVENTS says whether another message waits; cheaper than a raised zmq.Again
        limit, max_bytes = self.limits.max_frames, self.limits.max_bytes
        for _ in range(_DRAIN):
            try:
                frames = multipart.recv(sock, _NOBLOCK, limit)
            except zmq.Again:
                return
            try:
                if len(frames) > limit or sum(map(len, frames)) > max_bytes:
                    self._refuse(sock, frames)
                else:
                    handler(frames)
            except Exception as exc:  # a bug must not take the broker down with it
                where = f"a {self.sockets.role(sock)} message"
                self.faults.internal_error(where, exc)
                if sock is self.frontend:
                    self.faults.rescue_message(frames, where, exc)
                else:
                    self.faults.sweep(where, exc)
            if not multipart.waiting(sock):
                return

    def _refuse(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        """A message over the limits (``ketchd.limits``), refused at once."""
        why = self.limits.too_large(frames)
        identity = frames[0].bytes
        header = frames[1] if len(frames) > 1 else zmq.Frame(b"")
        if sock is self.frontend:
            self.limits.refuse_client_message(identity, header, why)
        elif sock is self.backend:
            self.limits.refuse_replica_message(identity, self.replicas.get(identity), header, why)
        elif sock is self.admin:
            self.persistence.refuse(identity, "TOO_LARGE", why)

    def _housekeeping(self, now: float) -> None:
        self._next_housekeeping = now + self.config.heartbeat_ms / 4000
        if now >= self._next_policy_save:
            self._next_policy_save = now + 1.0
            self.persistence.save_policies()
        self.containers.check(now)
        self.trimmer.check(now)
