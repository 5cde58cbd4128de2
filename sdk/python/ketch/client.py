"""Clients of the broker's frontend: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Both speak docs/protocol.md section 4 over one DEALER socket. A query's input is a numpy
array (sent with its own dtype), a list of numbers (sent as float64 unless ``dtype``
says otherwise), a ``str`` or ``bytes``. Answers come back as ``Prediction``; an
explicit error from the broker or the model raises the matching ``RequestError``; no
answer in time raises ``Timeout``. A client object is not thread-safe: use one per
thread (or one ``AsyncClient`` per event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
import zmq
import zmq.asyncio

from ketch import addresses, errors
from ketch import protocol as proto
from ketch.curve import PeerKeys
from ketch.protocol import Status, multipart

log = structlog.get_logger("ketch.client")

DEFAULT_FRONTEND = addresses.FRONTEND
_GRACE_S = 0.5  # wait past the query's own timeout before calling the broker silent
_WAIT_NO_TIMEOUT_S = 10.0  # when the app's SLO applies, wait this long for the broker


@dataclass(frozen=True)
class Prediction:
    """One answer. ``default`` is true when the app's default output was returned."""

    output: Any
    default: bool = False
    default_explanation: str = ""
    model: str = ""
    version: str = ""
    latency_ms: float = 0.0  # round trip seen by the client
    broker_latency_ms: float = 0.0  # time the broker held the query
    confidence: float = 1.0
    models_answered: tuple[str, ...] = ()
    models_missing: tuple[str, ...] = ()
    request_id: int = field(default=0, repr=False)


def _pinned(answer: Any, version: str) -> Any:
    """``answer``, or a ProtocolError in its place when a query pinned to ``version`` was
    answered by another (a broker older than ``Query.model_version`` skips the field)."""
    if not version or not isinstance(answer, Prediction) or answer.default:
        return answer
    model, sep, plain = version.partition(":")
    if answer.version == version or (sep and (answer.model, answer.version) == (model, plain)):
        return answer
    return errors.ProtocolError(
        f"the query was pinned to version {version!r} but model {answer.model!r} version"
        f" {answer.version!r} answered: this broker does not pin versions (it predates"
        " Query.model_version)",
        request_id=answer.request_id,
    )


def encode_input(x: Any, dtype: str | None = None) -> tuple[int, tuple[int, ...], Any]:
    """(wire dtype, shape, payload) for one input."""
    if dtype is not None:
        code = proto.dtype_code(dtype)
        shape, payload = proto.value_to_payload(x, code)
        return code, tuple(shape), payload
    if isinstance(x, str):
        return proto.STRING, (), x.encode("utf-8")
    if isinstance(x, bytes | bytearray | memoryview):
        return proto.BYTES, (), bytes(x)
    if isinstance(x, np.ndarray | np.generic):
        arr = np.asarray(x)
        code = proto.WIRE_DTYPES.get(arr.dtype.newbyteorder("="))
        if code is None:
            raise TypeError(f"numpy dtype {arr.dtype} has no wire dtype; convert it first")
        arr = arr.astype(arr.dtype.newbyteorder("<"), order="C", copy=False)
        return code, arr.shape, arr.tobytes() if arr.ndim == 0 or not arr.size else memoryview(arr).cast("B")
    if isinstance(x, list | tuple | int | float):
        arr = np.asarray(x, dtype=np.float64)
        return proto.FLOAT64, arr.shape, arr.tobytes()
    raise TypeError(f"cannot send a {type(x).__name__}: use a numpy array, a list of numbers, str or bytes")


Answers = list[tuple[int, "Prediction | errors.RequestError"]]


def _parse(
    frames: list[Any], sent_at: dict[int, float] | None = None, client: _Base | None = None
) -> Answers:
    """Decode a frontend message into (request id, answer) pairs. Raises nothing: an item
    that does not decode (its header fields, its payload) fails alone, as a ProtocolError
    answer for its request id; what names no readable request id (a header that does not
    decode, an Error without a request id) fails nothing: it is counted on ``client``
    (``unreadable``) and logged."""
    try:
        plain = _plain_reply(frames, sent_at)
    except proto.DecodeError:
        plain = None
    if plain is not None:
        return plain
    out, problem = _parse_message(frames, sent_at)
    if problem:
        if client is not None:
            client.unreadable += 1
        log.warning("unreadable message from the broker", problem=problem[:300])
    elif out and not _PLAIN.full and all(isinstance(p, Prediction) and not p.default for _, p in out):
        _PLAIN.learn_reply(frames[0])  # a reply of plain predictions, kept as a template of itself
    return out


# Replies of plain predictions (every item OK, of one model version and output type) are
# rendered by the broker from a template. Once one has been parsed, it is kept here as a
# template of itself, and later replies that match it are read from their fixed slots: a
# copy and a comparison, not a parse of every field (ketch.protocol.reply).
_PLAIN = proto.PlainReplies(total=256)


def _plain_reply(frames: list[Any], sent_at: dict[int, float] | None) -> Answers | None:
    found = _PLAIN.match(frames[0]) if _PLAIN else None
    if found is None:
        return None
    values, (model, version, dtype, shape) = found
    if len(frames) != 1 + len(values) // 2:
        return None
    now = time.perf_counter()
    out: Answers = []
    answered = (model,)
    for i in range(0, len(values), 2):
        rid = values[i]
        try:
            output = proto.payload_to_value(dtype, shape, frames[1 + i // 2])
        except proto.DecodeError as exc:  # this item alone
            out.append((rid, errors.ProtocolError(f"answer does not decode: {exc}", request_id=rid)))
            continue
        started = sent_at.get(rid) if sent_at else None
        prediction = Prediction(
            output=output,
            model=model,
            version=version,
            latency_ms=(now - started) * 1000 if started else 0.0,
            broker_latency_ms=values[i + 1] / 1000,
            models_answered=answered,
            request_id=rid,
        )
        out.append((rid, prediction))
    return out


def _parse_message(frames: list[Any], sent_at: dict[int, float] | None) -> tuple[Answers, str]:
    now = time.perf_counter()
    try:
        _, name, body = proto.decode(frames[0])
        if name == "Error":
            e = proto.read_fields(name, body)
    except proto.DecodeError as exc:
        return [], f"message from the broker does not decode: {exc}"
    if name == "Error":
        err = errors.raise_for(
            e["code"], e["message"], request_id=e["request_id"], retry_after_ms=e["retry_after_ms"]
        )
        if e["request_id"]:
            return [(e["request_id"], err)], ""
        return [], f"error from the broker naming no query: {err.code_name}: {err.message}"
    if name != "Reply":
        return [], f"unexpected {name} from the broker"
    out: Answers = []
    items, broken, unnamed = proto.read_reply_items(body)
    for rid, why in broken:
        out.append((rid, errors.ProtocolError(why, request_id=rid)))
    payloads = frames[1:]
    for i, item in enumerate(items):
        if item is None:
            continue
        rid = item.request_id
        if item.status == Status.ERROR:
            err = errors.raise_for(
                item.error, item.message, request_id=rid, retry_after_ms=item.retry_after_ms
            )
            out.append((rid, err))
            continue
        payload = payloads[i] if i < len(payloads) else b""
        try:
            value = None if item.dtype is None else proto.payload_to_value(item.dtype, item.shape, payload)
        except proto.DecodeError as exc:  # this item alone
            out.append((rid, errors.ProtocolError(f"answer does not decode: {exc}", request_id=rid)))
            continue
        started = sent_at.get(rid) if sent_at else None
        default = item.status == Status.DEFAULT
        prediction = Prediction(
            output=value,
            default=default,
            default_explanation=item.message if default else "",
            model=item.model,
            version=item.model_version,
            latency_ms=(now - started) * 1000 if started else 0.0,
            broker_latency_ms=item.latency_us / 1000,
            confidence=item.confidence,
            models_answered=item.models_answered,
            models_missing=item.models_missing,
            request_id=rid,
        )
        out.append((rid, prediction))
    problem = f"{unnamed} reply item(s) from the broker name no readable query" if unnamed else ""
    return out, problem


def _wait_s(timeout_ms: float | None) -> float:
    return _WAIT_NO_TIMEOUT_S if timeout_ms is None else timeout_ms / 1000 + _GRACE_S


def _chunks(
    xs: Sequence[Any], dtype: str | None, size: int
) -> Iterable[tuple[int, tuple[int, ...], list[Any], range]]:
    """Group consecutive inputs of one dtype and shape into Query-sized chunks (at most
    ``MAX_ITEMS``, the protocol's item limit per message)."""
    size = max(1, min(size, proto.MAX_ITEMS))
    start = 0
    current: tuple[int, tuple[int, ...]] | None = None
    payloads: list[Any] = []
    for i, x in enumerate(xs):
        code, shape, payload = encode_input(x, dtype)
        if (code, shape) != current or len(payloads) == size:
            if payloads:
                yield current[0], current[1], payloads, range(start, i)
            current, payloads, start = (code, shape), [], i
        payloads.append(payload)
    if payloads:
        yield current[0], current[1], payloads, range(start, len(xs))


class _NoCurve:
    @staticmethod
    def apply(sock: zmq.Socket) -> None:
        pass


class _Base:
    def __init__(self, address: str | None) -> None:
        self.address = address or os.environ.get("KETCH_FRONTEND") or DEFAULT_FRONTEND
        # ids start at a random point so a restarted client does not reuse recent ones
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "little") << 20 | 1)
        self.unreadable = 0  # messages (or reply items) from the broker that named no query

    @staticmethod
    def _timeout_us(timeout_ms: float | None) -> int:
        return 0 if timeout_ms is None else max(1, int(timeout_ms * 1000))

    def _feedback(
        self,
        app: str,
        label: Any,
        rid: int,
        query_id: int | None,
        x: Any,
        context: str,
        label_dtype: str | None,
    ) -> list[Any]:
        if (query_id is None) == (x is None):
            raise ValueError("name the query by query_id or by its input x (one of them)")
        l_code, l_shape, l_payload = encode_input(label, label_dtype)
        fields: dict[str, Any] = {
            "app": app,
            "request_id": rid,
            "query_id": query_id or 0,
            "label": {"dtype": l_code, "shape": list(l_shape)},
            "context": context,
        }
        frames: list[Any] = []
        if x is not None:
            i_code, i_shape, i_payload = encode_input(x)
            fields["input"] = {"dtype": i_code, "shape": list(i_shape)}
            frames.append(i_payload)
        return [proto.encode("Feedback", fields), *frames, l_payload]


class Client(_Base):
    """Blocking client. ``Client(address)``; ``address`` defaults to ``$KETCH_FRONTEND``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        context: zmq.Context | None = None,
        curve: PeerKeys | None = None,
        retries: int = 0,
    ) -> None:
        super().__init__(address)
        self.retries = retries  # predict is idempotent: resend this many times after a Timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect_timeout = multipart.CONNECT_TIMEOUT_MS
        (curve or PeerKeys.load() or _NoCurve).apply(self._sock)
        self._sock.connect(self.address)
        self._rcvtimeo = -1
        self._sent_at: dict[int, float] = {}

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _recv(self, deadline: float) -> list[bytes] | None:
        """The next message, or None at ``deadline``: a blocking receive with a timeout,
        one system call fewer than a poll followed by a receive."""
        left = deadline - time.perf_counter()
        if left <= 0:
            return None
        ms = max(1, int(left * 1000))
        if ms != self._rcvtimeo:
            self._sock.rcvtimeo = self._rcvtimeo = ms
        try:
            frames = multipart.recv(self._sock)
        except zmq.Again:
            return None
        frames[0] = frames[0].bytes  # the header; payloads stay Frames (numpy reads them in place)
        return frames

    def _collect(self, want: set[int], deadline: float, results: dict[int, Any]) -> None:
        while want:
            frames = self._recv(deadline)
            if frames is None:
                if deadline - time.perf_counter() <= 0:
                    for rid in want:
                        self._sent_at.pop(rid, None)
                    raise errors.Timeout(
                        f"no answer from the broker at {self.address} in time for {len(want)} queries"
                    )
                continue
            for rid, answer in _parse(frames, self._sent_at, self):
                if rid in want:
                    want.discard(rid)
                    self._sent_at.pop(rid, None)
                    results[rid] = answer

    def predict(
        self,
        app: str,
        x: Any,
        timeout_ms: float | None = None,
        *,
        dtype: str | None = None,
        priority: int = 0,
        context: str = "",
        version: str = "",
    ) -> Prediction:
        """Ask ``app`` for one prediction. ``timeout_ms`` overrides the app's SLO.

        ``version`` pins the model version that answers (``MODEL:VERSION`` for an app that
        links several models), past the app's selection; a version the model does not have
        raises ``NotFound``. With ``retries`` set on the client, a query that gets no answer
        in time (the broker restarted, say) is sent again, as a new query, that many times.
        """
        code, shape, payload = encode_input(x, dtype)
        for attempt in range(self.retries + 1):
            try:
                return self._predict_once(app, code, shape, payload, timeout_ms, priority, context, version)
            except errors.Timeout:
                if attempt == self.retries:
                    raise
        raise AssertionError("unreachable")

    def _predict_once(
        self,
        app: str,
        code: int,
        shape: tuple[int, ...],
        payload: Any,
        timeout_ms: float | None,
        priority: int,
        context: str,
        version: str = "",
    ) -> Prediction:
        rid = next(self._ids)
        self._sent_at[rid] = time.perf_counter()
        timeout_us = 0 if timeout_ms is None else max(1, int(timeout_ms * 1000))
        header = proto.query_header(app, code, shape, (rid,), timeout_us, priority, context, version)
        multipart.send(self._sock, (header, payload))
        results: dict[int, Any] = {}
        self._collect({rid}, time.perf_counter() + _wait_s(timeout_ms), results)
        answer = _pinned(results[rid], version)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def predict_many(
        self,
        app: str,
        xs: Sequence[Any],
        timeout_ms: float | None = None,
        *,
        dtype: str | None = None,
        chunk: int = 32,
        window: int = 512,
        return_exceptions: bool = False,
        priority: int = 0,
        context: str = "",
        version: str = "",
    ) -> list[Prediction | errors.RequestError]:
        """Predictions for many inputs, pipelined on this socket, in input order.

        At most ``window`` queries are outstanding at once, sent ``chunk`` (at most 64) to a message.
        An error raises (the first one, in input order) unless ``return_exceptions``.
        ``version`` pins the model version, as in ``predict``.
        """
        results: dict[int, Any] = {}
        order: list[int] = []
        outstanding: set[int] = set()
        wait = _wait_s(timeout_ms)
        for code, shape, payloads, _ in _chunks(xs, dtype, chunk):
            ids = [next(self._ids) for _ in payloads]
            now = time.perf_counter()
            for rid in ids:
                self._sent_at[rid] = now
            header = proto.query_header(
                app, code, shape, ids, self._timeout_us(timeout_ms), priority, context, version
            )
            self._sock.send_multipart([header, *payloads], copy=False)
            order.extend(ids)
            outstanding.update(ids)
            while len(outstanding) > window:
                before = len(results)
                self._collect_some(outstanding, now + wait, results)
                if len(results) == before:
                    break
        self._collect(outstanding, time.perf_counter() + wait, results)
        answers = [_pinned(results[rid], version) for rid in order]
        if not return_exceptions:
            for a in answers:
                if isinstance(a, Exception):
                    raise a
        return answers

    def _collect_some(self, outstanding: set[int], deadline: float, results: dict[int, Any]) -> None:
        """Take at least one message of answers (or time out)."""
        frames = self._recv(deadline)
        if frames is None:
            raise errors.Timeout(f"no answer from the broker at {self.address} in time")
        for rid, answer in _parse(frames, self._sent_at, self):
            if rid in outstanding:
                outstanding.discard(rid)
                self._sent_at.pop(rid, None)
                results[rid] = answer

    def feedback(
        self,
        app: str,
        label: Any,
        *,
        query_id: int | None = None,
        x: Any = None,
        context: str = "",
        label_dtype: str | None = None,
        timeout_ms: float = 5000,
    ) -> None:
        """Tell ``app`` the true label of an earlier query (by ``query_id`` or input ``x``)."""
        rid = next(self._ids)
        self._sock.send_multipart(
            self._feedback(app, label, rid, query_id, x, context, label_dtype), copy=False
        )
        results: dict[int, Any] = {}
        self._collect({rid}, time.perf_counter() + timeout_ms / 1000, results)
        if isinstance(results[rid], Exception):
            raise results[rid]


class AsyncClient(_Base):
    """asyncio client with the same methods as ``Client``, as coroutines.

    Queries issued in one turn of the event loop (many requests of a server, say) go out
    together: those of one app and input type share a Query message, so the broker and
    this socket handle one message for many queries.
    """

    _MAX_PER_MESSAGE = proto.MAX_ITEMS

    def __init__(
        self,
        address: str | None = None,
        *,
        context: zmq.asyncio.Context | None = None,
        curve: PeerKeys | None = None,
    ) -> None:
        super().__init__(address)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.connect_timeout = multipart.CONNECT_TIMEOUT_MS
        (curve or PeerKeys.load() or _NoCurve).apply(self._sock)
        self._sock.connect(self.address)
        # the same socket, used without futures where a call cannot block
        self._now = zmq.Socket.shadow(self._sock.underlying)
        self._futures: dict[int, asyncio.Future] = {}  # unanswered queries
        self._registered: dict[int, asyncio.Future] = {}  # registered, not yet awaited
        self._sent_at: dict[int, float] = {}
        self._reader: asyncio.Task | None = None
        self._outbox: dict[tuple, list[tuple[int, Any]]] = {}
        self._flush_soon: asyncio.Handle | None = None
        self._sending: set[asyncio.Task] = set()

    async def close(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if not self._sock.closed:
            self._sock.close(linger=0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            self._take(await self._sock.recv_multipart())
            self._take_waiting()

    def _take_waiting(self) -> None:
        """Take the messages that have arrived, without a future per message.

        Also needed after every direct send: an operation on a ZeroMQ socket may consume the
        descriptor's signal of a message that arrived meanwhile, and the waiting reader
        would then sleep until some later message."""
        sock = self._now
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._take(sock.recv_multipart(zmq.NOBLOCK))

    def _take(self, frames: list[bytes]) -> None:
        # each answer goes to its own request; what names none fails none (counted, logged)
        for rid, answer in _parse(frames, self._sent_at, self):
            self._sent_at.pop(rid, None)
            fut = self._futures.pop(rid, None)
            if fut is not None and not fut.done():
                if isinstance(answer, Exception):
                    fut.set_exception(answer)
                else:
                    fut.set_result(answer)

    def _post(self, key: tuple, rid: int, payload: Any) -> None:
        """Queue one query for the message sent at the end of this turn of the loop."""
        self._outbox.setdefault(key, []).append((rid, payload))
        if self._flush_soon is None:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = None
        outbox, self._outbox = self._outbox, {}
        for (app, code, shape, timeout_ms, priority, context, version), items in outbox.items():
            for start in range(0, len(items), self._MAX_PER_MESSAGE):
                part = items[start : start + self._MAX_PER_MESSAGE]
                ids = [r for r, _ in part]
                timeout_us = self._timeout_us(timeout_ms)
                header = proto.query_header(app, code, shape, ids, timeout_us, priority, context, version)
                self._send_now([header, *(p for _, p in part)])
        self._take_waiting()

    def _send_now(self, frames: list[Any]) -> None:
        try:
            self._now.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:  # no broker connected yet, or a full queue: wait for it
            task = asyncio.get_running_loop().create_task(self._sock.send_multipart(frames, copy=False))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _await(self, ids: list[int], timeout_ms: float | None, return_exceptions: bool) -> list[Any]:
        # the futures as registered: an answer taken meanwhile (a direct send also takes
        # the replies waiting) has already removed its own from ``_futures``
        futs = [self._registered.pop(rid) for rid in ids]
        try:
            async with asyncio.timeout(_wait_s(timeout_ms)):
                if len(futs) == 1:
                    try:
                        return [await futs[0]]
                    except errors.RequestError as exc:
                        if return_exceptions:
                            return [exc]
                        raise
                return await asyncio.gather(*futs, return_exceptions=return_exceptions)
        except TimeoutError:
            raise errors.Timeout(f"no answer from the broker at {self.address} in time") from None
        finally:
            for rid in ids:
                self._futures.pop(rid, None)
                self._sent_at.pop(rid, None)

    def _register(self, n: int) -> list[int]:
        loop = asyncio.get_running_loop()
        ids = [next(self._ids) for _ in range(n)]
        now = time.perf_counter()
        for rid in ids:
            self._futures[rid] = self._registered[rid] = loop.create_future()
            self._sent_at[rid] = now
        return ids

    async def predict(
        self,
        app: str,
        x: Any,
        timeout_ms: float | None = None,
        *,
        dtype: str | None = None,
        priority: int = 0,
        context: str = "",
        version: str = "",
    ) -> Prediction:
        """As ``Client.predict``; ``version`` pins the model version."""
        self._ensure_reader()
        code, shape, payload = encode_input(x, dtype)
        ids = self._register(1)
        self._post((app, code, tuple(shape), timeout_ms, priority, context, version), ids[0], payload)
        answer = _pinned((await self._await(ids, timeout_ms, False))[0], version)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def predict_many(
        self,
        app: str,
        xs: Sequence[Any],
        timeout_ms: float | None = None,
        *,
        dtype: str | None = None,
        chunk: int = 32,
        return_exceptions: bool = False,
        priority: int = 0,
        context: str = "",
        version: str = "",
    ) -> list[Prediction | errors.RequestError]:
        self._ensure_reader()
        all_ids: list[int] = []
        try:
            for code, shape, payloads, _ in _chunks(xs, dtype, chunk):
                ids = self._register(len(payloads))
                all_ids.extend(ids)
                timeout_us = self._timeout_us(timeout_ms)
                header = proto.query_header(app, code, shape, ids, timeout_us, priority, context, version)
                self._send_now([header, *payloads])
        except BaseException:  # an input that does not encode: forget what was registered
            for rid in all_ids:
                self._registered.pop(rid, None)
                self._futures.pop(rid, None)
                self._sent_at.pop(rid, None)
            raise
        self._take_waiting()
        answers = [_pinned(a, version) for a in await self._await(all_ids, timeout_ms, return_exceptions)]
        if not return_exceptions:
            for a in answers:
                if isinstance(a, Exception):
                    raise a
        return answers

    async def feedback(
        self,
        app: str,
        label: Any,
        *,
        query_id: int | None = None,
        x: Any = None,
        context: str = "",
        label_dtype: str | None = None,
        timeout_ms: float = 5000,
    ) -> None:
        self._ensure_reader()
        ids = self._register(1)
        await self._sock.send_multipart(self._feedback(app, label, ids[0], query_id, x, context, label_dtype))
        await self._await(ids, timeout_ms - _GRACE_S * 1000, False)
