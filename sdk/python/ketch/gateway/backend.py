"""The gateway's side of the broker: one ``AsyncClient`` and one async admin link per worker.

Each worker process (one event loop) owns a ``BrokerLink``. Queries go to the frontend
through ``ketch.AsyncClient``; metadata, readiness and figures come from the admin socket
through ``AsyncAdmin``. Admin answers are cached for ``ttl_s`` (1 s by default) and shared by
concurrent requests (one call in flight per key), so ``/infer`` does not ask the admin
socket on every request and a burst of probes costs the broker one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq
import zmq.asyncio

from ketch import errors
from ketch.client import AsyncClient, Prediction
from ketch.curve import PeerKeys
from ketch.gateway.errors import HTTPError
from ketch.protocol.multipart import CONNECT_TIMEOUT_MS

T = TypeVar("T")

GRACE_S = 1.0  # wait this long past a query's deadline before calling the broker silent
LIVE_STATES = frozenset({"ready", "busy"})
# an app's metadata this recent is used when the admin socket does not answer in time (a
# busy machine, or a worker that was parsing a large body): the query itself still goes to
# the broker, which checks everything again
STALE_APP_S = 60.0
# metadata is asked for again, at most this often per app and worker, when a request does
# not fit what the gateway holds (the app may have been deleted and created again since)
RECHECK_APP_S = 0.25


@dataclass(frozen=True)
class AppInfo:
    """What the gateway needs to know of an app (from ``app.show``)."""

    name: str
    input_type: str
    input_shape: tuple[int, ...]
    slo_ms: float
    has_default: bool
    models: tuple[str, ...]
    policy: str = "single"  # how the app uses its models (app.set_policy)

    @classmethod
    def from_doc(cls, doc: dict[str, Any]) -> AppInfo:
        return cls(
            name=doc["name"],
            input_type=doc["input_type"],
            input_shape=tuple(int(d) for d in doc.get("input_shape") or ()),
            slo_ms=float(doc.get("slo_ms") or 0),
            has_default=bool(doc.get("has_default")),
            models=tuple(doc.get("models") or ()),
            policy=str(doc.get("policy") or "single"),
        )


class AsyncAdmin:
    """JSON admin calls on a zmq.asyncio DEALER; replies are matched to calls by id."""

    def __init__(self, address: str, *, timeout_ms: float = 1000, context: zmq.asyncio.Context) -> None:
        self.address = address
        self.timeout_s = timeout_ms / 1000
        self._sock = context.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a broker that is not there
        self._sock.connect_timeout = CONNECT_TIMEOUT_MS
        keys = PeerKeys.load()  # CurveZMQ, when $KETCH_CURVE_SERVER_KEY and $KETCH_CURVE_SECRET say so
        if keys is not None:
            keys.apply(self._sock)
        self._sock.connect(address)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.Task | None = None

    async def call(self, op: str, **args: Any) -> Any:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())
        req_id = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = fut
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._sock.send(json.dumps({"id": req_id, "op": op, "args": args}).encode("utf-8"))
                reply = await fut
        except TimeoutError:
            raise errors.Unavailable(f"no answer from the broker's admin socket at {self.address}") from None
        finally:
            self._waiting.pop(req_id, None)
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        raise errors.raise_for(
            errors.code_of_name(err.get("code", "INTERNAL")), err.get("message", "admin op failed")
        )

    async def _read(self) -> None:
        while True:
            raw = await self._sock.recv()
            try:
                reply = json.loads(raw)
                fut = self._waiting.get(reply.get("id"))
            except (ValueError, AttributeError, TypeError):
                continue
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
            self._reader = None
        if not self._sock.closed:
            self._sock.close(linger=0)


class TTLCache:
    """Async results kept for ``ttl_s``; concurrent callers of one key share one call.

    Errors are kept as well (an unknown app stays unknown for ``ttl_s``), so a storm of
    requests for a missing app or a dead broker costs one admin call per ``ttl_s``.
    """

    def __init__(self, ttl_s: float, max_entries: int = 4096) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[Any, tuple[float, asyncio.Future]] = {}

    async def get(self, key: Any, fetch: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        hit = self._entries.get(key)
        if hit is not None and (not hit[1].done() or hit[0] > now):
            fut = hit[1]
        else:
            if len(self._entries) >= self.max_entries:
                self._prune(now)
            fut = asyncio.ensure_future(fetch())
            fut.add_done_callback(_retrieve)
            self._entries[key] = (now + self.ttl_s, fut)
        return await asyncio.shield(fut)

    def _prune(self, now: float) -> None:
        for key, (expires, fut) in list(self._entries.items()):
            if fut.done() and expires <= now:
                del self._entries[key]
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]

    def forget(self, key: Any) -> None:
        """Forget ``key``'s answer (a call in flight is kept: it is being asked anew)."""
        hit = self._entries.get(key)
        if hit is not None and hit[1].done():
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()  # marks it retrieved: a cached error is not "never retrieved"


class BrokerLink:
    """Queries, metadata and figures for one worker's event loop."""

    def __init__(
        self, frontend: str, admin: str, *, ttl_s: float = 1.0, admin_timeout_ms: float = 1000
    ) -> None:
        self.frontend, self.admin_address = frontend, admin
        self._ctx = zmq.asyncio.Context()
        self.client = AsyncClient(frontend, context=self._ctx)
        self.admin = AsyncAdmin(admin, timeout_ms=admin_timeout_ms, context=self._ctx)
        self._cache = TTLCache(ttl_s)
        self._ready_cache = TTLCache(min(ttl_s, 0.5))
        self._known_apps: dict[str, tuple[float, AppInfo]] = {}  # name -> (when, last good answer)
        self._rechecked: dict[str, float] = {}  # name -> when its metadata was last asked anew

    async def close(self) -> None:
        await self.client.close()
        await self.admin.close()
        self._ctx.term()

    # ------------------------------------------------------------ metadata

    async def app(self, name: str) -> AppInfo:
        """The app's metadata; UnknownApp when the broker has no such app.

        When the admin socket does not answer in time, metadata that was good within
        ``STALE_APP_S`` is used rather than failing the request.
        """
        try:
            doc = await self._cache.get(("app", name), lambda: self.admin.call("app.show", name=name))
        except errors.NotFound:
            self._known_apps.pop(name, None)
            raise errors.UnknownApp(f"no app named {name!r}") from None
        except errors.Unavailable:
            known = self._known_apps.get(name)
            if known is not None and time.monotonic() - known[0] < STALE_APP_S:
                return known[1]
            raise
        info = AppInfo.from_doc(doc)
        if len(self._known_apps) >= self._cache.max_entries:
            self._known_apps.clear()
        self._known_apps[name] = (time.monotonic(), info)
        return info

    async def serve_app(self, name: str, run: Callable[[AppInfo], Awaitable[T]]) -> T:
        """``run`` with the app's metadata; run again once with fresh metadata when what the
        gateway held no longer fits.

        A request refused as ``BAD_INPUT`` (by the gateway's own reading of it or by the
        broker) may have been read with stale metadata: the app deleted and created again
        with another type since. The metadata is then asked for again (at most every
        ``RECHECK_APP_S`` per app); if it changed, ``run`` goes again with it, else the
        refusal stands. Nothing ran for a refused request, so running it again is safe.
        """
        info = await self.app(name)
        try:
            return await run(info)
        except (errors.BadInput, HTTPError) as exc:
            if isinstance(exc, HTTPError) and exc.code != "BAD_INPUT":
                raise
            now = time.monotonic()
            if now - self._rechecked.get(name, float("-inf")) < RECHECK_APP_S:
                raise
            if len(self._rechecked) >= self._cache.max_entries:
                self._rechecked.clear()
            self._rechecked[name] = now
            self._cache.forget(("app", name))
            fresh = await self.app(name)  # UnknownApp (404) when it is gone since
            if fresh == info:
                raise
        return await run(fresh)

    async def model(self, name: str, *, fresh: bool = False) -> dict[str, Any]:
        """``model.show`` (cached ``ttl_s``; asked anew with ``fresh``)."""
        if fresh:
            self.forget_model(name)
        return await self._cache.get(("model", name), lambda: self.admin.call("model.show", name=name))

    def forget_model(self, name: str) -> None:
        """Ask the broker anew for ``model.show`` next time (it changed)."""
        self._cache.forget(("model", name))

    async def ping(self) -> dict[str, Any]:
        return await self._ready_cache.get("ping", lambda: self.admin.call("ping"))

    async def app_readiness(self, name: str) -> tuple[AppInfo, list[str]]:
        """The app and the reasons it is not ready (empty: ready)."""
        info = await self.app(name)
        if not info.models:
            return info, [f"app {name!r} links no model"]
        reasons = []
        for model_name in info.models:
            try:
                doc = await self.model(model_name)
            except errors.NotFound:
                reasons.append(f"model {model_name!r} is not known to the broker")
                continue
            if live_replicas(doc):
                return info, []
            active = doc.get("active_version")
            of_version = f" of its active version {active!r}" if active else ""
            reasons.append(f"model {model_name!r} has no live replica{of_version}")
        return info, reasons

    async def server_readiness(self) -> list[str]:
        """Why the server is not ready, strictly as Triton's (empty: ready): every model that
        an app links needs a live replica of its active version. Unavailable when the broker
        does not answer."""

        async def ask() -> tuple[Any, Any]:
            return await asyncio.gather(self.admin.call("app.list"), self.admin.call("model.list"))

        apps, models = await self._ready_cache.get("server", ask)
        by_name = {m["name"]: m for m in models}
        reasons = []
        for app in apps:
            for model_name in app.get("models") or ():
                doc = by_name.get(model_name)
                if doc is None:
                    reasons.append(f"app {app['name']!r}: model {model_name!r} is not known to the broker")
                elif not live_replicas(doc):
                    active = doc.get("active_version")
                    of_version = f" of its active version {active!r}" if active else ""
                    reasons.append(
                        f"app {app['name']!r}: model {model_name!r} has no live replica{of_version}"
                    )
        return reasons

    async def figures(self) -> dict[str, Any]:
        """Everything /metrics shows of the broker, asked for in one go (not cached)."""
        stats, status = await asyncio.gather(self.admin.call("stats"), self.admin.call("status"))
        return {"stats": stats, "status": status}

    # ------------------------------------------------------------ queries

    async def predict(
        self,
        app: AppInfo,
        x: Any,
        *,
        timeout_ms: float | None,
        priority: int,
        dtype: str | None,
        version: str = "",
        trace: tuple[str, str] | None = None,
    ) -> Prediction:
        tp, ts = trace or (None, None)
        async with self._deadline(app, timeout_ms):
            return await self.client.predict(
                app.name,
                x,
                timeout_ms,
                dtype=dtype,
                priority=priority,
                version=version,
                traceparent=tp,
                tracestate=ts,
            )

    async def predict_many(
        self,
        app: AppInfo,
        xs: Sequence[Any],
        *,
        timeout_ms: float | None,
        priority: int,
        dtype: str | None,
        version: str = "",
        trace: tuple[str, str] | None = None,
    ) -> list[Prediction | errors.RequestError]:
        tp, ts = trace or (None, None)
        async with self._deadline(app, timeout_ms):
            return await self.client.predict_many(
                app.name,
                xs,
                timeout_ms,
                dtype=dtype,
                priority=priority,
                return_exceptions=True,
                version=version,
                traceparent=tp,
                tracestate=ts,
            )

    @contextlib.asynccontextmanager
    async def _deadline(self, app: AppInfo, timeout_ms: float | None) -> AsyncIterator[None]:
        """The query's own deadline plus a grace; past it, ``ketch.Timeout`` (504)."""
        try:
            async with asyncio.timeout((timeout_ms or app.slo_ms or 10_000) / 1000 + GRACE_S):
                yield
        except TimeoutError:
            raise errors.Timeout(f"no answer from the broker at {self.frontend} in time") from None


def live_replicas(model_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Replicas of the model's active version that take work (ready or busy)."""
    active = model_doc.get("active_version")
    return [
        r
        for r in model_doc.get("replicas") or ()
        if r.get("state") in LIVE_STATES and (active is None or r.get("version") == active)
    ]
