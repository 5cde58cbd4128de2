"""uvicorn's HTTP protocol with bounded read times and connections: slow clients cannot crowd out others.

uvicorn bounds none of this itself: its ``timeout_keep_alive`` covers only the idle time
between requests and is cancelled by every byte that arrives, so a client that sends a
request head (or body) one byte at a time holds its connection, and a file descriptor, for
ever (uvicorn issue #157: ``--timeout-request-start`` was never merged). ASGI middleware
runs only once the head is complete, too late. So ``GuardedProtocol`` wraps uvicorn's own
protocol class (httptools, or h11 without it) and keeps, per worker, every connection in
one of three phases, derived from uvicorn's request cycle:

    phase  what the connection is doing                 bound                         past it
    head   waiting for, or reading, a request head      header_timeout_s (10 s)       408, closed
           ... and at most MAX_HEAD_BYTES (64 KiB) of it                               431, closed
    body   reading the request body                     body_timeout_s (10 s) plus    408, closed
                                                        1 s per min_body_rate (64 KiB)
                                                        received
    busy   the request is being answered                the client must read what it  closed
                                                        is sent: send_timeout_s (30 s)
                                                        of a full send buffer at most

Idle keep-alive connections are closed by uvicorn after ``timeout_keep_alive`` (5 s).
A worker holds at most ``max_connections`` connections (1024 by default, and never more
than its open-file limit allows, which ``serve`` raises to the hard limit): a new
connection past that evicts the connection that has been longest in the head or body
phase (a slow client, or an idle keep-alive one), so a legitimate request, which arrives
whole, always gets in. Only when every connection is busy answering is the new one
refused with 503. A sweep every half second applies the time bounds.
"""

from __future__ import annotations

import asyncio
import json
import resource
from dataclasses import dataclass
from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Base
except ImportError:  # pragma: no cover (httptools is in the http extra)
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Base

MAX_CONNECTIONS = 1024
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 10.0
MIN_BODY_RATE = 64 * 1024  # bytes per second a body must keep up once past body_timeout_s
SEND_TIMEOUT_S = 30.0
MAX_HEAD_BYTES = 64 * 1024
SWEEP_S = 0.5
FD_RESERVE = 128  # descriptors kept for the broker link, logs and files


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = MAX_CONNECTIONS
    header_timeout_s: float = HEADER_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    min_body_rate: int = MIN_BODY_RATE
    send_timeout_s: float = SEND_TIMEOUT_S


def raise_open_file_limit(want: int = 1 << 20) -> int:
    """Raise this process's soft limit on open files towards its hard limit; the new soft limit.

    Each connection is a descriptor; the usual soft limit of 1024 is what a slow-client
    flood exhausts first. Worker processes inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(configured: int) -> int:
    """``configured``, lowered to what this process's open-file limit leaves room for."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(16, min(configured, soft - FD_RESERVE))


class _Worker:
    """The connections of one worker process and the sweep that times them."""

    def __init__(self) -> None:
        self.connections: set[GuardedProtocol] = set()
        self.sweeping = False
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0

    def start_sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.sweeping:
            self.sweeping = True
            loop.call_later(SWEEP_S, self.sweep, loop)

    def sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for conn in list(self.connections):
            conn.check(now)
        if self.connections:
            loop.call_later(SWEEP_S, self.sweep, loop)
        else:
            self.sweeping = False


WORKER = _Worker()


def _raw_answer(status: int, reason: str, code: str, message: str) -> bytes:
    body = json.dumps({"error": message, "code": code}).encode("utf-8")
    retry = b"retry-after: 1\r\n" if status == 503 else b""
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n".encode()
        + retry
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )


class GuardedProtocol(_Base):  # type: ignore[misc, valid-type]
    """uvicorn's HTTP protocol with the phases, bounds and eviction of the module docstring."""

    def __init__(self, config: Any, *args: Any, **kw: Any) -> None:
        super().__init__(config, *args, **kw)
        limits: ConnectionLimits = getattr(config, "ketch_limits", None) or ConnectionLimits()
        self.limits = limits
        self.cap = connection_cap(limits.max_connections)
        self.phase: tuple[str, Any] = ("head", None)
        self.since = 0.0  # loop time the current phase began
        self.received = 0  # bytes, in all
        self.received_at_phase = 0
        self.head_bytes = 0
        self.paused_since: float | None = None

    # ------------------------------------------------------------ phases

    def _current(self) -> tuple[str, Any]:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return "head", cycle
        return ("body" if cycle.more_body else "busy"), cycle

    def _enter(self, phase: tuple[str, Any], now: float) -> None:
        self.phase = phase
        self.since = now
        self.received_at_phase = self.received
        self.head_bytes = 0
        self.paused_since = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        now = self.loop.time()
        self._enter(("head", None), now)
        if len(WORKER.connections) >= self.cap and not self._make_room():
            WORKER.refused += 1
            transport.write(
                _raw_answer(
                    503, "Service Unavailable", "OVERLOADED", "the gateway is answering all it can hold"
                )
            )
            transport.close()
            return
        WORKER.connections.add(self)
        WORKER.start_sweep(self.loop)

    def connection_lost(self, exc: Exception | None) -> None:
        WORKER.connections.discard(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():  # refused, evicted or timed out: read nothing more
            return
        self.received += len(data)
        before = self.phase
        super().data_received(data)
        if self.transport.is_closing():
            return
        now = self.loop.time()
        current = self._current()
        if current != before:
            self._enter(current, now)
            if current[0] != "head":
                return
        elif current[0] != "head":
            return
        # still reading a head: the bytes of this chunk that did not finish a request
        self.head_bytes += len(data) if current == before else 0
        if self.head_bytes > MAX_HEAD_BYTES:
            self._close(
                431, "Request Header Fields Too Large", f"the request head is over {MAX_HEAD_BYTES} bytes"
            )

    # ------------------------------------------------------------ bounds

    def check(self, now: float) -> None:
        """Apply the phase's time bound (called by the sweep)."""
        if self.transport.is_closing():
            return
        current = self._current()
        if current != self.phase:
            self._enter(current, now)
            return
        phase, elapsed, lim = current[0], now - self.since, self.limits
        if phase == "head":
            if elapsed > lim.header_timeout_s:
                WORKER.timed_out += 1
                started = self.received > self.received_at_phase
                self._close(
                    408 if started else 0,
                    "Request Timeout",
                    f"no complete request head within {lim.header_timeout_s:g} s",
                )
        elif phase == "body":
            allowed = lim.body_timeout_s + (self.received - self.received_at_phase) / lim.min_body_rate
            if elapsed > allowed:
                WORKER.timed_out += 1
                self._close(
                    408,
                    "Request Timeout",
                    f"the request body came slower than {lim.min_body_rate} bytes/s "
                    f"after the first {lim.body_timeout_s:g} s",
                )
        elif self.flow is not None and self.flow.write_paused:
            if self.paused_since is None:
                self.paused_since = now
            elif now - self.paused_since > lim.send_timeout_s:
                WORKER.timed_out += 1
                self.transport.abort()  # the client reads nothing: nothing more can reach it
        else:
            self.paused_since = None

    def _make_room(self) -> bool:
        """Close the connection longest in the head or body phase; False when all are busy."""
        victims = [c for c in WORKER.connections if c.phase[0] != "busy" and not c.transport.is_closing()]
        if not victims:
            return False
        victim = min(victims, key=lambda c: c.since)
        WORKER.evicted += 1
        started = victim.phase[0] == "body" or victim.received > victim.received_at_phase
        victim._close(
            503 if started else 0,
            "Service Unavailable",
            "the gateway is at its connection limit and this request was the slowest to arrive",
        )
        WORKER.connections.discard(victim)
        return True

    def _close(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` (0: nothing) unless a response has begun, and close."""
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete and cycle.response_started
        if status and not answering:
            code = {408: "TIMEOUT", 431: "TOO_LARGE", 503: "OVERLOADED"}.get(status, "ERROR")
            self.transport.write(_raw_answer(status, reason, code, message))
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            cycle.disconnected = True  # the app's receive() says so at once; its answer goes nowhere
            cycle.message_event.set()
        self.transport.close()
