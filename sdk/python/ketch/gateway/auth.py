"""Optional bearer-token authentication, as ASGI middleware in front of every route.

With tokens configured, a request must carry ``Authorization: Bearer <token>`` with one of
them, except the health routes (``/v2/health/live`` and ``/v2/health/ready``), which a load
balancer or Kubernetes probes without credentials. Tokens are compared in constant time.
Tokens come from ``--token-file`` (one a line) or ``KETCH_GATEWAY_TOKENS`` (comma-separated),
never from the command line, where ``ps`` would show them.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from ketch.gateway.values import dumps

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
TOKENS_ENV = "KETCH_GATEWAY_TOKENS"


def load_tokens(token_file: str | None = None, env: str | None = None) -> list[str]:
    """Tokens from a file (one a line, ``#`` comments) and/or a comma-separated string."""
    tokens: list[str] = []
    if token_file:
        for line in Path(token_file).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                tokens.append(line)
    text = os.environ.get(TOKENS_ENV, "") if env is None else env
    tokens += [t.strip() for t in text.split(",") if t.strip()]
    return tokens


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer ...`` header value, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return token.strip()


def token_ok(token: bytes | None, tokens: Iterable[bytes]) -> bool:
    if token is None:
        return False
    ok = False
    for t in tokens:  # no early exit: the time taken does not depend on which token matched
        ok |= hmac.compare_digest(token, t)
    return ok


class BearerAuth:
    """ASGI middleware: 401 unless the request has a valid bearer token (health routes open)."""

    def __init__(self, app, tokens: Iterable[str]) -> None:
        self.app = app
        self.tokens = [t.encode("utf-8") for t in tokens]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.tokens or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if token_ok(bearer_token(header), self.tokens):
            await self.app(scope, receive, send)
            return
        message = "a bearer token is required" if header is None else "the bearer token is not valid"
        body = dumps({"error": message, "code": "UNAUTHENTICATED"})
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="ketch"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
