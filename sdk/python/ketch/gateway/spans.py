"""The gateway's server span of each query route (``ketch.tracing``; docs/tracing.md).

Only the routes that send queries are traced (``ROUTES``: V2 infer and Clipper predict).
Each request gets an HTTP server span, child of its ``traceparent`` header when that is
valid W3C (else the root of a new trace), and its queries carry the span's context to the
broker (``Call.trace``). Made only when the gateway traces: otherwise the routes are the
plain handlers and nothing here runs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from ketch.gateway.access import TRACE_KEY
from ketch.tracing import Tracer

SCOPE_KEY = TRACE_KEY  # where the route (and the access log) finds the (traceparent, tracestate) it sends
ROUTES = {"infer": "/v2/models/{name}/infer", "predict": "/{app}/predict"}  # route -> http.route

Handle = Callable[[Request], Awaitable[Response]]


def traced(tracer: Tracer, route: str, handle: Handle) -> Handle:
    """``handle`` inside a server span (OpenTelemetry's HTTP semantic conventions)."""
    template = ROUTES[route]

    async def handle_traced(request: Request) -> Response:
        headers = request.headers
        attributes = {
            "http.request.method": request.method,
            "http.route": template,
            "url.path": request.url.path,
            "url.scheme": request.url.scheme,
        }
        name = f"{request.method} {template}"
        with tracer.server_span(name, headers.get("traceparent"), headers.get("tracestate"), attributes) as (
            span,
            carrier,
        ):
            request.scope[SCOPE_KEY] = carrier
            response = await handle(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                tracer.fail(span, f"HTTP {response.status_code}")
            return response

    return handle_traced
