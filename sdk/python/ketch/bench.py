"""Load generation against a broker: open loop (Poisson arrivals) and closed loop.

Both run on one DEALER socket in the calling thread, are bounded in time and count, and
record every query's outcome. Open-loop latency is measured from each query's scheduled
arrival time, so a client that falls behind is charged for it (no coordinated omission).
Used by ``ketch bench`` and the benchmarks in ``perf/``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import random
import re
import select
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from ketch import protocol as proto
from ketch.client import encode_input
from ketch.protocol import Status, multipart

_PR_SET_TIMERSLACK, _PR_GET_TIMERSLACK = 29, 30  # linux/prctl.h


MAX_REASONS = 8  # kinds of default explanations a LoadResult tells apart
_NUMBER = re.compile(r"\d+(\.\d+)?")


@dataclass
class LoadResult:
    """What happened to every query of one load level."""

    sent: int = 0
    ok: int = 0
    defaults: int = 0
    errors: int = 0
    lost: int = 0  # no answer before the end (should stay 0)
    duplicates: int = 0  # answers for a query already answered (must stay 0)
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # every answered query
    ok_latencies_ms: list[float] = field(default_factory=list)
    error_codes: dict[str, int] = field(default_factory=dict)
    error_examples: dict[str, str] = field(default_factory=dict)  # code -> the first message
    # why the defaults came: the broker's explanation with its numbers as N ("deadline: query
    # waited N ms in the queue of model 'm'") -> how many; MAX_REASONS kinds, then "other"
    default_reasons: dict[str, int] = field(default_factory=dict)

    def add_default(self, message: str) -> None:
        self.defaults += 1
        reason = _NUMBER.sub("N", message)[:100]
        if reason not in self.default_reasons and len(self.default_reasons) >= MAX_REASONS:
            reason = "other"
        self.default_reasons[reason] = self.default_reasons.get(reason, 0) + 1

    def add_error(self, code: str, message: str) -> None:
        self.errors += 1
        self.error_codes[code] = self.error_codes.get(code, 0) + 1
        self.error_examples.setdefault(code, message[:300])

    @property
    def throughput(self) -> float:
        """Predictions (not defaults, not errors) per second."""
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def answered_per_s(self) -> float:
        return (self.ok + self.defaults + self.errors) / self.elapsed_s if self.elapsed_s else 0.0

    def quantile(self, q: float, ok_only: bool = False) -> float:
        data = self.ok_latencies_ms if ok_only else self.latencies_ms
        return float(np.percentile(data, q)) if data else float("nan")

    def within(self, slo_ms: float) -> float:
        """Share of sent queries answered with a prediction within ``slo_ms``."""
        if not self.sent:
            return 0.0
        return sum(1 for v in self.ok_latencies_ms if v <= slo_ms) / self.sent

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "ok": self.ok,
            "defaults": self.defaults,
            "errors": self.errors,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "throughput": round(self.throughput, 1),
            "p50_ms": round(self.quantile(50), 3),
            "p90_ms": round(self.quantile(90), 3),
            "p99_ms": round(self.quantile(99), 3),
            "p999_ms": round(self.quantile(99.9), 3),
        }


class _Session:
    """One socket, the queries in flight, and the bookkeeping of their answers."""

    def __init__(self, frontend: str, app: str, timeout_ms: float | None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = self.sock.sndhwm = 1_000_000
        self.sock.connect(frontend)
        self._fd = self.sock.getsockopt(zmq.FD)
        self.app = app
        self.timeout_us = 0 if timeout_ms is None else int(timeout_ms * 1000)
        self.started: dict[int, float] = {}
        self.answered: set[int] = set()
        self.result = LoadResult()
        self._ids = int.from_bytes(os.urandom(3), "little") << 24
        # reply templates learnt, each with its slots per answer (the id comes first)
        self._plain: proto.LearntTemplates[int] = proto.LearntTemplates(total=64)

    def send(self, inputs: list[Any], at: list[float]) -> None:
        """Send ``inputs`` (of one type), at most MAX_ITEMS to a message (the broker refuses a
        message of more than its ``max_message_items`` as a whole)."""
        code, shape, first = encode_input(inputs[0])
        payloads = [first, *[encode_input(x)[2] for x in inputs[1:]]]
        ids = list(range(self._ids + 1, self._ids + 1 + len(inputs)))
        self._ids += len(inputs)
        for rid, t in zip(ids, at, strict=True):
            self.started[rid] = t
        for start in range(0, len(ids), proto.MAX_ITEMS):
            end = start + proto.MAX_ITEMS
            header = proto.query_header(self.app, code, tuple(shape), ids[start:end], self.timeout_us)
            multipart.send(self.sock, [header, *payloads[start:end]])
        self.result.sent += len(inputs)

    def receive(self, timeout_ms: float) -> int:
        """Take the answers that arrive within ``timeout_ms``; returns how many."""
        got = 0
        if not self._wait(timeout_ms / 1000):
            return 0
        while True:
            try:
                frames = multipart.recv(self.sock, multipart.NOBLOCK)
            except zmq.Again:
                return got
            now = time.perf_counter()
            found = self._plain.match(frames[0]) if self._plain else None
            if found is not None:  # plain predictions, as learnt: ids from fixed slots
                values, stride = found
                got += self._answered_ok(values[0::stride], now)
            else:
                got += self._take(frames[0].bytes, now)

    def _latency(self, rid: int, now: float) -> float | None:
        """The round trip of ``rid`` in ms, recorded; None for an id not in flight."""
        t0 = self.started.pop(rid, None)
        if t0 is None:
            if rid in self.answered:
                self.result.duplicates += 1
            return None
        self.answered.add(rid)
        ms = (now - t0) * 1000
        self.result.latencies_ms.append(ms)
        return ms

    def _answered_ok(self, ids: list[int], now: float) -> int:
        r, got = self.result, 0
        for rid in ids:
            ms = self._latency(rid, now)
            if ms is not None:
                got += 1
                r.ok += 1
                r.ok_latencies_ms.append(ms)
        return got

    def _take(self, header: bytes, now: float) -> int:
        """A reply read the long way: ids, status and error codes."""
        _, name, body = proto.decode(header)
        if name != "Reply":
            if name == "Error":  # the whole message refused: its queries are answered by it
                fields = proto.read_fields(name, body)
                code = proto.ERROR_NAMES.get(fields["code"], str(fields["code"]))
                self.result.add_error(code, fields["message"])
                rid = fields.get("request_id")
                if rid and self.started.pop(rid, None) is not None:
                    self.answered.add(rid)
                    return 1
            else:
                self.result.errors += 1
            return 0
        r, got, plain = self.result, 0, True
        for item in proto.read_reply(body):
            status = item.status
            plain = plain and status == Status.OK
            ms = self._latency(item.request_id, now)
            if ms is None:
                continue
            got += 1
            if status == Status.OK:
                r.ok += 1
                r.ok_latencies_ms.append(ms)
            elif status == Status.DEFAULT:
                r.add_default(item.message)
            else:
                r.add_error(proto.ERROR_NAMES.get(item.error, str(item.error)), item.message)
                self._errored(item.error, ms)
        if plain and not self._plain.full:
            self._learn(header)
        return got

    def _errored(self, code: int, ms: float) -> None:
        """An error answer (its code) that took ``ms``: for subclasses that time them."""

    def _learn(self, header: bytes) -> None:
        """Keep a reply of plain predictions as a template of itself (as ketch.client does)."""
        found = proto.plain_reply_template(header)
        if found is not None:
            self._plain.learn(header, found[0], 2)  # (request id, latency) per answer

    def _wait(self, timeout_s: float) -> bool:
        """Whether a message waits, after at most ``timeout_s``. ZeroMQ's own poll counts in
        whole milliseconds: a shorter wait would either spin (stealing a core from the system
        under test) or send the next arrival late. select() on the socket's descriptor waits
        to the microsecond; the descriptor only signals a change, so the socket's event
        state is read before sleeping and after waking."""
        if multipart.waiting(self.sock):
            return True
        if timeout_s > 0:
            select.select([self._fd], [], [], timeout_s)
        return multipart.waiting(self.sock)

    def drain(self, grace_s: float) -> None:
        end = time.perf_counter() + grace_s
        while self.started and time.perf_counter() < end:
            self.receive((end - time.perf_counter()) * 1000)
        self.result.lost = len(self.started)

    def close(self) -> None:
        self.sock.close(linger=0)


@contextlib.contextmanager
def _measuring() -> Iterator[None]:
    """This thread set up to time a load: on Linux a timer slack of 1 ns instead of 50 us
    (a wait for the next arrival overshot by ~80 us at the median, ~40 us with it, and the
    overshoot is counted as latency), and the cyclic garbage collector off, as ``timeit``
    does (a full collection of this process, 10-20 ms at 24k q/s, stalls every answer in
    flight). The loops make no reference cycles; what they drop is freed by reference
    counting."""
    slack = _set_timer_slack(1)
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
        if slack is not None:
            _set_timer_slack(slack)


def _set_timer_slack(ns: int) -> int | None:
    """Set this thread's timer slack (Linux prctl); the previous value, None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = libc.prctl(_PR_GET_TIMERSLACK, 0, 0, 0, 0)
        if before < 0 or libc.prctl(_PR_SET_TIMERSLACK, ns, 0, 0, 0) != 0:
            return None
        return before
    except (OSError, AttributeError):
        return None


def varied_inputs(inputs: list[Any]) -> tuple[Any, str]:
    """A ``make_input(k)`` whose inputs differ from each other (so the prediction cache cannot
    answer them), and how: float inputs get ``k`` written into the lowest bits of their
    values (a change of a few units in the last place, which no model notices); other
    kinds cycle through the inputs given, and the cache answers their repeats."""
    first = inputs[0]
    if not isinstance(first, np.ndarray) or first.dtype.kind != "f" or first.size == 0:
        return (lambda k: inputs[k % len(inputs)]), (
            f"{len(inputs)} distinct input(s), repeated: only float inputs can be varied unnoticed"
        )
    bits = {8: 16, 4: 8, 2: 2}[first.dtype.itemsize]  # low mantissa bits used per element
    ints = np.dtype(f"<u{first.dtype.itemsize}")
    bases = [np.ascontiguousarray(x).reshape(-1).view(ints) for x in inputs]
    shapes = [x.shape for x in inputs]
    mask = np.array((1 << bits) - 1, dtype=ints)

    def make(k: int) -> np.ndarray:
        i = k % len(inputs)
        base, n = bases[i], k // len(inputs)
        digits = np.zeros(base.size, dtype=ints)
        for j in range(base.size):  # n in base 2**bits, one digit per element
            digits[j], n = n & int(mask), n >> bits
            if not n:
                break
        return ((base & ~mask) | ((base & mask) ^ digits)).view(inputs[i].dtype).reshape(shapes[i])

    return make, "each input unique (lowest bits of its values varied), so the cache cannot answer"


def run_start(inputs: list[Any]) -> int:
    """Where ``varied_inputs``' counter starts for this run: a random multiple of 2**20 when
    the inputs leave room for at least 2**32 variations (so a second run does not repeat
    the first, whose answers the cache may still hold; two runs of under 2**20 queries
    overlap with a chance of one in 2**(room - 24)), else 0."""
    first = inputs[0]
    if not isinstance(first, np.ndarray) or first.dtype.kind != "f":
        return 0
    room = min(64, {8: 16, 4: 8, 2: 2}[first.dtype.itemsize] * first.size)
    return random.getrandbits(room - 24) << 20 if room >= 32 else 0


def open_loop(
    frontend: str,
    app: str,
    make_input: Callable[[int], Any],
    rate: float,
    duration_s: float,
    *,
    timeout_ms: float | None = None,
    grace_s: float = 5.0,
    seed: int = 0,
    progress: Callable[[LoadResult], None] | None = None,
    session_type: type[_Session] | None = None,
) -> LoadResult:
    """Poisson arrivals at ``rate`` per second for ``duration_s``; arrivals due at the same
    moment go out in one message, as a client with many users would send them.
    ``session_type``: a ``_Session`` subclass that reads another peer's answers (perf's
    raw relay)."""
    rng = np.random.default_rng(seed)
    n = int(rate * duration_s)
    arrivals = np.cumsum(rng.exponential(1 / rate, size=n))
    session = (session_type or _Session)(frontend, app, timeout_ms)
    with contextlib.closing(session), _measuring():
        t0 = time.perf_counter()
        i = 0
        next_progress = t0 + 1
        while i < n:
            now = time.perf_counter()
            due = i
            while due < n and t0 + arrivals[due] <= now:
                due += 1
            if due > i:
                session.send(
                    [make_input(k) for k in range(i, due)], [t0 + arrivals[k] for k in range(i, due)]
                )
                i = due
            wait_ms = ((t0 + arrivals[i]) - time.perf_counter()) * 1000 if i < n else 0
            session.receive(max(0.0, wait_ms))
            if progress is not None and now >= next_progress:
                progress(session.result)
                next_progress = now + 1
        session.result.elapsed_s = time.perf_counter() - t0
        session.drain(grace_s)
        return session.result


def closed_loop(
    frontend: str,
    app: str,
    make_input: Callable[[int], Any],
    concurrency: int,
    duration_s: float,
    *,
    timeout_ms: float | None = None,
    max_queries: int = 10_000_000,
    grace_s: float = 5.0,
    progress: Callable[[LoadResult], None] | None = None,
    one_per_message: bool = False,
) -> LoadResult:
    """Keep ``concurrency`` queries in flight for ``duration_s`` (or ``max_queries``).

    The queries that refill the level go out in one message, as a client with many users
    would send them; with ``one_per_message`` each goes in a message of its own, as
    independent callers, each with one query at a time, send them."""
    session = _Session(frontend, app, timeout_ms)
    with contextlib.closing(session), _measuring():
        t0 = time.perf_counter()
        end = t0 + duration_s
        k = 0
        next_progress = t0 + 1
        while True:
            now = time.perf_counter()
            if now >= end or k >= max_queries:
                break
            free = concurrency - len(session.started)
            if free > 0:
                count = min(free, max_queries - k)
                if one_per_message:
                    for j in range(count):
                        session.send([make_input(k + j)], [now])
                else:
                    session.send([make_input(k + j) for j in range(count)], [now] * count)
                k += count
            session.receive(max(0.0, min(50.0, (end - now) * 1000)))
            if progress is not None and now >= next_progress:
                progress(session.result)
                next_progress = now + 1
        session.drain(grace_s)
        session.result.elapsed_s = time.perf_counter() - t0
        return session.result
