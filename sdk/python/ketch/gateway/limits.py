"""What one HTTP client may cost a gateway worker, and the bounded JSON reader.

Every limit here has a default in ``GatewayConfig`` (most have a ``ketch gateway`` option)
and a row in docs/reliability.md. Pure functions and small counters, no I/O.

    limit                          default       a client past it gets
    request body (after gzip)      64 MiB        413 TOO_LARGE
    JSON text (a body, a V2 head)  16 MiB        413 TOO_LARGE
    JSON nesting                   64 levels     400 BAD_INPUT
    JSON text encoding             UTF-8         400 BAD_INPUT
    a number literal past float64  (1e999)       400 BAD_INPUT (NaN, Infinity are taken as written)
    request bodies held at once    512 MiB       503 OVERLOADED, Retry-After: 1 (see ``BodyBudget``)
    requests in progress           1024          503 OVERLOADED, Retry-After: 1
    one client's requests in progress  256       429 OVERLOADED, Retry-After: 1 (``ClientShares``)
    one client's queries in progress   2500      429 OVERLOADED, Retry-After: 1 (413 TOO_LARGE
                                                 for one request of more)

Connections and read times are bounded in ``protocol.py``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import re
from collections import Counter
from typing import Any

import numpy as np

from ketch.gateway.errors import HTTPError, bad_request

MAX_JSON_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64
BODY_BUDGET_BYTES = 512 * 1024 * 1024
MAX_INFLIGHT = 1024
# one HTTP client (its bearer token when tokens are on, else its address) in one worker: a
# worker is one client of the broker (10,000 queries outstanding by default), so one HTTP
# client may hold at most a quarter of that, and a quarter of the worker's requests
MAX_CLIENT_REQUESTS = 256
MAX_CLIENT_QUERIES = 2500
# parsed JSON takes several times its text in memory (a float: 8 bytes of text, a 24-byte
# object and an 8-byte pointer, then 8 more in the array it becomes): a JSON body counts
# this many times its size against the budget
JSON_WEIGHT = 6
# bodies up to this size are never refused for the budget (they still count towards it):
# a flood of large bodies cannot starve small requests
SMALL_BODY = 64 * 1024
# the heap is handed back to the system after this many bytes of bodies were taken and
# (most of them) given back
TRIM_AFTER_BYTES = 64 * 1024 * 1024

# a number literal that may be past float64's range (1e999 reads as infinity, silently): an
# exponent of three digits or more, or 309 digits in a row; only then are floats read one
# by one, by ``_finite``
_MAYBE_HUGE = re.compile(rb"[eE]\+?0*[1-9][0-9]{2}|[0-9]{309}")
# a JSON string: quotes around anything but quotes and backslashes, or escapes
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_CHUNK = 1 << 22


def json_depth(text: bytes) -> int:
    """The deepest nesting of arrays and objects in valid JSON ``text`` (strings skipped).

    Linear in the text: strings are cut out by one regular expression (linear on valid
    JSON, where every string ends), the brackets left are summed in chunks by numpy.
    """
    if b"[" not in text and b"{" not in text:
        return 0
    bare = _STRING.sub(b"", text) if b'"' in text else text
    chars = np.frombuffer(bare, dtype=np.uint8)
    depth = deepest = 0
    for start in range(0, len(chars), _CHUNK):
        c = chars[start : start + _CHUNK]
        step = (c == ord("[")).astype(np.int32)
        step += c == ord("{")
        step -= c == ord("]")
        step -= c == ord("}")
        run = np.cumsum(step, dtype=np.int64)
        deepest = max(deepest, depth + int(run.max()))
        depth += int(run[-1])
    return deepest


class _PastFloat64(ValueError):
    pass


def _finite(literal: str) -> float:
    value = float(literal)
    if math.isinf(value):
        raise _PastFloat64(f"the number {literal[:40]} is beyond float64's range")
    return value


def parse_json(text: bytes, *, max_bytes: int, max_depth: int, what: str = "the body") -> Any:
    """``text`` as a JSON value, or a 4xx saying which limit it is past (never a 5xx)."""
    if len(text) > max_bytes:
        raise HTTPError(
            413,
            f"{what} is {len(text)} bytes of JSON, over the gateway's limit of {max_bytes}; "
            "send large tensors as binary data (the V2 binary tensor extension)",
        )
    try:
        doc = json.loads(text.decode("utf-8"), parse_float=_finite if _MAYBE_HUGE.search(text) else None)
    except UnicodeDecodeError as exc:
        raise bad_request(f"{what} is not UTF-8 text: {exc}") from None
    except RecursionError:
        raise bad_request(f"{what} nests arrays or objects deeper than {max_depth} levels") from None
    except _PastFloat64 as exc:
        raise bad_request(f"{what}: {exc}") from None
    except ValueError as exc:  # JSONDecodeError, and integers of more digits than Python reads
        raise bad_request(f"{what} is not JSON: {exc}") from None
    if text.count(b"[") + text.count(b"{") > max_depth and json_depth(text) > max_depth:
        raise bad_request(f"{what} nests arrays or objects deeper than {max_depth} levels")
    return doc


class BodyBudget:
    """Bytes of request bodies (and what parsing them makes) one worker holds at once.

    ``take`` counts bytes for a request and refuses (503) once the worker holds more than
    ``limit``, unless the request itself holds at most ``SMALL_BODY``; ``give_back``
    returns what a request held when it is answered.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self.since_trim = 0  # bytes taken since the heap was last handed back (``release_memory``)

    def take(self, holder: Any, n: int) -> None:
        holder.held_bytes += n
        self.held += n
        self.since_trim += n
        self.peak = max(self.peak, self.held)
        if self.held > self.limit and holder.held_bytes > SMALL_BODY:
            raise HTTPError(
                503,
                f"the gateway holds {self.held >> 20} MiB of request bodies, over its "
                f"{self.limit >> 20} MiB; retry shortly",
                code="OVERLOADED",
                retry_after_ms=1000,
            )

    def give_back(self, holder: Any) -> None:
        self.held -= holder.held_bytes
        holder.held_bytes = 0
        # after a burst of large bodies, once most of it is answered: the heap pages they
        # used go back to the system (RSS returns near its baseline)
        if self.since_trim >= TRIM_AFTER_BYTES and self.held * 8 <= self.since_trim:
            self.since_trim = self.held
            release_memory()


def release_memory() -> None:
    """Hand the free pages of the C heap back to the system (glibc's ``malloc_trim``).

    glibc keeps freed memory for reuse; after a burst of large requests that is hundreds of
    MiB the process holds for nothing. Elsewhere (musl, macOS) this does nothing.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


class ClientShares:
    """Requests and queries one HTTP client has in progress in a worker, bounded each.

    ``enter`` counts a request of ``client`` (429 past ``max_requests``), ``count`` sets how
    many queries it sends to the broker (429 if the client's total would pass
    ``max_queries``; a request of more queries than that alone is 413, as it would never
    fit), ``leave`` gives both back when the request is answered.
    """

    def __init__(self, max_requests: int, max_queries: int) -> None:
        self.max_requests, self.max_queries = max_requests, max_queries
        self.requests: Counter[str] = Counter()
        self.queries: Counter[str] = Counter()

    def enter(self, client: str) -> None:
        if self.requests[client] >= self.max_requests:
            raise self._refuse(f"this client has {self.requests[client]} requests in progress")
        self.requests[client] += 1

    def count(self, client: str, held: int, n: int) -> None:
        """``n`` queries for a request that counted ``held`` so far."""
        if n > self.max_queries:
            raise HTTPError(
                413,
                f"the request holds {n} queries, more than one client may have in progress "
                f"({self.max_queries}); send them in smaller requests",
                code="TOO_LARGE",
            )
        total = self.queries[client] - held + n
        if n > held and total > self.max_queries:
            raise self._refuse(f"this client would have {total} queries in progress")
        self.queries[client] = total

    def leave(self, client: str, held: int) -> None:
        for counter, n in ((self.requests, 1), (self.queries, held)):
            left = counter[client] - n
            if left > 0:
                counter[client] = left
            else:
                counter.pop(client, None)

    def _refuse(self, what: str) -> HTTPError:
        return HTTPError(
            429,
            f"{what}, over the gateway worker's share per client ({self.max_requests} requests, "
            f"{self.max_queries} queries); retry when earlier ones are answered",
            code="OVERLOADED",
            retry_after_ms=1000,
        )
