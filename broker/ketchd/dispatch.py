"""Dispatch: batches from a model's queue to the replica that can start them soonest.

Pull-based: among a model's live replicas with credit, the one that can start soonest
(then: with most credit) takes the next batch, whose size its ``BatchController`` decides
(``batching.decide``). A replica's second batch is sent just in time to hide the round
trip; a query that cannot finish in time even alone gets the default at once. Only models
whose queue or replicas changed (``dirty``) or whose batch timer is due are looked at.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ketch import protocol as proto
from ketch.protocol.multipart import send

from ketchd.batching import decide
from ketchd.registry import Batch, Model, Pending, Replica, next_batch_id

if TYPE_CHECKING:
    from ketchd.broker import Broker


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
        for model in dirty:
            self.dispatch_model(model, now)

    def dispatch_model(self, model: Model, now: float) -> None:
        """Send batches while a replica has credit and the batch controller says go."""
        queue = model.queue
        self.timers.pop(model, None)
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
                    self.timers[model] = now + (busy - lead) / 1000
                    return
            controller = replica.controller
            if len(queue) == 1 and controller.policy.batch_delay_ms <= 0:
                send = 1  # one query is all there is to send (as decide() says, without asking)
            else:
                head = queue.peek()
                assert head is not None  # the queue is not empty
                decision = decide(
                    controller, len(queue), (head.deadline - now) * 1000, (now - head.arrived) * 1000, busy
                )
                if decision.send == 0:  # wait a little to fill the batch
                    self.timers[model] = now + decision.wait_ms / 1000
                    return
                send = decision.send
            items = []
            # a query that cannot finish in time even alone is not computed for nothing:
            # it gets its answer (the default) now, and its place goes to one that can
            fastest = controller.fastest_ms()
            needs = busy + max(1.5 * fastest, fastest + 1.0) if fastest is not None else 0.0
            hopeless = now + needs / 1000
            shed = []
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
                model.dropped += 1
                left = (p.deadline - now) * 1000
                self.broker.answers.answer_default(
                    p, f"deadline: {left:.1f} ms left, model {model.name!r} needs about {needs:.1f} ms"
                )
            if items:
                budget = (min(p.deadline for p in items) - now) * 1000 - busy
                self.send_batch(model, replica, items, now, budget)

    def send_batch(
        self, model: Model, replica: Replica, items: list[Pending], now: float, budget_ms: float
    ) -> None:
        b = self.broker
        batch_id = next_batch_id()
        budgets = [max(0, min(0xFFFFFFFF, int((p.deadline - now) * 1e6))) for p in items]
        shape = items[0].shape
        shapes = None if all(p.shape == shape for p in items) else [p.shape for p in items]
        header = self.requests.header(
            batch_id, (model.name, replica.version, items[0].dtype, shape), budgets, shapes
        )
        send(b.backend, [replica.identity, header, *[p.payload for p in items]])
        # the books after the send: the replica computes meanwhile
        batch = Batch(batch_id, replica, items, now, budget_ms)
        replica.sizes.add(len(items))
        for p in items:
            p.replica = replica
        b.batches[batch_id] = batch
        replica.inflight[batch_id] = batch
        replica.refresh_state()
        replica.last_sent = now
        replica.batches += 1
        replica.items += len(items)
        model.batches += 1
        model.batched_items += len(items)
