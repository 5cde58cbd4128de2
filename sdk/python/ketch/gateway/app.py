"""The ASGI application: routes, the per-worker broker link, errors and metrics in one place.

``create_app(config)`` builds a Starlette app; ``app_from_env()`` is the factory uvicorn's
worker processes call (the config travels in ``KETCH_GATEWAY_CONFIG``). Every route runs
through ``Gateway.endpoint``, which turns any exception into its HTTP answer with the one
table in ``errors.py`` and records the request's metrics.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from ketch import errors, logs, tracing
from ketch.admin import DEFAULT_ADMIN
from ketch.client import DEFAULT_FRONTEND
from ketch.gateway import clipper, docs, limits, management, page, protocol, spans, v2
from ketch.gateway.access import APP_KEY, ID_KEY, AccessLog
from ketch.gateway.auth import BearerAuth, bearer_token
from ketch.gateway.backend import AppInfo, BrokerLink
from ketch.gateway.errors import HTTPError, http_error_for
from ketch.gateway.http import Call, error_response, json_response
from ketch.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from ketch.gateway.openapi import build_spec

CONFIG_ENV = "KETCH_GATEWAY_CONFIG"


@dataclass
class GatewayConfig:
    frontend: str = DEFAULT_FRONTEND
    admin: str = DEFAULT_ADMIN
    tokens: list[str] = field(default_factory=list)
    admin_tokens: list[str] = field(default_factory=list)  # may use /admin/ (auth.py)
    grpc: str = ""  # HOST:PORT each worker serves gRPC on (reserved by server.py); "" for none
    metadata_ttl_s: float = 1.0  # app metadata and readiness are cached this long
    admin_timeout_ms: float = 1000
    # what one client may cost a worker (limits.py and protocol.py; docs/reliability.md)
    max_body_bytes: int = 64 * 1024 * 1024
    max_json_bytes: int = limits.MAX_JSON_BYTES
    max_json_depth: int = limits.MAX_JSON_DEPTH
    body_budget_bytes: int = limits.BODY_BUDGET_BYTES
    max_inflight: int = limits.MAX_INFLIGHT
    max_client_requests: int = limits.MAX_CLIENT_REQUESTS
    max_client_queries: int = limits.MAX_CLIENT_QUERIES
    max_connections: int = protocol.MAX_CONNECTIONS
    header_timeout_s: float = protocol.HEADER_TIMEOUT_S
    body_timeout_s: float = protocol.BODY_TIMEOUT_S
    min_body_rate: int = protocol.MIN_BODY_RATE
    send_timeout_s: float = protocol.SEND_TIMEOUT_S
    model_control: bool = False  # repository load/unload allowed (Triton's explicit model control)
    access_log: bool = True  # one structlog line per request (access.py)
    cors_origins: list[str] = field(default_factory=list)  # none: no CORS headers at all
    strict_readiness: bool = True  # /v2/health/ready also needs a live replica of every linked model

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> GatewayConfig:
        text = os.environ.get(CONFIG_ENV)
        return cls(**json.loads(text)) if text else cls()


Handler = Callable[[Call], Awaitable[Response]]


class Gateway:
    """What one worker holds: its config, its link to the broker and its metrics."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.link: BrokerLink | None = None
        # app -> (its metadata then, datatype, shape) of the last V2 answer
        self.outputs_seen: dict[str, tuple[AppInfo, str, list[int]]] = {}
        self.body_budget = limits.BodyBudget(config.body_budget_bytes)
        self.inflight = 0
        self.shares = limits.ClientShares(config.max_client_requests, config.max_client_queries)
        self.spec = build_spec(auth=bool(config.tokens or config.admin_tokens))
        self.log = structlog.get_logger("ketch.gateway")
        self.tracer = tracing.tracer("gateway")  # None: no spans (ketch.tracing)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        logs.quiet_gc()
        self.link = BrokerLink(
            self.config.frontend,
            self.config.admin,
            ttl_s=self.config.metadata_ttl_s,
            admin_timeout_ms=self.config.admin_timeout_ms,
        )
        grpc_server = None
        if self.config.grpc:
            from ketch.gateway import grpc_server as oip_grpc

            grpc_server = await oip_grpc.start(self, self.config.grpc)
        try:
            yield
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=5)
            await self.link.close()

    def endpoint(self, route: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            call = Call(request, self, client=self.client_of(request))
            call.trace = request.scope.get(spans.SCOPE_KEY)  # set when traced (spans.traced)
            started = time.perf_counter()
            try:
                with self.admitted(call):
                    response = await handler(call)
            except Exception as exc:
                err = http_error_for(exc)
                if not isinstance(exc, errors.KetchError | HTTPError):
                    rid = request.scope.get(ID_KEY)
                    self.log.exception("gateway_bug", route=route, path=request.url.path, request_id=rid)
                response = error_response(err)
            self.metrics.observe(
                route, call.app, response.status_code, time.perf_counter() - started, call.queries
            )
            request.scope[APP_KEY] = call.app
            return response

        if self.tracer is not None and route in spans.ROUTES:
            return spans.traced(self.tracer, route, handle)
        return handle

    @contextlib.contextmanager
    def admitted(self, call: Call) -> Iterator[None]:
        """One request (HTTP or gRPC) in the worker: its in-flight cap and its client's share
        while it runs; its body budget given back when it ends."""
        self.inflight += 1
        entered = False
        try:
            if self.inflight > self.config.max_inflight:
                raise HTTPError(
                    503,
                    f"the gateway worker has {self.config.max_inflight} requests in progress; retry shortly",
                    code="OVERLOADED",
                    retry_after_ms=1000,
                )
            self.shares.enter(call.client)
            entered = True
            yield
        finally:
            self.inflight -= 1
            self.body_budget.give_back(call)
            if entered:
                self.shares.leave(call.client, call.queries)

    def client_of(self, request: Request) -> str:
        """Whose share a request counts against (``client_key``)."""
        header = request.headers.get("authorization", "").encode("latin-1")
        return self.client_key(header, request.client.host if request.client else "")

    def client_key(self, authorization: bytes, host: str) -> str:
        """Its bearer token when tokens are on (it was checked), else its address (behind a
        proxy, every client is the proxy's address)."""
        if self.config.tokens:
            token = bearer_token(authorization)
            if token is not None:
                return "token:" + hashlib.sha256(token).hexdigest()[:16]
        return "addr:" + host

    async def metrics_route(self, call: Call) -> Response:
        try:
            figures = await self.link.figures()
        except errors.KetchError:
            figures = None  # ketch_broker_up 0 says so; the gateway's own figures still count
        return Response(self.metrics.render(figures), media_type=CONTENT_TYPE)

    async def openapi_route(self, call: Call) -> Response:
        return json_response(self.spec)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = {
        404: f"no route {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }
    err = HTTPError(exc.status_code, message.get(exc.status_code, str(exc.detail)), headers=exc.headers)
    return error_response(err)


def _version_and_repository_routes(e: Callable[[str, Handler], Any]) -> list[Route]:
    """``/v2/models/{name}/versions/{version}`` and Triton's repository API (``repository.py``)."""
    one = "/v2/models/{name}/versions/{version}"
    repo = "/v2/repository"
    return [
        Route(one, e("model_metadata", v2.model_metadata), methods=["GET"]),
        Route(one + "/ready", e("model_ready", v2.model_ready), methods=["GET"]),
        Route(one + "/infer", e("infer", v2.infer), methods=["POST"]),
        Route(repo + "/index", e("repository_index", v2.repository_index), methods=["POST"]),
        Route(repo + "/models/{name}/load", e("repository_load", v2.repository_load), methods=["POST"]),
        Route(repo + "/models/{name}/unload", e("repository_unload", v2.repository_unload), methods=["POST"]),
    ]


def create_app(config: GatewayConfig | None = None) -> Any:
    """The gateway as an ASGI app (wrapped in bearer auth when ``config.tokens`` is set)."""
    config = config or GatewayConfig()
    gw = Gateway(config)
    e = gw.endpoint
    routes: list[BaseRoute] = [
        Route("/v2", e("server_metadata", v2.server_metadata), methods=["GET"]),
        Route("/v2/health/live", e("live", v2.live), methods=["GET"]),
        Route("/v2/health/ready", e("ready", v2.ready), methods=["GET"]),
        Route("/v2/models/{name}", e("model_metadata", v2.model_metadata), methods=["GET"]),
        Route("/v2/models/{name}/ready", e("model_ready", v2.model_ready), methods=["GET"]),
        Route("/v2/models/{name}/infer", e("infer", v2.infer), methods=["POST"]),
        *_version_and_repository_routes(e),
        Route("/metrics", e("metrics", gw.metrics_route), methods=["GET"]),
        Route("/openapi.json", e("openapi", gw.openapi_route), methods=["GET"]),
        *page.routes(gw),  # GET /: the status page (ketch/gateway/page.py)
        # Clipper's management API, admin tokens only (ketch/gateway/management.py)
        Route("/admin/ping", e("clipper_admin", management.ping), methods=["GET"]),
        *(
            Route(f"/admin/{op}", e("clipper_admin", handler), methods=["POST"])
            for op, handler in management.ROUTES.items()
        ),
        *docs.routes(gw),  # GET /docs: Swagger UI on /openapi.json (ketch/gateway/docs.py)
        Route("/{app}/predict", e("predict", clipper.predict), methods=["POST"]),
        Route("/{app}/update", e("update", clipper.update), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: _http_exception})
    app.state.gateway = gw
    outer: Any = app
    if config.tokens or config.admin_tokens:
        outer = BearerAuth(app, config.tokens, config.admin_tokens)
    if config.cors_origins:  # outside the token check: a preflight carries no token
        outer = CORSMiddleware(
            outer,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Inference-Header-Content-Length", "Retry-After", "X-Request-Id"],
            max_age=600,
        )
    return AccessLog(outer, _templates(routes), enabled=config.access_log)


def _templates(routes: list[BaseRoute]) -> Callable[[Any], str | None]:
    """What the access log names a request by: the template of the route that took it."""
    names: dict[Any, str] = {}
    for r in routes:
        if isinstance(r, Route):
            names[r.endpoint] = r.path
        elif isinstance(r, Mount) and r.app is not None:
            names[r.app] = r.path + "/{path}"
    return lambda endpoint: names.get(endpoint)


def app_from_env() -> Any:
    """Factory for uvicorn workers: the config comes from ``KETCH_GATEWAY_CONFIG``; tracing
    from the OpenTelemetry variables (``ketch.tracing.setup``)."""
    logs.configure()  # uvicorn's own loggers are set up by its log_config (server.py)
    tracing.setup("ketch-gateway")
    return create_app(GatewayConfig.from_env())
