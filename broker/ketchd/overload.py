"""Admission by capacity: a query that cannot finish by its deadline is refused at once.

Under overload a queue that admits everything serves nobody well: queries wait until
they expire, the model computes the ones nearest their deadline, and answers within the
SLO fall well below what the model can do. Here a query with S ms left is admitted only
when the work queued ahead of it, at the rate the model's replicas serve, leaves it time
to finish:

    (ahead + busy + 1) / rate + batch_ms <= SAFETY * S

``ahead`` is every query queued in its priority class or a higher one
(``ModelQueue.ahead``: EDF may put it before some of its own class, so this is an upper
bound, and admitting it cannot make a query already admitted late). ``busy`` is the work
the replicas still have in flight, in queries: of each batch sent, the share its typical
latency says is not done yet (a replica computing, or holding a second batch to start
next, frees no room before then; leaving it out admitted a batch or two too many per
replica under a flood). Each replica is taken to serve in the largest batches whose
typical latency fits S/2 (``BatchController.serving``: so that a query can wait for one
batch and be computed in the next; extrapolated along its latency model, not bounded by
the sizes of the moment, which are small when little is queued), and ``rate`` is the sum
over the model's replicas (of the active version, taking work) of that batch's size over
its typical (median) latency; ``batch_ms`` is the shortest typical latency of those
batches (the batch the query ends in). Typical, not the latency model's high quantile: a
few stalls (a loaded machine) would otherwise refuse everything, and a model refusing
everything is never measured again. For the same reason a query finding the queue empty
and a replica idle is always admitted. These come from the latency model, not from the
batches of the moment: under overload those are cut to the most urgent query's deadline,
and a rate measured from them would admit less, which makes the batches smaller still. A
refused query gets ``OVERLOADED`` with ``retry_after_ms``: when, at that rate, a query
like it would fit.

The rest of a message is not refused with its first refused query: queries are admitted
in order while they fit (``admissible``), each refused query is answered alone, and a query
answered from the cache or joining an identical one in flight needs no room at all.

The rate that matters to a new query is the rate at which the head of the queue moves,
and in a pool of mixed speeds that is not the pool's rate: a slow replica takes from the
tail (the freshest queries, ``ketchd.dispatch.tail_batch``) while a faster one will finish
the head in time, so a query it does not take waits for the queries ahead of it to be
taken by the faster replicas alone. Admitted at the pool's rate, such queries reached the
head too late to be computed (the default): in ``perf.scheduling``'s Java, Python and R
pool the head moved at a median 4.8 queries/ms against an estimate of 5.1. So admission
measures that rate, where the replicas set it: over a span of at least BACKLOG_S in which
the queue held a full batch for any replica after every dispatch (every replica had what it
could take), the queries sent from the head per ms over the estimate for a fresh query then
(``backlog``). The estimate is scaled by that share, smoothed (FACTOR_WEIGHT a span, from
1 after a lapse), never raised (the estimate stays the ceiling) and never below
FACTOR_FLOOR (a stall must not stop admission); a share not measured again within
FACTOR_FOR_S lapses. How far each span's share strays from the smoothed one
(``capacity_spread``, smoothed alike) lowers SAFETY by SPREAD_K times that (to SAFETY_FLOOR
at the least): a query admitted at the edge reaches the head with about (1 - SAFETY) of
its time left, less what the dispatcher needs there, and a head that moves 10% slower than
its mean for the query's wait took all of that in the polyglot pool. A shorter queue is a
pool keeping up (the next batch filling while the last computes) and says nothing of its
rate; spans in which a replica joined or left, or nothing was sent, are not counted.

No figure, no refusal: until a replica of the model has a latency model worth the name
(two batch sizes and REFIT_EVERY batches seen), only the queue's bound (``max_queue``)
limits; a replica not measured yet (new, cold) is taken to be as fast as the fastest
measured one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status

from ketchd.registry import Model, Pending

if TYPE_CHECKING:
    from ketchd.broker import Broker

SAFETY = 0.9  # share of the time left to a deadline that the queue ahead may take
REFRESH_S = 0.02  # a model's capacity is recomputed at most this often
RETRY_MAX_MS = 60_000
BACKLOG_S = 0.1  # a span of backlog this long or more measures the pool's rate ...
BACKLOG_MAX_S = 0.25  # ... and one this long is measured, and a new one begun
FACTOR_FLOOR = 0.25  # the measured share of the estimated rate, at the least
FACTOR_WEIGHT = 0.3  # the weight of a new span's share
FACTOR_FOR_S = 10.0  # a share not measured again within this long lapses
SPREAD_K = 2.0  # SAFETY is lowered by this many times the head rate's spread ...
SAFETY_FLOOR = 0.75  # ... to this at the least (less starved the tail a slow replica takes)


class Overload:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # (model, ms left) -> (when computed, queries per ms, ms for the last batch)
        self._capacity: dict[tuple[Model, int], tuple[float, float, float]] = {}

    def capacity(self, model: Model, now: float, left_ms: float) -> tuple[float, float]:
        """(queries per ms, ms for the last batch) of ``model`` for queries with ``left_ms``
        left: the estimate, scaled by the share of it measured under backlog; rate is inf
        when unknown."""
        key = (model, int(left_ms))
        cached = self._capacity.get(key)
        if cached is not None and now - cached[0] < REFRESH_S:
            return cached[1], cached[2]
        if len(self._capacity) > 4096:
            self._capacity.clear()
        rate, batch_ms = estimate(model, left_ms)
        if now - model.factor_at < FACTOR_FOR_S:
            rate *= model.capacity_factor
        self._capacity[key] = (now, rate, batch_ms)
        return rate, batch_ms

    def backlog(self, model: Model, now: float) -> None:
        """After a dispatch of ``model``: while its queue holds at least a full batch for
        any of its replicas, every replica has had what it could take, so the queries sent
        from the head meanwhile are the rate at which the head moves; at the end of such a
        span (BACKLOG_MAX_S, or the queue ran low after BACKLOG_S) it is compared with the
        estimate for a fresh query (``Model.capacity_factor``)."""
        since, queued = model.backlog_since, len(model.queue)
        if since:
            if queued >= model.backlog_depth:
                if now - since >= BACKLOG_MAX_S:
                    self._measured(model, now)
                    model.backlog_since, model.backlog_head = now, model.batched_items - model.tail_sent
                return
            if now - since >= BACKLOG_S:
                self._measured(model, now)
            model.backlog_since = 0.0
        elif queued > 1 and queued >= model.backlog_depth:  # (the last depth: cheap when short)
            live = model.working_replicas()
            model.backlog_depth = depth = max((r.controller.policy.max_batch for r in live), default=0)
            if live and queued >= depth:
                model.backlog_since, model.backlog_head = now, model.batched_items - model.tail_sent
                model.backlog_replicas = len(live)

    def _measured(self, model: Model, now: float) -> None:
        head = model.batched_items - model.tail_sent - model.backlog_head
        if head <= 0 or len(model.working_replicas()) != model.backlog_replicas:
            return
        left = (model.latest_deadline - now) * 1000
        rate, _ = estimate(model, left)
        if left <= 0 or rate == math.inf:
            return
        share = min(1.0, max(FACTOR_FLOOR, head / ((now - model.backlog_since) * 1000) / rate))
        fresh = now - model.factor_at < FACTOR_FOR_S
        before = model.capacity_factor if fresh else 1.0
        spread = model.capacity_spread if fresh else 0.0
        model.capacity_factor = before + FACTOR_WEIGHT * (share - before)
        model.capacity_spread = spread + FACTOR_WEIGHT * (abs(share - before) - spread)
        model.factor_at = now

    @staticmethod
    def safety(model: Model, now: float) -> float:
        """The share of the time left that the queue ahead may take: SAFETY, less SPREAD_K
        times how far the head's rate has strayed from span to span (``capacity_spread``)."""
        if now - model.factor_at >= FACTOR_FOR_S:
            return SAFETY
        return max(SAFETY_FLOOR, SAFETY - SPREAD_K * model.capacity_spread)

    def admissible(self, model: Model, now: float, deadline: float, priority: int) -> int:
        """How many more queries of ``priority`` due at ``deadline`` may be queued: in the
        queue's bound, and able to finish in time."""
        queue = model.queue
        room = (model.max_queue or self.broker.config.max_queue) - len(queue)
        left = (deadline - now) * 1000
        cached = self._capacity.get((model, int(left)))  # (self.capacity's cache, inline)
        if cached is None or now - cached[0] >= REFRESH_S:
            rate, batch_ms = self.capacity(model, now, left)
        else:
            rate, batch_ms = cached[1], cached[2]
        if rate == math.inf:
            return room
        safety = self.safety(model, now)
        fits = int((safety * left - batch_ms) * rate - in_flight(model, now)) - queue.ahead(priority)
        if fits <= 0 and not len(queue) and any(not r.inflight for r in model.replicas.values()):
            fits = 1  # an idle model is tried (and measured again), whatever its figures say
        return min(room, fits)

    def refuse(self, p: Pending, model: Model, now: float) -> None:
        """Answer ``p`` (not queued) with OVERLOADED: why, and when to try again. The reason
        names the model and nothing that changes from one query to the next, so that the
        refusals of a turn share a reply template (``Replies.refuse``)."""
        b = self.broker
        limit = model.max_queue or b.config.max_queue
        if len(model.queue) >= limit:
            retry, why = b.config.retry_after_ms, f"queue of model {model.name!r} is full ({limit} queries)"
        else:
            left = (p.deadline - now) * 1000
            rate, batch_ms = self.capacity(model, now, left)
            need = (model.queue.ahead(p.priority) + in_flight(model, now) + 1) / rate + batch_ms
            retry = max(1, min(RETRY_MAX_MS, math.ceil(need - self.safety(model, now) * left)))
            why = (
                f"model {model.name!r} cannot answer it in time: the queries ahead of it take "
                "what is left before its deadline"
            )
        p.app.errors += 1
        model.refused += 1
        b.counters["refused_overloaded"] += 1
        b.answers.release_client(p)
        if p.request_id:
            b.replies.refuse(p.client, ErrorCode.OVERLOADED, why, p.request_id, retry)
        else:  # an id of 0 is left to the builder (a template's slot holds no default)
            item = proto.ReplyFields(
                p.request_id, Status.ERROR, error=ErrorCode.OVERLOADED, message=why, retry_after_ms=retry
            )
            b.replies.reply(p.client, item, b"")


def estimate(model: Model, left_ms: float) -> tuple[float, float]:
    """The latency models' (queries per ms, ms for the last batch) of ``model`` for queries
    with ``left_ms`` left (see the module's doc); rate is inf when unknown."""
    batch_ms = math.inf
    measured: list[float] = []
    unmeasured = 0
    for replica in model.live_replicas():
        if not replica.takes_work:
            continue
        serving = replica.controller.serving(left_ms / 2)
        if serving is None:  # not measured yet: taken to be as fast as the fastest measured
            unmeasured += 1
            continue
        size, typical, _ = serving
        measured.append(size / typical)
        batch_ms = min(batch_ms, typical)
    # no replica measured (or none at all): no refusal on this account
    rate = sum(measured) + unmeasured * max(measured) if measured else math.inf
    return rate, batch_ms


def in_flight(model: Model, now: float) -> float:
    """The queries of ``model``'s batches in flight that are not done yet: of each batch,
    the share of its typical latency still to run, a batch waiting on its replica behind
    another starting when that one ends."""
    left = 0.0
    for replica in model.live_replicas():
        if not replica.inflight or not replica.takes_work:
            continue
        free_at = -math.inf  # when the replica ends the batches before this one (s)
        for batch in sorted(replica.inflight.values(), key=lambda b: b.sent):
            n = len(batch.items)
            typical = replica.controller.typical_ms(n)
            if typical is None:  # not measured yet: all of it
                left += n
                continue
            free_at = max(batch.sent, free_at) + typical / 1000
            left += n * min(1.0, max(0.0, (free_at - now) * 1000 / typical))
    return left
