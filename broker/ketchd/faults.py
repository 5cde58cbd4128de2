"""A bug on the loop: counted, logged with its traceback, and what it left unanswered answered.

The broker's promise is one answer per query, whatever happens. Decode errors are a peer's
fault and are answered where the decoding is (``BAD_MESSAGE``); any other exception is a
broker bug (or a bug of a policy, a combiner, the cache). Where a bug can strike with a
known set of queries at stake (a policy choosing models, a combiner, a reply being sent),
the code there answers them ``INTERNAL`` itself; ``Faults`` is what is left:

- ``internal_error`` counts it (``internal_errors`` in ``ketch stats``) and logs it with the
  traceback;
- ``rescue_message`` answers ``INTERNAL`` to each request id of a client message whose
  handler raised, unless that query is held (it will be answered) or already answered;
- ``sweep`` finds the queries held that nothing can answer any more (not queued, not in a
  live replica's batch, not waiting on an identical query) and answers them ``INTERNAL``;
  a query that is reachable is left to its normal answer, or its deadline; every model's
  queue is looked at again in the next dispatch (a turn cut short may have skipped some).

Both scan what the broker holds: they run only after a bug, never on the query's path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import structlog
import zmq
from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status

from ketchd.registry import Fanout, Pending

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd")
_EMPTY = b""


class Faults:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def internal_error(self, where: str, exc: BaseException) -> None:
        """Count and log a bug (with its traceback); the loop goes on."""
        self.broker.counters["internal_errors"] += 1
        log.error("internal error", where=where, error=f"{type(exc).__name__}: {exc}", exc_info=exc)

    def message(self, where: str, exc: BaseException) -> str:
        return f"internal error in the broker ({where}): {type(exc).__name__}; the broker keeps serving"

    # ------------------------------------------------------------ a client message

    def rescue_message(self, frames: list[zmq.Frame], where: str, exc: BaseException) -> None:
        """A client message whose handler raised: INTERNAL to each of its request ids that is
        neither held nor answered."""
        b = self.broker
        client = frames[0].bytes
        ids = self._ids(frames)
        if not ids:
            return
        answered = {item.request_id for item, _ in b.replies.out.get(client, ())}
        for (c, _), (values, _) in b.replies.plain_out.items():
            if c == client:
                answered.update(values[0::2])
        held = self._held(client)
        message = self.message(where, exc)
        for rid in ids:
            if rid not in answered and rid not in held:
                answered.add(rid)
                item = proto.ReplyFields(rid, Status.ERROR, error=ErrorCode.INTERNAL, message=message)
                b.replies.reply(client, item, _EMPTY)

    def _ids(self, frames: list[zmq.Frame]) -> list[int]:
        if len(frames) < 2:
            return []
        try:
            found = self.broker.admission.queries.match(frames[1])
            if found is not None:
                return list(found[0])
            name, body = proto.decode_current(frames[1].buffer)
            if name == "Query":
                if proto.query_ids_count(body) > self.broker.config.max_message_items:
                    return []
                return proto.read_query(body)[1]
            if name == "Feedback":
                return [proto.read_fields(name, body)["request_id"]]
        except proto.DecodeError:
            pass
        return []

    def _held(self, client: bytes) -> set[int]:
        return {
            x.request_id
            for x in self.broker.deadlines.items()
            if x.client == client and not x.done and getattr(x, "parent", None) is None
        }

    # ------------------------------------------------------------ anything held

    def sweep(self, where: str, exc: BaseException) -> int:
        """Answer INTERNAL every held query that nothing can answer any more; returns how many."""
        b = self.broker
        followers: set[int] = set()
        for leaders in b.flights.flights.values():
            for leader in leaders:
                followers.update(id(f) for f in leader.followers or ())
        in_batches = {
            id(p) for r in b.replicas.values() for batch in r.inflight.values() for p in batch.items
        }
        live_parents: set[int] = set()
        orphans: list[Any] = []
        held = [x for x in b.deadlines.items() if not x.done]
        for x in held:
            if isinstance(x, Pending):
                if x.queued or id(x) in in_batches or id(x) in followers:
                    if x.parent is not None:
                        live_parents.add(id(x.parent))
                    continue
                orphans.append(x)
        for x in held:
            if isinstance(x, Fanout) and id(x) not in live_parents and x.settled(x.selection.answer_from):
                orphans.append(x)
        message = self.message(where, exc)
        for x in orphans:
            if not x.done:
                self.answer_internal(x, message)
        b.dispatcher.dirty.update(b.models.values())  # a turn cut short may have left queues unlooked at
        if orphans:
            log.warning("queries left unanswered by a bug answered INTERNAL", count=len(orphans))
        return len(orphans)

    def answer_internal(self, x: Pending | Fanout, message: str) -> None:
        """``x`` gets INTERNAL, by the normal path if it still works, else by hand."""
        b = self.broker
        try:
            if isinstance(x, Fanout):
                b.ensembles.fail(x, message)
            else:
                b.answers.answer_error(x, ErrorCode.INTERNAL, message)
            return
        except Exception as exc:  # the answer path itself is broken: by hand
            self.internal_error("answering INTERNAL", exc)
        target: Pending | Fanout = x
        if isinstance(x, Pending) and x.parent is not None:  # one model's part: its Fanout answers
            x.done = True
            b.deadlines.discard(x.deadline, x)
            target = x.parent
        if target.done:
            return
        target.done = True
        b.deadlines.discard(target.deadline, target)
        item = proto.ReplyFields(target.request_id, Status.ERROR, error=ErrorCode.INTERNAL, message=message)
        b.replies.reply(target.client, item, _EMPTY)
