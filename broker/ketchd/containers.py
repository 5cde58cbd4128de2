"""The backend: model containers (replicas) saying hello, answering batches, leaving.

A replica registers with a Hello and is welcomed; its PredictReplies answer the queries of
its batches (a reply of plain outputs read from a learnt template, any other the long way:
``PredictReplyReceiver``); silence past ``dead_after_ms``, a Goodbye or a second connection
with its replica id ends it, and its in-flight queries are re-queued once or answered.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

import structlog
import zmq
from ketch import errors
from ketch import protocol as proto
from ketch.protocol import ErrorCode, limits

from ketchd import hellos, negotiation
from ketchd.admin import schema_conflict
from ketchd.batching import BatchController
from ketchd.registry import Model, Pending, Replica, ReplicaState
from ketchd.stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd")

_REPLY_TEMPLATES = 1024  # replica reply templates learnt, at most
_READ_WHOLE = frozenset({"Hello", "Ready", "Goodbye", "Error"})  # read with every field at once


def alone_ms(model: Model, dead: Replica) -> float:
    """About how long one query alone takes, round trip, on the model's fastest replica
    (the one that died if no other has been measured; 0 if none has)."""
    best = None
    for r in (*model.replicas.values(), dead):
        typical = r.controller.typical_ms(1)
        if typical is not None and (best is None or typical + r.rpc_ewma_ms < best):
            best = typical + r.rpc_ewma_ms
    return best or 0.0


class Containers:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        # replicas' replies of plain outputs (proto.predict_reply_many_template), learnt from
        # replies read the long way, with the output's (ok, dtype, shape, code, message) and count
        self.plain_replies = proto.PredictReplyReceiver(_REPLY_TEMPLATES)

    def backend_error(self, identity: bytes, code: int, message: str) -> None:
        b = self.broker
        b.counters[f"container_error_{errors.code_name(code).lower()}"] += 1
        b.backend.send_multipart([identity, proto.encode("Error", {"code": code, "message": message})])

    def on_backend(self, frames: list[zmq.Frame]) -> None:
        b = self.broker
        identity = frames[0].bytes
        replica = b.replicas.get(identity)
        found = self.plain_replies.match(frames[1]) if replica is not None and len(frames) > 2 else None
        if found is not None and len(frames) == 2 + found[1][1]:  # plain outputs: no parse
            (batch_id, compute_us), (output, n) = found
            assert replica is not None
            now = replica.last_seen = time.monotonic()
            self.batch_done(replica, batch_id, compute_us / 1000, [output] * n, "", frames[2:], now)
            return
        if len(frames) < 2:
            self.backend_error(identity, ErrorCode.BAD_MESSAGE, "empty message: a header frame is required")
            return
        try:  # decoding only: a bug past it is not the replica's fault (Faults)
            name, body = proto.decode_current(frames[1].buffer)
            fields = proto.read_fields(name, body) if name in _READ_WHOLE else None
        except proto.UnknownMessage as exc:
            self.backend_error(identity, ErrorCode.UNKNOWN_MESSAGE, str(exc))
            return
        except proto.UnsupportedVersion as exc:
            self.backend_error(
                identity,
                ErrorCode.UNSUPPORTED_VERSION,
                f"protocol version {exc.version} is not supported"
                f" (this broker speaks {proto.versions.describe(proto.PROTOCOL_VERSIONS)})",
            )
            return
        except proto.DecodeError as exc:
            self.backend_error(identity, ErrorCode.BAD_MESSAGE, str(exc))
            return
        self.on_container_message(identity, name, body, fields, frames)

    def on_container_message(
        self, identity: bytes, name: str, body: Any, fields: dict[str, Any] | None, frames: list[zmq.Frame]
    ) -> None:
        b = self.broker
        now = time.monotonic()
        if name == "Hello":
            assert fields is not None
            b.connections.learn(identity, frames[1])
            self.on_hello(identity, fields, now)
            return
        replica = b.replicas.get(identity)
        if replica is None:
            if name == "PredictReply":  # from a connection declared dead or replaced: discarded
                b.counters["late_or_unknown_replies"] += 1
            if name != "Error":  # a peer never answers an Error with an Error
                self.backend_error(identity, ErrorCode.BAD_MESSAGE, "send Hello first")
            return
        replica.last_seen = now
        if name == "PredictReply":
            self.on_predict_reply(replica, frames[1], body, frames[2:], now)
        elif name == "Heartbeat":
            pass
        elif name == "Ready":
            assert fields is not None
            credits = fields["credits"]
            if credits > limits.MAX_CREDITS:
                self.backend_error(
                    identity, ErrorCode.INVALID, f"credits {credits}: 0 to {limits.MAX_CREDITS}"
                )
                return
            replica.credits = credits
            replica.refresh_state()
            b.dispatcher.dirty.add(b.models[replica.model])
            paused = negotiation.paused(replica)
            if paused is not None:
                b.backend.send_multipart([identity, paused])
                replica.last_sent = now
        elif name == "Goodbye":
            assert fields is not None
            reason = fields["reason"][:200]
            self.replica_gone(replica, f"goodbye: {reason}" if reason else "goodbye", now)
        elif name == "Error":
            assert fields is not None
            b.counters["container_errors_received"] += 1
            b.counters[f"replica_error_{errors.code_name(fields['code']).lower()}"] += 1
            log.warning(
                "error from a replica",
                replica=replica.replica_id,
                code=errors.code_name(fields["code"]),
                message=fields["message"][:200],
            )
        else:
            self.backend_error(identity, ErrorCode.UNKNOWN_MESSAGE, f"{name} is not a container message")

    def refuse_hello(self, identity: bytes, code: int, message: str, now: float) -> None:
        """Refuse a Hello; a replica registered on this connection is forgotten (its
        in-flight work re-queued, its cached answers dropped)."""
        b = self.broker
        b.counters["hellos_refused"] += 1
        old = b.replicas.get(identity)
        if old is not None:
            self.replica_gone(old, f"its new hello was refused: {message}", now)
        log.warning("hello refused", code=errors.code_name(code), reason=message)
        self.backend_error(identity, code, message)

    def on_hello(self, identity: bytes, h: dict[str, Any], now: float) -> None:
        b = self.broker
        problem = limits.check_hello(h)  # the fields; hellos.conflict: the other replicas
        if problem:
            self.refuse_hello(identity, ErrorCode.INVALID, f"hello refused: {problem}", now)
            return
        name, version, fingerprint = h["model"], h["model_version"], h["fingerprint"]
        replica_id = h["replica_id"] or identity.hex()
        tensor = h["input"]
        input_type = (tensor["dtype"], tuple(tensor["shape"]))
        conflict = hellos.conflict(b, identity, replica_id, name, version, input_type, fingerprint, now)
        if conflict:
            self.refuse_hello(identity, ErrorCode.CONFLICT, f"hello refused: {conflict}", now)
            return
        protocol, refusal = negotiation.choose(h)
        if protocol is None:
            self.refuse_hello(identity, ErrorCode.UNSUPPORTED_VERSION, refusal, now)
            return
        old = b.replicas.get(identity)
        if old is not None and self.hello_again(old, h, replica_id, now):
            return
        if old is not None:
            self.replica_gone(old, "hello again on the same connection", now)
        old_identity = b.replica_ids.get(replica_id)
        if old_identity is not None and old_identity in b.replicas:  # silent past dead_after_ms
            self.replica_gone(b.replicas[old_identity], "replaced by a new connection", now)
        model = b.models.get(name)
        if model is None:
            model = b.models[name] = Model(name)
        if not h["deterministic"]:
            model.deterministic = False
        if version not in model.known_versions:
            model.known_versions.append(version)
        if model.active_version is None:
            model.set_version(version)
        hellos.note_fingerprint(model, version, fingerprint)
        b.persistence.persist_model(model)
        replica = Replica(
            identity=identity,
            replica_id=replica_id,
            model=name,
            version=version,
            input_dtype=tensor["dtype"],
            input_shape=tuple(tensor["shape"]),
            sdk=h["sdk"],
            pid=h["pid"],
            credits=h["credits"],
            max_batch=h["max_batch"],
            deterministic=h["deterministic"],
            protocol=protocol,
            connected=now,
            last_seen=now,
            last_sent=now,
            fingerprint=fingerprint,
        )
        replica.controller = BatchController(model.policy(b.config.max_batch, replica.max_batch))
        replica.histograms = (
            model.queue_waits.get(version),
            model.rpc_times.get(version),
            model.compute_times.get(version),
        )
        b.replicas[identity] = replica
        b.replica_ids[replica_id] = identity
        model.replicas[identity] = replica
        welcome = negotiation.welcome(b.config.heartbeat_ms, b.config.dead_after_ms, protocol)
        b.backend.send_multipart([identity, welcome])
        replica.move(ReplicaState.READY)
        replica.refresh_state()
        b.dispatcher.dirty.add(model)
        log.info(
            "replica joined",
            model=name,
            version=version,
            replica=replica_id,
            sdk=replica.sdk,
            pid=replica.pid,
            fingerprint=fingerprint,
            protocol=protocol,
        )
        for app in b.apps.values():
            problem = schema_conflict(app, model) if name in app.models else ""
            if problem:
                log.warning("replica does not fit an app linking its model", problem=problem)

    def hello_again(self, old: Replica, h: dict[str, Any], replica_id: str, now: float) -> bool:
        """A registered replica with nothing in flight repeating its hello on the same
        connection (hellos it queued while the broker was away arrive together): welcome it
        again without forgetting it, so one broker restart is one join per replica."""
        same = (old.replica_id, old.model, old.version) == (replica_id, h["model"], h["model_version"])
        if not same or old.inflight or old.state not in (ReplicaState.READY, ReplicaState.BUSY):
            return False
        old.credits, old.last_seen = h["credits"], now
        old.refresh_state()
        b = self.broker
        welcome = proto.encode(
            "Welcome", {"heartbeat_ms": b.config.heartbeat_ms, "dead_after_ms": b.config.dead_after_ms}
        )
        b.backend.send_multipart([old.identity, welcome])
        b.dispatcher.dirty.add(b.models[old.model])
        log.debug("replica said hello again", model=old.model, replica=replica_id)
        return True

    def on_predict_reply(
        self, replica: Replica, header: zmq.Frame, r: Any, payloads: list[zmq.Frame], now: float
    ) -> None:
        batch_id = proto.read_batch_id(r)
        batch = replica.inflight.get(batch_id)
        if batch is None:
            self.broker.counters["late_or_unknown_replies"] += 1
            return
        size = len(batch.items)
        outputs: list[proto.Output] = []
        try:  # read the whole reply before answering anyone: a corrupt one fails as a whole
            reply = proto.read_predict_reply(r)
        except proto.DecodeError as exc:
            compute_ms, failure = 0.0, f"reply does not decode ({exc})"
        else:
            compute_ms, n = reply.compute_us / 1000, len(reply.outputs)
            if n == 0:
                failure = f"failed the batch: {reply.message or 'the model failed without a message'}"
            elif n != size or len(payloads) != n:
                failure = f"returned {n} outputs and {len(payloads)} payloads for a batch of {size}"
            else:
                failure, outputs = "", reply.outputs
                # outputs all OK and of one type: a later reply equal to this one outside the
                # batch id and the compute time is the same reply, so it is its own template
                self.plain_replies.learn_reply(header.buffer, r, outputs)
        self.batch_done(replica, batch_id, compute_ms, outputs, failure, payloads, now)

    def batch_done(
        self,
        replica: Replica,
        batch_id: int,
        compute_ms: float,
        outputs: list[proto.Output],
        failure: str,
        payloads: list[zmq.Frame],
        now: float,
    ) -> None:
        """Answer the queries of a batch from its reply, and learn from its timing."""
        b = self.broker
        batch = replica.inflight.pop(batch_id, None)
        if batch is None:
            b.counters["late_or_unknown_replies"] += 1
            return
        del b.batches[batch_id]
        replica.refresh_state()
        model = b.models[replica.model]
        b.dispatcher.dirty.add(model)
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
        _, rpc_h, compute_h = replica.histograms  # Histogram.observe, inline (a call per batch less)
        s = compute_ms / 1000
        compute_h.counts[bisect_left(LATENCY_BUCKETS_S, s)] += 1
        compute_h.sum += s
        s = rpc_ms / 1000
        rpc_h.counts[bisect_left(LATENCY_BUCKETS_S, s)] += 1
        rpc_h.sum += s
        replica.rpc_ewma_ms += 0.1 * (rpc_ms - replica.rpc_ewma_ms)
        replica.compute_ewma_ms += 0.1 * (compute_ms - replica.compute_ewma_ms)
        replica.controller.observe(len(items), compute_ms + rpc_ms, batch.budget_ms)
        if batch.span is not None:
            b.traces.batch_done(batch, compute_ms, rpc_ms, failure)
        answers = b.answers
        if failure:
            replica.errors += 1
            model.errors += 1
            for p in items:
                if not p.done:
                    answers.answer_error(p, ErrorCode.MODEL_ERROR, f"model {replica.model!r} {failure}")
            return
        first = outputs[0]
        if first[0] and first[1] is not None and all(o == first for o in outputs):
            answers.answer_plain(replica, items, first, payloads)
            return
        for i, (p, output) in enumerate(zip(items, outputs, strict=True)):
            if not p.done:
                answers.answer_item(p, replica, i, output, payloads[i])

    def replica_gone(self, replica: Replica, reason: str, now: float) -> None:
        """Forget a replica; re-queue or answer exactly the queries it held; drop the
        answers it computed from the cache.

        A query back from a replica that died may be what killed it (a "poison" input),
        so it is sent again only with its fellow suspects, to a replica given nothing else
        meanwhile (``Dispatcher.isolate``). The queries of one dead batch go back each
        alone while sending them one at a time costs the pool at most ``requeue_alone_ms``
        (``--requeue-alone-ms``; their count times ``alone_ms``); beyond that, they
        go back together as one batch (a replica lost to a kill, an OOM or a node costs its
        queries one batch's time, not one round trip each), and if that batch kills a
        replica too, each is sent alone. A query that dies alone is answered, never sent
        again, and the identical queries waiting on it (single-flight) share its answer
        instead of taking its place. So one input kills at most two replicas, or three in a
        batch too large to send back one by one, and the queries batched with it are served
        by the others."""
        b = self.broker
        if replica.state is not ReplicaState.DEAD:
            replica.move(ReplicaState.DEAD)
        b.cache.purge(replica.identity)
        b.replicas.pop(replica.identity, None)
        if b.replica_ids.get(replica.replica_id) == replica.identity:
            del b.replica_ids[replica.replica_id]
        model = b.models.get(replica.model)
        if model is not None:
            model.replicas.pop(replica.identity, None)
            b.dispatcher.dirty.add(model)
        requeued = failed = together = 0
        for batch in replica.inflight.values():
            b.batches.pop(batch.batch_id, None)
            if batch.span is not None:
                b.traces.batch_done(batch, 0.0, 0.0, f"replica {replica.replica_id} left: {reason}")
            back: list[Pending] = []
            for p in batch.items:
                if p.done:
                    continue
                p.replica = None
                if model is not None and p.deadline > now and (not p.requeued or p.suspects is not None):
                    back.append(p)
                else:
                    failed += 1
                    why = f"replica {replica.replica_id} of model {replica.model!r} died: {reason}"
                    followers = b.flights.release(p) if p.cache_key is not None else []
                    b.answers.answer_default(p, why)
                    for f in followers:  # an identical input: not computed again
                        b.answers.answer_default(f, f"{why} (computing an identical query)")
            if not back:
                continue
            assert model is not None
            group = None
            one_by_one = len(back) * alone_ms(model, replica)
            if not back[0].requeued and len(back) > 1 and one_by_one >= b.config.requeue_alone_ms:
                group = back  # the first time back, and too many to send one by one (0: always)
                together += len(back)
            for p in back:
                p.requeued = True
                p.suspects = group  # None: alone (also for a group back a second time)
                model.lane(p.version).queue.push(p)
            requeued += len(back)
        replica.inflight.clear()
        log.info(
            "replica left",
            model=replica.model,
            replica=replica.replica_id,
            reason=reason,
            requeued=requeued,
            together=together,
            failed=failed,
        )

    def check(self, now: float) -> None:
        """Declare silent replicas dead; heartbeat those the broker has not spoken to lately."""
        b = self.broker
        cfg = b.config
        heartbeat = None
        for replica in list(b.replicas.values()):
            if now - replica.last_seen > cfg.dead_after_ms / 1000:
                self.replica_gone(replica, f"silent for {cfg.dead_after_ms} ms", now)
            elif now - replica.last_sent > cfg.heartbeat_ms / 1000:
                heartbeat = heartbeat or proto.encode("Heartbeat", {})
                b.backend.send_multipart([replica.identity, heartbeat])
                replica.last_sent = now

    def drain(self, replica: Replica, reason: str) -> None:
        """Stop sending work to ``replica`` and ask it to finish what it holds and leave."""
        if replica.state in (ReplicaState.READY, ReplicaState.BUSY):
            replica.move(ReplicaState.DRAINING)
        self.broker.backend.send_multipart([replica.identity, proto.encode("Shutdown", {"reason": reason})])
        replica.last_sent = time.monotonic()
        log.info("replica draining", model=replica.model, replica=replica.replica_id, reason=reason)

    def reconfigure(self, model: Model) -> None:
        """Give every replica of ``model`` the model's current batching policy."""
        for replica in model.replicas.values():
            replica.controller.policy = model.policy(self.broker.config.max_batch, replica.max_batch)
        for lane in model.lanes.values():
            model.configure_lane(lane)
        self.broker.dispatcher.dirty.add(model)
