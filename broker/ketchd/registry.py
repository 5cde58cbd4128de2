"""What the broker knows: apps, models, replicas and queries in flight.

Plain dataclasses held in dicts by the broker loop; no sockets and no locks here.
A replica's lifecycle is an explicit state machine (``ReplicaState``, ``TRANSITIONS``).
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import zmq
from ketch import protocol as proto

from ketchd.batching import BatchController, BatchPolicy
from ketchd.policies import Policy, Selection, make_policy
from ketchd.queue import ModelQueue
from ketchd.stats import Histogram, Histograms, LatencyWindow, SizeHistogram


@dataclass
class App:
    name: str
    input_dtype: int
    input_shape: tuple[int, ...]
    slo_ms: float
    default: Any = None  # a JSON value, or None for "no default: answer DEADLINE"
    has_default: bool = False
    models: list[str] = field(default_factory=list)
    cache: bool = True  # answer repeated inputs from the prediction cache
    finite_only: bool = False  # refuse NaN and infinity in float inputs
    policy: Policy = field(default_factory=lambda: make_policy("single"))
    policy_dirty: bool = False  # learned state to persist
    # figures
    cache_hits: int = 0
    queries: int = 0
    answered: int = 0
    defaults: int = 0
    errors: int = 0
    latency: LatencyWindow = field(default_factory=LatencyWindow)
    # end to end (arrival to answer), by the (model, version) that answered; ("", "") for a
    # default, an error, or an ensemble's combined answer
    durations: Histograms = field(default_factory=Histograms)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_type": proto.dtype_name(self.input_dtype),
            "input_shape": list(self.input_shape),
            "slo_ms": self.slo_ms,
            "default": self.default if self.has_default else None,
            "has_default": self.has_default,
            "models": list(self.models),
            "cache": self.cache,
            "finite_only": self.finite_only,
            "policy": self.policy.name,
            "policy_options": self.policy.options(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> App:
        return cls(
            name=d["name"],
            input_dtype=proto.dtype_code(d["input_type"]),
            input_shape=tuple(int(x) for x in d.get("input_shape", ())),
            slo_ms=float(d["slo_ms"]),
            default=d.get("default"),
            has_default=bool(d.get("has_default", d.get("default") is not None)),
            models=list(d.get("models", [])),
            cache=bool(d.get("cache", True)),
            finite_only=bool(d.get("finite_only", False)),
            policy=make_policy(d.get("policy", "single"), **d.get("policy_options", {})),
        )

    def figures(self) -> dict[str, Any]:
        return {
            "queries": self.queries,
            "cache_hits": self.cache_hits,
            "answered": self.answered,
            "defaults": self.defaults,
            "errors": self.errors,
            **self.latency.summary(),
        }


class ReplicaState(enum.Enum):
    CONNECTING = "connecting"  # hello seen, welcome not yet sent
    READY = "ready"  # has credit
    BUSY = "busy"  # every credit used
    DRAINING = "draining"  # takes no new work, finishes what it holds
    DEAD = "dead"


S = ReplicaState
TRANSITIONS: dict[ReplicaState, frozenset[ReplicaState]] = {
    S.CONNECTING: frozenset({S.READY, S.BUSY, S.DEAD}),
    S.READY: frozenset({S.BUSY, S.DRAINING, S.DEAD}),
    S.BUSY: frozenset({S.READY, S.DRAINING, S.DEAD}),
    S.DRAINING: frozenset({S.DEAD}),
    S.DEAD: frozenset(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass(eq=False, slots=True)
class Pending:
    """One query waiting for its answer."""

    client: bytes  # frontend identity
    request_id: int
    app: App
    model: str
    payload: zmq.Frame | bytes
    shape: tuple[int, ...]
    dtype: int
    arrived: float  # monotonic seconds
    deadline: float
    priority: int = 0
    done: bool = False
    queued: int = 0  # owned by ModelQueue: the token of its heap entry, 0 when not queued
    requeued: bool = False  # back from a replica that died (Containers.replica_gone)
    # suspects sent back together (the others of its batch on a replica that died, when
    # sending each alone would cost too long): Dispatcher.isolate sends them as one batch
    suspects: list[Pending] | None = None
    replica: Replica | None = None
    # single-flight: a leader computes for identical queries that wait as its followers
    cache_key: Any = None
    followers: list[Pending] | None = None
    parent: Fanout | None = None  # set when this is one model's part of a multi-model query
    nbytes: int = 0  # payload bytes counted to its client while held (Limits), 0 once released
    version: str = ""  # the model version it is pinned to (queued in that version's lane); "" none
    trace: Any = None  # a traced query's ketchd.traces.QueryTrace; None for the others


@dataclass(eq=False)
class Fanout:
    """One client query that a selection policy sends to several models (or learns from).

    Each model gets its own ``Pending`` (``parent`` = this); their answers gather here until
    the policy's rule is met (first answer, or all of ``selection.answer_from``) or the
    deadline passes, whichever is first: stragglers never hold the reply.
    """

    client: bytes
    request_id: int
    app: App
    selection: Selection
    context: str
    payload: Any
    dtype: int
    shape: tuple[int, ...]
    arrived: float
    deadline: float
    done: bool = False  # the client has its reply
    priority: int = 0
    queued: bool = False
    outputs: dict[str, tuple[int, tuple[int, ...], Any, str]] = field(default_factory=dict)  # model -> raw
    failed: dict[str, str] = field(default_factory=dict)  # model -> why it gave no answer
    shadows_recorded: bool = False
    nbytes: int = 0  # payload bytes counted to its client while held (Limits), 0 once released

    def settled(self, models: list[str]) -> bool:
        return all(m in self.outputs or m in self.failed for m in models)


@dataclass(slots=True)
class Batch:
    batch_id: int
    replica: Replica
    items: list[Pending]
    sent: float
    budget_ms: float = math.inf  # time the batch had to its earliest deadline when sent
    alone: bool = False  # queries back from a replica that died: its replica takes no other
    span: Any = None  # its batch span, when it holds a traced query and the broker traces


@dataclass(eq=False)
class Replica:
    identity: bytes
    replica_id: str
    model: str
    version: str
    input_dtype: int
    input_shape: tuple[int, ...]
    sdk: str
    pid: int
    credits: int
    max_batch: int
    deterministic: bool
    connected: float
    last_seen: float
    last_sent: float
    fingerprint: str = ""  # what it serves (Hello.fingerprint): the cache is keyed on it
    state: ReplicaState = ReplicaState.CONNECTING
    protocol: int = 1  # the protocol version chosen at its Hello (ketchd.negotiation)
    inflight: dict[int, Batch] = field(default_factory=dict)
    controller: BatchController = field(default_factory=lambda: BatchController(BatchPolicy()))
    last_reply: float = 0.0
    last_batch: float = 0.0  # when it was last sent a batch (monotonic seconds)
    batches: int = 0
    items: int = 0
    late: int = 0  # queries it held past their deadline (answered the default meanwhile)
    errors: int = 0
    sizes: SizeHistogram = field(default_factory=SizeHistogram)
    compute_ms: LatencyWindow = field(default_factory=lambda: LatencyWindow(1024))
    rpc_ms: LatencyWindow = field(default_factory=lambda: LatencyWindow(1024))
    rpc_ewma_ms: float = 1.0  # smoothed RPC time, for the pipelining lead
    compute_ewma_ms: float = 0.0
    # its model's histograms of its version: queue wait, RPC, compute (Model.queue_waits, ...;
    # Containers sets them at its Hello), held here so that a batch finds them without a lookup
    histograms: tuple[Histogram, Histogram, Histogram] = field(
        default_factory=lambda: (Histogram(), Histogram(), Histogram())
    )

    def busy_ms(self, now: float) -> float:
        """Predicted time before this replica can start one more batch. It computes its
        batches one at a time, in the order sent: each starts when it arrived or when the
        one before it is done, whichever is later (the first of them, when it arrived or
        when the replica last answered). A batch sent to wait behind another has not
        started while it waits: counting its time in flight as progress made a pipelined
        replica look free too soon, and a batch sent then waited out its queries' deadlines
        behind the first."""
        free_at = self.last_reply
        controller = self.controller
        for batch in self.inflight.values():  # (in the order sent)
            # typical (median) latencies: a high quantile for each batch ahead left a
            # pipelined replica idle between batches, waiting for time it did not need
            predicted = controller.typical_ms(len(batch.items))
            if predicted is None:
                predicted = self.compute_ewma_ms
            free_at = max(batch.sent, free_at) + predicted / 1000
        return max(0.0, (free_at - now) * 1000)

    def move(self, new: ReplicaState) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"replica {self.replica_id}: {self.state.value} -> {new.value}")
        self.state = new

    @property
    def takes_work(self) -> bool:
        """Ready or busy: it is sent batches when it has credit (not connecting, draining, dead)."""
        return self.state is ReplicaState.READY or self.state is ReplicaState.BUSY

    @property
    def free_credit(self) -> int:
        if self.state in (ReplicaState.DRAINING, ReplicaState.DEAD, ReplicaState.CONNECTING):
            return 0
        inflight = self.inflight
        if inflight and any(batch.alone for batch in inflight.values()):
            return 0  # it computes a query that may kill it: nothing else goes down with it
        return max(0, self.credits - len(inflight))

    def refresh_state(self) -> None:
        if self.state in (ReplicaState.READY, ReplicaState.BUSY):
            self.move(ReplicaState.READY if self.free_credit > 0 else ReplicaState.BUSY)

    def to_json(self) -> dict[str, Any]:
        return {
            "replica_id": self.replica_id,
            "model": self.model,
            "version": self.version,
            "state": self.state.value,
            "input_type": proto.dtype_name(self.input_dtype),
            "input_shape": list(self.input_shape),
            "sdk": self.sdk,
            "fingerprint": self.fingerprint,
            "protocol": self.protocol,
            "pid": self.pid,
            "credits": self.credits,
            "inflight": len(self.inflight),
            "max_batch": self.max_batch,
            "batches": self.batches,
            "items": self.items,
            "late": self.late,
            "errors": self.errors,
            "batch_size": self.controller.current_size,
            "batch_sizes": self.sizes.to_json(),
            "compute_ms": self.compute_ms.summary(),
            "rpc_ms": self.rpc_ms.summary(),
        }


@dataclass(eq=False)
class Model:
    name: str
    active_version: str | None = None
    history: list[str] = field(default_factory=list)  # earlier active versions, newest last
    known_versions: list[str] = field(default_factory=list)
    max_batch: int = 0  # 0: the broker's default
    max_queue: int = 0  # 0: the broker's default
    batching: str = "model"  # model | aimd | fixed (ketchd.batching)
    batch_delay_ms: float = 0.0
    deterministic: bool = True  # false once any replica says its answers vary
    queue: ModelQueue = field(default_factory=ModelQueue)
    # what the dispatcher of a pool knows of the load (ketchd.dispatch.arrival_rate): queries
    # offered so far, the deadline of the last, and the offered rate (per ms) at rate_since
    admitted: int = 0
    latest_deadline: float = 0.0
    arrival_rate: float = 0.0
    rate_since: float = 0.0
    rate_count: int = 0
    # what admission learns of the rate at which the head of the queue moves
    # (ketchd.overload.Overload.backlog): the queries sent from the tail (a slow replica's
    # tail batches, probes), a span in which the queue held a full batch (its start, 0 when
    # not in one; the queries sent from the head by then; the live replicas then; the
    # batch), and that rate's measured share of the estimate (and when last measured)
    tail_sent: int = 0
    backlog_since: float = 0.0
    backlog_head: int = 0
    backlog_replicas: int = 0
    backlog_depth: int = 0
    capacity_factor: float = 1.0
    capacity_spread: float = 0.0  # the mean distance of a span's share from that, smoothed
    factor_at: float = -math.inf
    replicas: dict[bytes, Replica] = field(default_factory=dict)
    # version -> fingerprint its live replicas announce (the last one let in); not persisted:
    # replicas announce it again after a restart
    fingerprints: dict[str, str] = field(default_factory=dict)
    fingerprint_changes: int = 0  # a version that came back with other code (no replica left of the old)
    # version -> its lane: the queue of the queries pinned to that version (Query.model_version).
    # A lane is a Model of the same name whose active version is the pinned one, sharing this
    # model's replicas and fingerprints: the dispatcher sends its queue to those replicas only
    # (whichever version is active). At most one per known version (hellos.MAX_VERSIONS).
    lanes: dict[str, Model] = field(default_factory=dict)
    pinned: bool = False  # this is a lane
    # figures
    batches: int = 0
    batched_items: int = 0
    errors: int = 0
    cache_hits: int = 0
    coalesced: int = 0
    dropped: int = 0  # deadline passed while queued
    refused: int = 0  # OVERLOADED
    queue_wait_ms: LatencyWindow = field(default_factory=LatencyWindow)
    # by the version of the replica that took the batch: each query's wait in the queue, and
    # each batch's round trip less its compute (rpc) and the replica's own compute_us
    queue_waits: Histograms = field(default_factory=Histograms)
    rpc_times: Histograms = field(default_factory=Histograms)
    compute_times: Histograms = field(default_factory=Histograms)

    def live_replicas(self, version: str | None = None) -> Iterable[Replica]:
        version = self.active_version if version is None else version
        return (
            r for r in self.replicas.values() if r.version == version and r.state is not ReplicaState.DEAD
        )

    def working_replicas(self) -> list[Replica]:
        """The live replicas of the active version that take work now (``Replica.takes_work``)."""
        return [r for r in self.live_replicas() if r.takes_work]

    def lane(self, version: str) -> Model:
        """The lane of the queries pinned to ``version`` (made on first use), or this model
        for "" (not pinned)."""
        if not version:
            return self
        lane = self.lanes.get(version)
        if lane is None:
            lane = self.lanes[version] = Model(self.name, active_version=version, pinned=True)
            lane.replicas = self.replicas
            lane.fingerprints = self.fingerprints
            self.configure_lane(lane)
        return lane

    def configure_lane(self, lane: Model) -> None:
        """Give ``lane`` this model's queue policy (at its making and when it changes)."""
        lane.max_batch, lane.max_queue = self.max_batch, self.max_queue
        lane.batching, lane.batch_delay_ms = self.batching, self.batch_delay_ms
        lane.deterministic = self.deterministic

    def set_version(self, version: str) -> None:
        if version == self.active_version:
            return
        if self.active_version is not None:
            self.history.append(self.active_version)
            del self.history[:-20]
        self.active_version = version
        if version not in self.known_versions:
            self.known_versions.append(version)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "active_version": self.active_version,
            "history": list(self.history),
            "versions": list(self.known_versions),
            "max_batch": self.max_batch,
            "max_queue": self.max_queue,
            "batching": self.batching,
            "batch_delay_ms": self.batch_delay_ms,
        }

    def policy(self, default_max_batch: int, replica_max: int = 0) -> BatchPolicy:
        limit = self.max_batch or default_max_batch
        if replica_max:
            limit = min(limit, replica_max)
        return BatchPolicy(mode=self.batching, max_batch=limit, batch_delay_ms=self.batch_delay_ms)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Model:
        return cls(
            name=d["name"],
            active_version=d.get("active_version"),
            history=list(d.get("history", [])),
            known_versions=list(d.get("versions", [])),
            max_batch=int(d.get("max_batch", 0)),
            max_queue=int(d.get("max_queue", 0)),
            batching=str(d.get("batching", "model")),
            batch_delay_ms=float(d.get("batch_delay_ms", 0.0)),
        )

    def figures(self) -> dict[str, Any]:
        live = [r for r in self.replicas.values() if r.state is not ReplicaState.DEAD]
        return {
            "queue_depth": len(self.queue),
            "replicas": len([r for r in live if r.version == self.active_version]),
            "replicas_all_versions": len(live),
            "batches": self.batches,
            "mean_batch": round(self.batched_items / self.batches, 2) if self.batches else 0.0,
            "errors": self.errors,
            "cache_hits": self.cache_hits,
            "coalesced": self.coalesced,
            "deterministic": self.deterministic,
            "fingerprints": dict(self.fingerprints),
            "fingerprint_changes": self.fingerprint_changes,
            "dropped": self.dropped,
            "refused": self.refused,
            "capacity_measured": round(self.capacity_factor, 3),
            "capacity_spread": round(self.capacity_spread, 3),
            "queue_wait_ms": self.queue_wait_ms.summary(),
            "batching": self.batching,
            "pinned": {
                v: {"queue_depth": len(lane.queue), "batches": lane.batches, "cache_hits": lane.cache_hits}
                for v, lane in self.lanes.items()
            },
        }


_batch_ids = itertools.count(1)


def next_batch_id() -> int:
    return next(_batch_ids)
