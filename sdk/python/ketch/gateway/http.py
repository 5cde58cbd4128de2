"""What every route shares: the per-request ``Call``, body reading and JSON answers."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ketch.gateway import limits
from ketch.gateway.auth import bearer_token, token_ok
from ketch.gateway.errors import HTTPError, bad_request
from ketch.gateway.values import dumps

if TYPE_CHECKING:
    from ketch.gateway.app import Gateway


@dataclass
class Call:
    """One request (HTTP, or gRPC with no ``request``) on its way through a route; ``app``
    and ``queries`` label its metrics."""

    request: Request | None  # None for a gRPC call (grpc_server.py)
    gw: Gateway
    app: str = ""  # set once the app is known to exist (unknown names never become labels)
    queries: int = 0  # sent to the broker, counted in the client's share (limits.ClientShares)
    held_bytes: int = 0  # of the worker's body budget (limits.BodyBudget), given back at the answer
    client: str = ""  # who the request counts against: its bearer token, else its address
    trace: tuple[str, str] | None = None  # (traceparent, tracestate) its queries carry (ketch.tracing)

    def authenticated(self) -> bool:
        """Whether the caller may see names: tokens are off, or it sent a valid one (open
        routes, such as the health checks, are reached without one)."""
        tokens = [*self.gw.config.tokens, *self.gw.config.admin_tokens]
        if not tokens:
            return True
        header = self.request.headers.get("authorization", "").encode("latin-1")
        return token_ok(bearer_token(header), [t.encode("utf-8") for t in tokens])

    def send_queries(self, n: int) -> None:
        """Count ``n`` queries of this request against its client's share (429 past it)."""
        self.gw.shares.count(self.client, self.queries, n)
        self.queries = n


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(doc), status_code=status, headers=headers, media_type="application/json")


def error_response(err: HTTPError) -> Response:
    return json_response(err.body(), err.status, err.headers)


async def read_body(call: Call) -> bytes:
    """The request body, at most ``max_body_bytes`` (413 past it), gzip/deflate undone.

    Its bytes count against the worker's body budget while the request is answered.
    """
    limit = call.gw.config.max_body_bytes
    budget = call.gw.body_budget
    request = call.request
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPError(413, f"the body is {declared} bytes, over the gateway's limit of {limit}")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"the body is over the gateway's limit of {limit} bytes")
            budget.take(call, len(chunk))
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request("the client went away before sending the whole body") from None
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPError(415, f"Content-Encoding {encoding!r}: the gateway takes gzip, deflate or identity")
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise bad_request(f"the body is not valid {encoding} data: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HTTPError(413, f"the decompressed body is over the gateway's limit of {limit} bytes")
    if not inflater.eof:
        raise bad_request(f"the {encoding} body is cut short")
    budget.take(call, len(out))
    return out


def parse_json(call: Call, text: bytes, what: str = "the body") -> Any:
    """JSON text of a request, within the gateway's size and depth limits (``limits.py``)."""
    config = call.gw.config
    call.gw.body_budget.take(call, len(text) * limits.JSON_WEIGHT)
    return limits.parse_json(
        text, max_bytes=config.max_json_bytes, max_depth=config.max_json_depth, what=what
    )
