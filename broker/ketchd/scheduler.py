"""Scheduling over a pool of replicas of different speeds: how much of a model's queue
each replica takes, so that the pool finishes it as early as it can.

Pure code (no sockets, no clock of its own): the dispatcher describes each replica with
a ``Speed`` (``speeds``) and asks ``split`` for the shares.

A replica's speed is what the broker has measured of it: its typical latency
(``BatchController.typical_line``: a batch of n queries takes a + b*n ms, a line through
the medians of recent batches, so that a cold start or a pause does not brand a replica
slow), the batch size c it would use now (its own ``size_for`` the earliest
deadline in the queue, so a slow replica's batches are sized to its own latency), and the
time B before it can start one more batch (what its batches in flight still need). At
that size it serves r = c / (a + b*c) queries per ms, the first of them after about
B + a ms; by time T it has finished about r * (T - B - a) queries.

The split is water-filling: T is the earliest time by which the replicas together finish
the Q queued queries (sum of r_i * (T - B_i - a_i) = Q over the replicas that finish
their first query before T; closed form, replicas taken in order of B_i + a_i), and each
replica's share is what it finishes by then. So an idle slow replica gets nothing while a
faster one, even busy, will be done with the whole queue sooner, and under load each
replica takes a share in proportion to its measured rate instead of the whole queue.
Shares are whole queries (largest remainders); ties go to the replica that finishes its
first query soonest, then to the one that has had fewest batches, never to join order.

Why not Ray Serve's power of two choices: it picks the shorter of two random replicas'
queues because a router there knows no replica's state; this broker holds every queue
and every replica's latency model, so it can compute the split itself. Clipper's
per-replica batch sizes and pull are kept: each replica still takes its batches when it
has credit, sized by its own controller, but no more than its share.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ketchd.registry import Replica

UNKNOWN_LINE = (1.0, 0.01)  # (ms per batch, ms per query) assumed when no replica has been measured
OVERDUE_FACTOR = 4.0  # a batch out this many times its predicted latency (+ OVERDUE_MS) ...
OVERDUE_MS = 100.0  # ... is overdue: its replica is left out of the split until it answers


@dataclass(slots=True)
class Speed:
    """One replica's speed, now (times in ms from now)."""

    replica: Replica
    busy_ms: float  # before it can start one more batch
    intercept_ms: float  # a: per batch
    per_item_ms: float  # b: per query
    size: int  # the batch size it would use
    free: bool  # it has credit for one more batch now

    @property
    def offset_ms(self) -> float:
        return self.busy_ms + self.intercept_ms

    @property
    def rate(self) -> float:
        """Queries per ms at its batch size."""
        return self.size / (self.intercept_ms + self.per_item_ms * self.size)

    def finish_ms(self, n: int) -> float:
        """When a batch of ``n`` sent to it now would be done."""
        return self.busy_ms + self.intercept_ms + self.per_item_ms * n


def overdue(replica: Replica, now: float) -> bool:
    """Whether a batch of ``replica`` is out far longer than its latency model predicts
    (a hung replica: heartbeats catch a dead one, not one stuck in a loop)."""
    controller = replica.controller
    for batch in replica.inflight.values():
        predicted = controller.predict_ms(len(batch.items)) or replica.compute_ewma_ms
        if (now - batch.sent) * 1000 > OVERDUE_FACTOR * predicted + OVERDUE_MS:
            return True
    return False


def speeds(
    replicas: list[Replica], now: float, budget_ms: float, *, skip_overdue: bool = True
) -> list[Speed]:
    """The speed of each replica that takes work (and, with ``skip_overdue``, is not
    overdue); ``budget_ms`` is the time left to the earliest deadline in the queue. A
    replica not measured yet is taken to be as fast as the fastest measured one (so it
    gets work, and is measured)."""
    lines = [r.controller.typical_line() for r in replicas]
    known = [line for line in lines if line is not None]
    optimistic = min(known, key=lambda ab: ab[0] + ab[1]) if known else UNKNOWN_LINE
    out = []
    for replica, line in zip(replicas, lines, strict=True):
        if not replica.takes_work or (skip_overdue and replica.inflight and overdue(replica, now)):
            continue
        a, b = line if line is not None else optimistic
        busy = replica.busy_ms(now) if replica.inflight else 0.0
        size = replica.controller.size_for(budget_ms - busy)
        out.append(Speed(replica, busy, a, b, size, replica.free_credit > 0))
    return out


def split(pool: list[Speed], queued: int, arrival_rate: float = 0.0) -> list[tuple[Speed, int]]:
    """Each replica's share of ``queued`` queries, in the order they should be offered
    (soonest first query first); replicas with no share are left out.

    ``arrival_rate`` (queries per ms, ``ketchd.dispatch.arrival_rate``): the queries that
    keep coming while these are served count too. T is then the time by which the replicas
    finish the queue and what arrives meanwhile (sum of r_i * (T - B_i - a_i) = Q + rate *
    T), so a replica whose speed the pool needs to keep up gets a share even when the
    queue of the moment is short; when the replicas taken so far serve no faster than
    queries arrive, T is unbounded and each replica of the pool takes the batch it would
    use (its share of the load is its rate). Shares are of the queue as it is now."""
    if queued <= 0 or not pool:
        return []
    order = sorted(pool, key=lambda s: (s.offset_ms + s.per_item_ms, s.replica.batches))
    total_rate = weighted = 0.0
    finish = math.inf
    active = 0
    for s in order:
        rate = s.rate
        if s.offset_ms + 1.0 / rate >= finish:
            break  # it would not finish one query before the others finish them all
        total_rate += rate
        weighted += rate * s.offset_ms
        finish = (queued + weighted) / (total_rate - arrival_rate) if total_rate > arrival_rate else math.inf
        active += 1
    if math.isinf(finish):  # the pool only just keeps up, or not: each its batch
        raw = [float(s.size) for s in order[:active]]
    else:
        raw = [max(0.0, s.rate * (finish - s.offset_ms)) for s in order[:active]]
    total = sum(raw)
    if total > queued:  # (with arrivals counted, more than there is now: in proportion)
        raw = [x * queued / total for x in raw]
    shares = [int(x) for x in raw]
    left = min(queued, round(sum(raw))) - sum(shares)
    if left > 0:  # largest remainders; ties in the order above
        for i in sorted(range(active), key=lambda i: shares[i] - raw[i])[:left]:
            shares[i] += 1
    return [(s, n) for s, n in zip(order, shares, strict=False) if n > 0]
