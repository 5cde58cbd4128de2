"""What one message and one client may cost the broker, and the answer beyond it.

Every limit is checked when a message arrives, before anything of it is held, and what is
refused is answered at once (docs/reliability.md, "Limits"):

    message bytes   all frames of a message together at most ``max_message_bytes``
                    (ZeroMQ drops a frame over it before receipt: ``ZMQ_MAXMSGSIZE``);
                    beyond, each request id gets ``TOO_LARGE`` (a batch reply fails its batch)
    message frames  at most ``max_message_items`` + 2 frames are taken; the rest of a longer
                    message is received and dropped, and the message refused as above
    items           a Query names at most ``max_message_items`` request ids: beyond, one
                    message-level ``Error{TOO_LARGE}``, not one answer per id
    query fields    app name at most 128 bytes, context at most ``max_context_bytes``, shape
                    rank at most 32: beyond, ``BAD_INPUT`` per request id
    feedback        label and input payloads at most ``max_label_bytes``: beyond, ``TOO_LARGE``
    held bytes      the payloads of the queries a client has in the broker at most
                    ``max_client_bytes``, of all clients ``max_held_bytes``: beyond,
                    ``OVERLOADED`` with ``retry_after_ms`` (checked in ``Admission.admit``)

Pure bookkeeping on the loop, no sockets of its own: answers leave through ``Replies`` and
the sockets' error senders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq
from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status
from ketch.protocol.limits import MAX_NAME, MAX_RANK

if TYPE_CHECKING:
    from ketchd.broker import Broker
    from ketchd.registry import Replica

_EMPTY = b""


def mib(n: int) -> str:
    """A size as a person reads it."""
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n} bytes"


class Limits:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        cfg = broker.config
        if cfg.max_message_items < proto.MAX_ITEMS:
            raise ValueError(
                f"max_message_items must be at least {proto.MAX_ITEMS} (Ketch's clients send that many)"
            )
        self.max_bytes = cfg.max_message_bytes
        # identity, header and one payload per item; a batch reply: header and one per output
        self.max_frames = max(cfg.max_message_items, cfg.max_batch) + 2

    # ------------------------------------------------------------ whole messages

    def too_large(self, frames: list[zmq.Frame]) -> str:
        """Why a received message is over the limits ('' when it is not); ``frames`` as
        ``multipart.recv`` gave them with ``limit=max_frames`` (one more: truncated)."""
        if len(frames) > self.max_frames:
            return f"message of more than {self.max_frames - 1} frames (at most {self.max_frames - 2} items)"
        total = sum(map(len, frames))
        if total > self.max_bytes:
            return f"message of {mib(total)} (at most {mib(self.max_bytes)} with all its frames)"
        return ""

    def refuse_client_message(self, client: bytes, header: zmq.Frame, why: str) -> None:
        """A client message over the limits: TOO_LARGE for each request id it names (a Query
        of at most ``max_message_items``, a Feedback), else one message-level Error."""
        b = self.broker
        b.counters["refused_too_large"] += 1
        try:
            name, body = proto.decode_current(header.buffer)
            if name == "Query" and 0 < proto.query_ids_count(body) <= b.config.max_message_items:
                ids = proto.read_query(body)[1]
            elif name == "Feedback":
                ids = [proto.read_fields(name, body)["request_id"]]
            else:
                ids = []
        except proto.DecodeError:
            ids = []
        if not ids:
            b.admission.client_error(client, ErrorCode.TOO_LARGE, why)
            return
        for rid in ids:
            b.replies.reply(client, _error(rid, ErrorCode.TOO_LARGE, why), _EMPTY)

    def refuse_replica_message(
        self, identity: bytes, replica: Replica | None, header: zmq.Frame, why: str
    ) -> None:
        """A backend message over the limits: a batch reply fails its batch; anything else
        gets an Error."""
        b = self.broker
        b.counters["container_refused_too_large"] += 1
        batch_id = 0
        if replica is not None:
            try:
                name, body = proto.decode_current(header.buffer)
                if name == "PredictReply":
                    batch_id = proto.read_batch_id(body)
            except proto.DecodeError:
                pass
        if replica is not None and batch_id in replica.inflight:
            b.containers.batch_done(
                replica, batch_id, 0.0, [], f"reply is too large: {why}", [], replica.last_seen
            )
            return
        b.containers.backend_error(identity, ErrorCode.TOO_LARGE, why)

    # ------------------------------------------------------------ a Query read the long way

    def read_query(self, client: bytes, body: Any) -> tuple[proto.QueryType, list[int]] | None:
        """A Query's type and ids (``proto.read_query``), or None when it is over the limits
        (then answered: one Error for too many ids, BAD_INPUT per id for its fields)."""
        b = self.broker
        cfg = b.config
        count = proto.query_ids_count(body)
        if count > cfg.max_message_items:
            b.counters["refused_too_large"] += 1
            b.admission.client_error(
                client,
                ErrorCode.TOO_LARGE,
                f"query names {count} request ids (at most {cfg.max_message_items} to a message)",
            )
            return None
        query, ids = proto.read_query(body)
        problem = ""
        if len(query.app.encode()) > MAX_NAME:
            problem = f"app name of {len(query.app.encode())} bytes (names are at most {MAX_NAME})"
        elif len(query.context.encode()) > cfg.max_context_bytes:
            problem = f"context of {len(query.context.encode())} bytes (at most {cfg.max_context_bytes})"
        elif len(query.model_version.encode()) > 2 * MAX_NAME:
            problem = f"model_version of {len(query.model_version.encode())} bytes (at most {2 * MAX_NAME})"
        elif len(query.shape) > MAX_RANK:
            problem = f"input of rank {len(query.shape)} (at most {MAX_RANK} dimensions)"
        if problem:
            b.counters["refused_bad_input"] += len(ids)
            for rid in ids:
                b.replies.reply(client, _error(rid, ErrorCode.BAD_INPUT, problem), _EMPTY)
            return None
        return query, ids

    def feedback_problem(self, frames: list[zmq.Frame]) -> str:
        """Why a Feedback's payloads (label, input) are over the limit ('' when not)."""
        limit = self.broker.config.max_label_bytes
        for frame in frames:
            if len(frame) > limit:
                return f"feedback payload of {mib(len(frame))} (at most {mib(limit)})"
        return ""

    # ------------------------------------------------------------ held bytes

    def bytes_refusal(self, client: bytes, nbytes: int) -> str:
        """Why ``client`` may not have ``nbytes`` more payload bytes held ('' when it may)."""
        b = self.broker
        cfg = b.config
        held = b.client_bytes.get(client, 0)
        if held + nbytes > cfg.max_client_bytes:
            return (
                f"this client's queries in the broker hold {mib(held)} of payloads"
                f" (at most {mib(cfg.max_client_bytes)}); this message brings {mib(nbytes)}"
            )
        if b.held_bytes + nbytes > cfg.max_held_bytes:
            return (
                f"the broker holds {mib(b.held_bytes)} of query payloads"
                f" (at most {mib(cfg.max_held_bytes)}); this message brings {mib(nbytes)}"
            )
        return ""


def _error(rid: int, code: int, message: str) -> proto.ReplyFields:
    return proto.ReplyFields(rid, Status.ERROR, error=code, message=message)
