"""Dispatch: batches from a model's queue to its replicas.

Pull-based: a replica with credit takes the next batch, whose size its
``BatchController`` decides (``batching.decide``). With several replicas, the queue is
first split by their measured speeds (``scheduler.split``): each takes at most its share,
so a slow replica neither takes the whole queue nor holds queries that a faster one would
finish in time. A replica's second batch is sent just in time to hide the round trip; a
query that cannot finish in time even alone, on the best replica, gets the default at
once. Only models whose queue or replicas changed (``dirty``) or whose batch timer is due
are looked at.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

from ketch import protocol as proto
from ketch.protocol.multipart import send

from ketchd import scheduler
from ketchd.batching import BatchController, decide
from ketchd.queue import ModelQueue
from ketchd.registry import Batch, Model, Pending, Replica, ReplicaState, next_batch_id
from ketchd.stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from ketchd.broker import Broker


_READY, _BUSY = ReplicaState.READY, ReplicaState.BUSY
SKIP_AT_MOST = 256  # queries a replica leaves to faster ones per batch, at most
PROBE_S = 1.0  # a replica of a pool left out of the split this long is sent one query,
PROBE_UNTIL = 32  # while it has had fewer batches than this,
PROBE_SLOW_S = 10.0  # and this long after
RATE_S = 0.05  # a model's arrival rate is measured over this long (or more: a quiet spell)


def _floor(replica: Replica) -> float:
    """An optimistic floor on the latency of any batch of ``replica`` (0 before the first)."""
    fastest = replica.controller.fastest_ms()
    return max(1.5 * fastest, fastest + 1.0) if fastest is not None else 0.0


def backlog_batch(
    queue: ModelQueue, controller: BatchController, busy: float, now: float, cap: int
) -> tuple[list[Pending], list[Pending]]:
    """With more queued than the most urgent query's deadline lets a replica take in one
    batch: the batch that finishes the most queries in time per ms of the replica's time.

    Sized to the head alone, a backlog is served in batches too small to keep up with it,
    so the next head has even less time left and the batches shrink further (under
    overload the throughput fell to a third). Here, among the first ``cap`` queued (queue
    order), each size n is scored by the queries that a batch of n, done ``busy`` +
    ``typical_ms(n)`` from now, finishes in time, over that latency; the best (the largest
    of equals) is taken. (The typical latency, not the high quantile that sizes batches to
    one deadline: a few stalls in a replica's window would otherwise make every query look
    late for it, and it would be sent nothing until they left the window.) Returns (the
    batch: the first of those queries in time, queue order; the queries that it would
    finish late, to give up on: no later batch finishes them sooner); the others go back
    to the queue.
    """
    popped = [p for p in queue.take(cap) if p.deadline > now]  # expired ones: Answers.expire
    if not popped:
        return [], []
    safety = controller.policy.safety
    usable = sorted((p.deadline - now) * 1000 * safety for p in popped)
    best_n, best_rate = 1, -1.0
    for n in range(1, len(popped) + 1):
        latency = controller.typical_ms(n) or 0.0
        served = min(n, len(usable) - bisect.bisect_left(usable, busy + latency))
        rate = served / max(latency, 1e-3)
        if rate >= best_rate:
            best_n, best_rate = n, rate
    need = busy + (controller.typical_ms(best_n) or 0.0)
    items: list[Pending] = []
    late: list[Pending] = []
    for p in popped:
        if (p.deadline - now) * 1000 * safety < need:
            late.append(p)
        elif len(items) < best_n:
            items.append(p)
        else:
            queue.push(p)
    return items, late


def tail_batch(
    queue: ModelQueue, controller: BatchController, busy: float, now: float, cap: int
) -> list[Pending]:
    """For a replica of a pool too slow for the head of the queue (a faster replica will
    finish it in time): the largest batch, of at most ``cap``, of the queries with the most
    time left that it finishes in time (done ``busy`` + ``typical_ms(n)`` from now, within
    each one's deadline and the policy's safety). Taken from the tail, not skipped to from
    the head: under load the head is all queries only the fast replicas finish in time, and
    a slow replica that looked only there idled while the queue grew. The others go back
    to the queue."""
    popped = queue.take_freshest(cap)  # the most time left first
    safety = controller.policy.safety
    n = 0
    while n < len(popped):  # the (n+1)th has the least time of the first n+1
        latency = controller.predict_ms(n + 1) or controller.typical_ms(n + 1) or 0.0
        if (popped[n].deadline - now) * 1000 * safety < busy + latency:
            break
        n += 1
    for p in popped[n:]:
        queue.push(p)
    return popped[:n]


def arrival_rate(model: Model, now: float) -> float:
    """Queries queued for ``model`` per ms (``Model.admitted``), over the last RATE_S or
    more, smoothed over two of those (0 before the first)."""
    elapsed = now - model.rate_since
    if elapsed >= RATE_S:
        rate = (model.admitted - model.rate_count) / (elapsed * 1000)
        model.arrival_rate = rate if elapsed > 4 * RATE_S else 0.5 * (model.arrival_rate + rate)
        model.rate_since, model.rate_count = now, model.admitted
    return model.arrival_rate


def _head_deadline(model: Model) -> float:
    head = model.queue.peek()
    return math.inf if head is None else head.deadline


class Dispatcher:
    def __init__(self, broker: Broker, prebuilds: proto.Prebuilds) -> None:
        self.broker = broker
        self.dirty: set[Model] = set()  # models whose queue or replicas changed this turn
        self.timers: dict[Model, float] = {}  # model -> when to look at its queue again
        self.requests = proto.RequestSender(prebuilds)

    def mark_dirty(self, model: Model) -> None:
        self.dirty.add(model)

    def dispatch(self, now: float) -> None:
        for model, at in list(self.timers.items()):
            if at <= now:
                self.dirty.add(model)
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, set()
        backlog = self.broker.overload.backlog
        for model in dirty:
            if model.lanes:  # its replicas' credit is shared with the lanes of pinned queries
                self.dispatch_lanes(model, dirty, now)
            else:
                self.dispatch_model(model, now)
            if not model.pinned:
                backlog(model, now)  # how fast the head moves while a full batch stays queued

    def dispatch_lanes(self, model: Model, dirty: set[Model], now: float) -> None:
        """A model with lanes (queries pinned to a version, ``Model.lane``): its queue and
        theirs, the one whose head is due first first, as they share its replicas' credit."""
        queues = [model, *(lane for lane in model.lanes.values() if len(lane.queue) and lane not in dirty)]
        queues.sort(key=_head_deadline)
        for m in queues:
            self.dispatch_model(m, now)

    def dispatch_model(self, model: Model, now: float) -> None:
        """Send batches while a replica has credit and the batch controller says go."""
        self.timers.pop(model, None)
        if not len(model.queue):
            return
        replicas = model.replicas
        if len(replicas) == 1:  # the common case, kept cheap: no list, no split
            replica = next(iter(replicas.values()))
            state = replica.state  # (Replica.takes_work, inline)
            if replica.version == model.active_version and (state is _READY or state is _BUSY):
                self.dispatch_one(model, replica, now)
            return
        live = model.working_replicas()
        if len(live) == 1:
            self.dispatch_one(model, live[0], now)
        elif live:
            self.dispatch_pool(model, live, now)

    def _later(self, model: Model, at: float) -> None:
        """Look at ``model``'s queue again at ``at`` (or earlier, if already due earlier)."""
        due = self.timers.get(model)
        if due is None or at < due:
            self.timers[model] = at

    def dispatch_one(self, model: Model, replica: Replica, now: float) -> None:
        """A model served by one replica: it takes the next batch whenever it has credit."""
        queue = model.queue
        controller = replica.controller
        while len(queue) and replica.free_credit > 0:
            busy = replica.busy_ms(now) if replica.inflight else 0.0
            if replica.inflight:
                # pipelining: send the next batch just in time to hide the round trip,
                # not earlier, so it carries what arrives while the current one computes
                lead = max(1.0, 2 * replica.rpc_ewma_ms)
                if busy > lead:
                    self._later(model, now + (busy - lead) / 1000)
                    return
            if len(queue) == 1 and controller.policy.batch_delay_ms <= 0:
                send = 1  # one query is all there is to send (as decide() says, without asking)
            else:
                send = self.batch_size(model, replica, len(queue), busy, now)
                if send == 0:
                    return
                if len(queue) > send:  # a backlog: a batch sized for the queue, not its head
                    items, late = backlog_batch(queue, controller, busy, now, controller.size_for(math.inf))
                    for p in late:
                        self.give_up(model, p, now, busy + (controller.typical_ms(len(items)) or 0.0))
                    if items:
                        self.send_backlog(model, replica, items, busy, now)
                    continue
            # a query that cannot finish in time even alone is not computed for nothing:
            # it gets its answer (the default) now, and its place goes to one that can
            fastest = controller.fastest_ms()
            needs = busy + max(1.5 * fastest, fastest + 1.0) if fastest is not None else 0.0
            hopeless = now + needs / 1000
            items, shed = [], []
            for p in queue.take(send):
                if p.deadline <= now:
                    continue  # answered by Answers.expire
                if p.deadline < hopeless:
                    shed.append(p)
                    continue
                items.append(p)
                model.queue_wait_ms.add((now - p.arrived) * 1000)
            if shed and not items and not replica.inflight:
                # an idle replica: giving up frees it for nobody, and the estimate may be stale
                # (a cold first batch, a slow spell): the query with the most time left goes,
                # and its latency corrects the estimate (otherwise nothing ever would)
                probe = max(shed, key=lambda p: p.deadline)
                shed.remove(probe)
                items.append(probe)
                model.queue_wait_ms.add((now - probe.arrived) * 1000)
            for p in shed:
                self.give_up(model, p, now, needs)
            if items:
                budget = (min(p.deadline for p in items) - now) * 1000 - busy
                self.send_batch(model, replica, items, now, budget)

    def send_backlog(
        self, model: Model, replica: Replica, items: list[Pending], busy: float, now: float
    ) -> None:
        wait = model.queue_wait_ms
        for p in items:
            wait.add((now - p.arrived) * 1000)
        budget = (min(p.deadline for p in items) - now) * 1000 - busy
        self.send_batch(model, replica, items, now, budget)

    def batch_size(self, model: Model, replica: Replica, queued: int, busy: float, now: float) -> int:
        """How many of ``queued`` queries ``replica`` takes now; 0 to wait (a timer is set)."""
        head = model.queue.peek()
        assert head is not None  # the queue is not empty
        decision = decide(
            replica.controller, queued, (head.deadline - now) * 1000, (now - head.arrived) * 1000, busy
        )
        if decision.send == 0:  # wait a little to fill the batch
            self._later(model, now + decision.wait_ms / 1000)
        return decision.send

    def give_up(self, model: Model, p: Pending, now: float, needs_ms: float) -> None:
        model.dropped += 1
        left = (p.deadline - now) * 1000
        self.broker.answers.answer_default(
            p, f"deadline: {left:.1f} ms left, model {model.name!r} needs about {needs_ms:.1f} ms"
        )

    def dispatch_pool(self, model: Model, live: list[Replica], now: float) -> None:
        """A model served by several replicas: the queue is split by their measured speeds
        (``scheduler.split``) and each replica with credit takes its share, in batches its
        own controller sizes; queries it could not finish in time but a faster replica could
        are left to that one (``take_share``)."""
        queue = model.queue
        for replica in live:
            if not replica.inflight and replica.free_credit:
                every = PROBE_S if replica.batches < PROBE_UNTIL else PROBE_SLOW_S
                if now - max(replica.last_batch, replica.connected) > every:
                    self.probe(model, replica, now)
        rate = arrival_rate(model, now)
        for _ in range(2 * len(live)):  # one batch per round, then split again
            head = queue.peek()
            if head is None:
                return
            budget = (head.deadline - now) * 1000
            # replicas are sized for the freshest queries: a slow one takes those (tail_batch)
            sizing = max(budget, (model.latest_deadline - now) * 1000)
            pool = scheduler.speeds(live, now, sizing, skip_overdue=True) or scheduler.speeds(
                live, now, sizing, skip_overdue=False
            )
            if not any(s.free for s in pool):
                return
            # the best any replica can do for one query (optimistic): a query with less
            # time left than that is answered (the default) at once instead of computed
            needs = min(s.busy_ms + _floor(s.replica) for s in pool)
            hopeless = now + needs / 1000
            for s, share in scheduler.split(pool, len(queue), rate):
                replica = s.replica
                if not s.free or not len(queue):  # (queries given up on may have emptied it)
                    continue
                if replica.inflight:
                    lead = max(1.0, 2 * replica.rpc_ewma_ms)  # pipelining, as in dispatch_one
                    if s.busy_ms > lead:
                        self._later(model, now + (s.busy_ms - lead) / 1000)
                        continue
                others = min((o.finish_ms(1) for o in pool if o is not s), default=math.inf)
                left = (queue.peek().deadline - now) * 1000  # type: ignore[union-attr]
                if others < s.finish_ms(1) and left >= others:
                    # a faster replica will finish the head in time: this one takes from the
                    # tail, in batches sized by the most time left, not by the least
                    cap = min(share, replica.controller.size_for(math.inf))
                    items = tail_batch(queue, replica.controller, s.busy_ms, now, cap)
                    if items:
                        model.tail_sent += len(items)
                        self.send_backlog(model, replica, items, s.busy_ms, now)
                        break
                    continue
                send = self.batch_size(model, replica, share, s.busy_ms, now)
                if send == 0:
                    continue
                if len(queue) > send and share > send:  # a backlog: as in dispatch_one
                    cap = min(share, replica.controller.size_for(math.inf))
                    items, late = backlog_batch(queue, replica.controller, s.busy_ms, now, cap)
                    self.leave_or_give_up(model, late, others, s.finish_ms(len(items)), now)
                    if items:
                        self.send_backlog(model, replica, items, s.busy_ms, now)
                        break
                    continue
                items = self.take_share(model, s, send, hopeless, needs, others, now)
                if items:
                    budget_ms = (min(p.deadline for p in items) - now) * 1000 - s.busy_ms
                    self.send_batch(model, replica, items, now, budget_ms)
                    break  # split again, with this replica's new batch
            else:
                return

    def probe(self, model: Model, replica: Replica, now: float) -> None:
        """Send an idle replica that the split has left out one query (the one with the most
        time left). Its latency model learns only from the batches it is sent, and one
        formed in a bad moment (a cold start, a JIT warming up, a pause) would otherwise keep
        it out for good; a replica that really is slow costs one query now and then (every
        PROBE_S while it has had few batches, every PROBE_SLOW_S after)."""
        replica.last_batch = now
        p = model.queue.take_latest()
        if p is not None:
            model.tail_sent += 1
            model.queue_wait_ms.add((now - p.arrived) * 1000)
            self.send_batch(model, replica, [p], now, (p.deadline - now) * 1000)

    def leave_or_give_up(
        self, model: Model, late: list[Pending], others_ms: float, needs_ms: float, now: float
    ) -> None:
        """Queries one replica would finish late: back to the queue when another replica
        could finish them in time, else answered (the default) now."""
        for p in late:
            if (p.deadline - now) * 1000 >= others_ms:
                model.queue.push(p)
            else:
                self.give_up(model, p, now, needs_ms)

    def take_share(
        self,
        model: Model,
        s: scheduler.Speed,
        n: int,
        hopeless: float,
        needs_ms: float,
        others_ms: float,
        now: float,
    ) -> list[Pending]:
        """Up to ``n`` queries for the replica of ``s``, in queue order, skipping those it
        would finish too late when another replica could finish them in time (they stay
        queued for it, up to SKIP_AT_MOST of them per batch)."""
        queue = model.queue
        safety = s.replica.controller.policy.safety
        items: list[Pending] = []
        aside: list[Pending] = []
        limit = n
        while len(items) < limit:
            p = queue.pop()
            if p is None:
                break
            if p.deadline <= now:
                continue  # answered by Answers.expire
            if p.deadline < hopeless:
                self.give_up(model, p, now, needs_ms)
                continue
            if not items:
                left = (p.deadline - now) * 1000
                if left * safety < s.finish_ms(1) and left >= others_ms:
                    aside.append(p)  # too late here, in time on another replica
                    if len(aside) >= SKIP_AT_MOST:
                        break
                    continue
                if aside:  # the first query taken is not the head: size the batch to it
                    limit = min(limit, s.replica.controller.size_for(left - s.busy_ms))
            items.append(p)
            model.queue_wait_ms.add((now - p.arrived) * 1000)
        for p in aside:
            queue.push(p)
        return items

    @staticmethod
    def isolate(model: Model, items: list[Pending], limit: int) -> list[Pending]:
        """Queries back from a replica that died may hold what killed it (a "poison"
        input). The first of ``items`` re-queued goes with no query that was not its
        suspect: alone, or with the others of its dead batch when they were sent back
        together (``Pending.suspects``, taken out of the queue here); its replica is sent
        nothing more until they answer (``Replica.free_credit``). If they kill a second
        replica, the queries sent alone are answered, never sent a third time, and those
        sent together are each sent alone (``Containers.replica_gone``). At most ``limit``
        go at once (the replica's largest batch: suspects from a replica that took larger
        ones go in several); the other ``items`` go back to the queue."""
        suspect = next(p for p in items if p.requeued)
        if suspect.suspects is None:
            chosen = [suspect]
        else:  # its fellows not answered and not sent again already (p.replica: in flight)
            chosen = [p for p in suspect.suspects if not p.done and p.replica is None][: max(1, limit)]
            if suspect not in chosen:
                chosen[-1] = suspect
            queue = model.queue
            for p in chosen:
                queue.discard(p)  # (those not taken with ``items``: still queued)
        taken = set(map(id, chosen))
        for p in items:
            if id(p) not in taken:
                model.queue.push(p)
        return chosen

    def send_batch(
        self, model: Model, replica: Replica, items: list[Pending], now: float, budget_ms: float
    ) -> None:
        b = self.broker
        if items[0].requeued or (len(items) > 1 and any(p.requeued for p in items)):
            items = self.isolate(model, items, replica.controller.policy.max_batch)
            budget_ms = min(budget_ms, (min(p.deadline for p in items) - now) * 1000)
        batch_id = next_batch_id()
        budgets = [max(0, min(0xFFFFFFFF, int((p.deadline - now) * 1e6))) for p in items]
        shape = items[0].shape
        shapes = None if all(p.shape == shape for p in items) else [p.shape for p in items]
        traced = None
        for p in items:
            if p.trace is not None:  # a traced batch (ketchd.traces): its span, each item's context
                traced = b.traces.batch(batch_id, model, replica, items)
                break
        header = self.requests.header(
            batch_id,
            (model.name, replica.version, items[0].dtype, shape),
            budgets,
            shapes,
            None if traced is None else traced[1],
        )
        send(b.backend, [replica.identity, header, *[p.payload for p in items]])
        # the books after the send: the replica computes meanwhile
        waits = replica.histograms[0]  # each query's wait: Histogram.observe, inline
        counts, total = waits.counts, 0.0
        for p in items:
            s = now - p.arrived
            counts[bisect.bisect_left(LATENCY_BUCKETS_S, s)] += 1
            total += s
        waits.sum += total
        batch = Batch(batch_id, replica, items, now, budget_ms, alone=items[0].requeued)
        if traced is not None:
            batch.span = traced[0]
        replica.sizes.add(len(items))
        for p in items:
            p.replica = replica
        b.batches[batch_id] = batch
        replica.inflight[batch_id] = batch
        replica.refresh_state()
        replica.last_sent = replica.last_batch = now
        replica.batches += 1
        replica.items += len(items)
        model.batches += 1
        model.batched_items += len(items)
