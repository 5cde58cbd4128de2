"""Optional bearer-token authentication, as ASGI middleware in front of every route.

With tokens configured, a request must carry ``Authorization: Bearer <token>`` with one of
them, except the health routes (``/v2/health/live`` and ``/v2/health/ready``), which a load
balancer or Kubernetes probes without credentials. Tokens are compared in constant time.
Tokens come from ``--token-file`` (one a line) or ``KETCH_GATEWAY_TOKENS`` (comma-separated),
never from the command line, where ``ps`` would show them.

An **admin token** is a token with the admin role: a line ``admin <token>`` in the token file,
or one of ``KETCH_GATEWAY_ADMIN_TOKENS`` (comma-separated). It is a token like any other, and
the only one let into ``/admin/...`` (Clipper's management API, which changes apps and
models) and the repository's load and unload (which drain replicas): another valid token gets
403 there. With no token at all configured the gateway is
open, ``/admin/`` too, as the broker's admin socket is to its own machine.

The token goes in ``Authorization: Bearer <token>``, or as the password of HTTP Basic
(``Authorization: Basic base64(user:token)``, any user name): what ``requests`` sends for a URL
``http://admin:<token>@host:port``, so a client that only takes an address, as
``clipper_admin`` does, can carry one.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from collections.abc import Iterable
from pathlib import Path

from ketch.gateway.values import dumps

OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
ADMIN_PREFIX = "/admin/"  # Clipper's management API: admin tokens only
REPOSITORY_CONTROL = ("/v2/repository/models/", ("/load", "/unload"))  # admin tokens only too


def admin_only(path: str) -> bool:
    """Whether ``path`` changes what serves (Clipper's management API, repository load and
    unload): admin tokens only."""
    prefix, ends = REPOSITORY_CONTROL
    return path.startswith(ADMIN_PREFIX) or (path.startswith(prefix) and path.endswith(ends))


TOKENS_ENV = "KETCH_GATEWAY_TOKENS"
ADMIN_TOKENS_ENV = "KETCH_GATEWAY_ADMIN_TOKENS"
ADMIN_ROLE = "admin"


def _token_lines(token_file: str | None) -> list[tuple[str, str]]:
    """(role, token) of each line of a token file: ``<token>`` or ``admin <token>``."""
    lines: list[tuple[str, str]] = []
    if token_file:
        for line in Path(token_file).read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            role, _, token = line.partition(" ")
            if token.strip() and role == ADMIN_ROLE:
                lines.append((ADMIN_ROLE, token.strip()))
            elif token.strip():
                raise ValueError(f"{token_file}: a line is a token or 'admin <token>'; a token has no spaces")
            else:
                lines.append(("", line))
    return lines


def _env_tokens(name: str, env: str | None) -> list[str]:
    text = os.environ.get(name, "") if env is None else env
    return [t.strip() for t in text.split(",") if t.strip()]


def load_tokens(
    token_file: str | None = None, env: str | None = None, admin_env: str | None = None
) -> list[str]:
    """Every token, admin ones too, from a file (one a line, ``#`` comments) and/or the
    comma-separated ``$KETCH_GATEWAY_TOKENS`` and ``$KETCH_GATEWAY_ADMIN_TOKENS`` (or ``env``
    and ``admin_env``)."""
    tokens = [t for _, t in _token_lines(token_file)]
    return tokens + _env_tokens(TOKENS_ENV, env) + _env_tokens(ADMIN_TOKENS_ENV, admin_env)


def load_admin_tokens(token_file: str | None = None, admin_env: str | None = None) -> list[str]:
    """The tokens with the admin role: ``admin <token>`` lines and ``$KETCH_GATEWAY_ADMIN_TOKENS``."""
    tokens = [t for role, t in _token_lines(token_file) if role == ADMIN_ROLE]
    return tokens + _env_tokens(ADMIN_TOKENS_ENV, admin_env)


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer ...`` header value (or the password of
    ``Basic ...``), or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if not token:
        return None
    if scheme.lower() == b"basic":
        try:
            _, colon, password = base64.b64decode(token, validate=True).partition(b":")
        except (binascii.Error, ValueError):
            return None
        return password if colon and password else None
    if scheme.lower() != b"bearer":
        return None
    return token


def token_ok(token: bytes | None, tokens: Iterable[bytes]) -> bool:
    if token is None:
        return False
    ok = False
    for t in tokens:  # no early exit: the time taken does not depend on which token matched
        ok |= hmac.compare_digest(token, t)
    return ok


class BearerAuth:
    """ASGI middleware: 401 unless the request has a valid bearer token (health routes open);
    403 on ``/admin/`` for a valid token that is not an admin token."""

    def __init__(self, app, tokens: Iterable[str], admin_tokens: Iterable[str] = ()) -> None:
        self.app = app
        self.admin_tokens = [t.encode("utf-8") for t in admin_tokens]
        self.tokens = [t.encode("utf-8") for t in tokens] + self.admin_tokens

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.tokens or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        token = bearer_token(header)
        if token_ok(token, self.tokens):
            if not admin_only(scope["path"]) or token_ok(token, self.admin_tokens):
                await self.app(scope, receive, send)
                return
            message = (
                "this route needs an admin token"
                if self.admin_tokens
                else "this route needs an admin token, and none is configured "
                "('admin <token>' in the token file)"
            )
            await _refuse(send, 403, message, "UNAUTHORIZED")
            return
        message = "a bearer token is required" if header is None else "the bearer token is not valid"
        await _refuse(send, 401, message, "UNAUTHENTICATED")


async def _refuse(send, status: int, message: str, code: str) -> None:
    body = dumps({"error": message, "code": code})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="ketch"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
