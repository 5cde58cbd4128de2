"""The access log: one structlog line per HTTP request, and its request id.

ASGI middleware, outermost, so every request is logged, also one refused before any route
(401 without a token, 404 for no route, a CORS preflight):

    {"event": "http request", "method": "POST", "route": "/v2/models/{name}/infer",
     "path": "/v2/models/iris/infer", "app": "iris", "status": 200, "latency_ms": 1.92,
     "request_id": "5f0c...", "client": "127.0.0.1", "level": "info", "timestamp": "..."}

``route`` is the template that matched (``null`` when none did), so lines group by route
without a label per path; ``app`` is set only for an app that exists (as in the metrics).
The request id is the client's ``X-Request-Id`` when it sends a usable one (1 to 128
printable ASCII characters), else a new random one; either way it is echoed in the
response's ``X-Request-Id`` and kept in the request's scope (``ID_KEY``) for the other
lines the gateway logs about the request (not in ``structlog.contextvars``: a task that a
request starts, such as a connection's reader, would carry that request's id for good).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import structlog

REQUEST_ID = b"x-request-id"
APP_KEY = "ketch.app"  # the scope key a route sets to the app it served (app.py)
TRACE_KEY = "ketch.trace"  # where a traced route keeps its (traceparent, tracestate) (spans.py)
ID_KEY = "ketch.request_id"  # the scope key of the request id, for the gateway's other lines
MAX_ID = 128


def _trace_id(carrier: tuple[str, str] | None) -> str | None:
    """The W3C trace id of a traced request (its span's traceparent), None when untraced."""
    return carrier[0][3:35] if carrier else None


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` if it is usable in a log line and a header, else a new one."""
    for name, value in headers:
        if name == REQUEST_ID:
            if 0 < len(value) <= MAX_ID and all(0x21 <= c <= 0x7E for c in value):
                return value.decode("ascii")
            break
    return os.urandom(16).hex()  # as random as uuid4().hex, a quarter of its cost


class AccessLog:
    """ASGI middleware: the request id header, and one ``http request`` line per request."""

    def __init__(self, app: Any, templates: Callable[[Any], str | None], *, enabled: bool = True) -> None:
        self.app = app
        self.templates = templates  # scope["endpoint"] -> the route template that matched
        self.enabled = enabled
        self.log = structlog.get_logger("ketch.gateway.access")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id_of(scope["headers"])
        header = (REQUEST_ID, rid.encode("ascii"))
        status = 0

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        scope[ID_KEY] = rid
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.enabled:
                client = scope.get("client")
                self.log.info(
                    "http request",
                    method=scope["method"],
                    route=self.templates(scope.get("endpoint")),
                    path=scope["path"],
                    app=scope.get(APP_KEY) or None,
                    status=status or 500,  # no answer started: the server answers 500 or drops it
                    latency_ms=round((time.perf_counter() - started) * 1000, 3),
                    request_id=rid,
                    client=client[0] if client else None,
                    trace_id=_trace_id(scope.get(TRACE_KEY)),
                )
