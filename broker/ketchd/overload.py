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


class Overload:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # (model, ms left) -> (when computed, queries per ms, ms for the last batch)
        self._capacity: dict[tuple[Model, int], tuple[float, float, float]] = {}

    def capacity(self, model: Model, now: float, left_ms: float) -> tuple[float, float]:
        """(queries per ms, ms for the last batch) of ``model`` for queries with ``left_ms``
        left; rate is inf when unknown."""
        key = (model, int(left_ms))
        cached = self._capacity.get(key)
        if cached is not None and now - cached[0] < REFRESH_S:
            return cached[1], cached[2]
        if len(self._capacity) > 4096:
            self._capacity.clear()
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
        self._capacity[key] = (now, rate, batch_ms)
        return rate, batch_ms

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
        fits = int((SAFETY * left - batch_ms) * rate - in_flight(model, now)) - queue.ahead(priority)
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
            retry = max(1, min(RETRY_MAX_MS, math.ceil(need - SAFETY * left)))
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
