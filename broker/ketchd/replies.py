"""The one reply sender: every answer to a client leaves through here.

Answers gather during a turn of the loop, per client, and leave at its end (or as soon as
the backend is drained): plain predictions of one family (``Answers.answer_plain`` writes
them straight into ``plain_out`` as an id and a latency each) and refusals of one code and
message (``refuse``: an id and a retry-after each) are rendered from Reply templates,
anything else is built; at most ``MAX_ITEMS`` answers to a Reply
(``ketch.protocol.ReplySender``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ketch import protocol as proto
from ketch.protocol import MAX_ITEMS, ErrorCode, Status

if TYPE_CHECKING:
    from ketchd.broker import Broker


class Replies:
    def __init__(self, broker: Broker, prebuilds: proto.Prebuilds) -> None:
        self.broker = broker
        self.sender = proto.ReplySender(prebuilds)
        self.out: defaultdict[bytes, list[tuple[proto.ReplyFields, Any]]] = defaultdict(list)
        # plain predictions by (client, family): ([id, latency_us, ...], payloads)
        self.plain_out: dict[tuple[bytes, proto.PlainFamily], tuple[list[int], list[Any]]] = {}
        # refusals by (client, (code, message)): [id, retry_after_ms, ...]
        self.refused_out: dict[tuple[bytes, tuple[int, str]], list[int]] = {}

    def reply(self, client: bytes, item: proto.ReplyFields, payload: Any) -> None:
        """Queue one answer for ``client``."""
        self.out[client].append((item, payload))

    def refuse(self, client: bytes, code: int, message: str, request_id: int, retry_after_ms: int) -> None:
        """Queue a refusal (an ERROR answer with a retry-after; neither id nor retry 0) for
        ``client``: refusals of one code and message are rendered from a template."""
        key = (client, (code, message))
        values = self.refused_out.get(key)
        if values is None:
            self.refused_out[key] = [request_id, retry_after_ms]
        else:
            values += (request_id, retry_after_ms)

    def flush(self) -> None:
        """Send what was gathered: plain predictions and refusals by template, the rest as
        it comes. A reply that cannot be sent (a bug) is counted and logged, and its answers
        go as INTERNAL errors instead: no answer is lost, none sent twice."""
        sock = self.broker.frontend
        if self.refused_out:
            refused, self.refused_out = self.refused_out, {}
            for (client, reason), values in refused.items():
                try:
                    self.sender.send_refused(sock, client, reason, values)
                except Exception as exc:
                    self._failed(client, values[0::2], exc)
        if self.plain_out:
            plain, self.plain_out = self.plain_out, {}
            for (client, family), (values, payloads) in plain.items():
                if len(payloads) <= MAX_ITEMS:
                    try:
                        self.sender.send_plain(sock, client, family, values, payloads)
                    except Exception as exc:
                        self._failed(client, values[0::2], exc)
                    continue
                for at in range(0, len(payloads), MAX_ITEMS):  # a Reply at a time, each alone
                    end = at + MAX_ITEMS
                    try:
                        self.sender.send_plain(
                            sock, client, family, values[2 * at : 2 * end], payloads[at:end]
                        )
                    except Exception as exc:
                        self._failed(client, values[2 * at : 2 * end : 2], exc)
        if not self.out:
            return
        out, self.out = self.out, defaultdict(list)
        sender = self.sender
        for client, answers in out.items():
            for at in range(0, len(answers), MAX_ITEMS):
                chunk = answers[at : at + MAX_ITEMS] if len(answers) > MAX_ITEMS else answers
                try:
                    # sender.send, unfolded: a call fewer per client and turn
                    found = proto.plain_answers(chunk)  # a cache leader's, an ensemble's first answer
                    if found is not None:
                        sender.send_plain(sock, client, found[0], found[1], [payload for _, payload in chunk])
                    else:
                        sender.send_built(sock, client, chunk)
                except Exception as exc:
                    self._failed(client, [item.request_id for item, _ in chunk], exc)

    def _failed(self, client: bytes, ids: list[int], exc: Exception) -> None:
        """A Reply that could not be built or sent: its answers go as INTERNAL errors."""
        faults = self.broker.faults
        faults.internal_error("sending a reply", exc)
        message = faults.message("sending a reply", exc)
        items = [
            proto.ReplyFields(rid, Status.ERROR, error=ErrorCode.INTERNAL, message=message) for rid in ids
        ]
        try:
            self.sender.send_built(self.broker.frontend, client, [(item, b"") for item in items])
        except Exception as again:  # nothing more to try: the client's own timeout answers
            faults.internal_error("sending INTERNAL errors", again)
