"""Admin operations: the JSON control messages of docs/protocol.md section 7.

Each op is a method ``op_<name with _ for .>`` taking keyword arguments and returning a
JSON-ready result, or raising a ``ketch`` RequestError whose code goes on the wire.
They run on the broker loop, so they only touch memory; persistence is queued.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING, Any

from ketch import errors
from ketch import protocol as proto
from ketch.protocol import ErrorCode

from ketchd.batching import MODES
from ketchd.policies import make_policy
from ketchd.registry import App, Model, ReplicaState

if TYPE_CHECKING:
    from ketchd.broker import Broker

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or set(name) - _NAME_CHARS:
        raise errors.Invalid(f"{kind} name {name!r} must be 1-128 letters, digits, '-', '_' or '.'")
    return name


def schema_conflict(app: App, model: Model) -> str:
    """Why ``model``'s live replicas cannot take ``app``'s inputs ("" when they can, or when
    no replica has said what it takes yet).

    A replica takes the app's inputs when its dtype is the app's and its shape has the same
    rank, each size equal or either -1 (any)."""
    for replica in model.replicas.values():
        if replica.state is ReplicaState.DEAD:
            continue
        fits = replica.input_dtype == app.input_dtype and len(replica.input_shape) == len(app.input_shape)
        fits = fits and all(
            a < 0 or m < 0 or a == m for a, m in zip(app.input_shape, replica.input_shape, strict=True)
        )
        if not fits:
            return (
                f"app {app.name!r} sends {proto.dtype_name(app.input_dtype)} inputs of shape "
                f"{list(app.input_shape)}, but model {model.name!r} (version {replica.version}) takes "
                f"{proto.dtype_name(replica.input_dtype)} of shape {list(replica.input_shape)}: "
                f"every query would fail. Give the app the model's input type and shape "
                f"(--input-type {proto.dtype_name(replica.input_dtype)} --input-shape "
                f"{','.join(str(d) for d in replica.input_shape) or 'scalar'}), or link a model that fits"
            )
    return ""


class AdminOps:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.gateways: dict[str, float] = {}  # HTTP gateway URL -> when it last said so

    def handle(self, raw: bytes) -> dict[str, Any]:
        req_id = None
        try:
            try:
                req = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise errors.ProtocolError(f"admin message is not JSON: {exc}") from None
            if not isinstance(req, dict):
                raise errors.ProtocolError("admin message must be a JSON object")
            req_id = req.get("id")
            op = req.get("op")
            args = req.get("args") or {}
            if not isinstance(op, str) or not isinstance(args, dict):
                raise errors.ProtocolError("admin message needs a string 'op' and an object 'args'")
            method = getattr(self, "op_" + op.replace(".", "_"), None)
            if method is None:
                raise errors.UnknownMessage(f"unknown admin op {op!r}")
            try:
                result = method(**args)
            except TypeError as exc:
                raise errors.Invalid(f"{op}: {exc}") from None
            return {"id": req_id, "ok": True, "result": result}
        except errors.RequestError as exc:
            return {"id": req_id, "ok": False, "error": {"code": exc.code_name, "message": exc.message}}

    # ------------------------------------------------------------ broker

    def op_ping(self) -> dict[str, Any]:
        return {"version": proto.PROTOCOL_VERSION, "uptime_s": round(time.time() - self.broker.started, 3)}

    def op_status(self) -> dict[str, Any]:
        b = self.broker
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - b.started, 3),
            "endpoints": dict(b.endpoints),
            "state_path": b.config.state_path,
            "apps": len(b.apps),
            "models": len(b.models),
            "replicas": len(b.replicas),
            "pending": b.pending_count(),
            "stopping": b.stopping,
            "gateways": self._live_gateways(),
        }

    def _live_gateways(self) -> list[str]:
        now = time.monotonic()
        return sorted(url for url, seen in self.gateways.items() if now - seen < 60)

    def op_gateway_register(self, url: str) -> dict[str, Any]:
        """An HTTP gateway says where it serves (again every few seconds); ``status`` lists
        those heard from in the last minute."""
        if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 256:
            raise errors.Invalid("url must be an http:// or https:// URL of at most 256 characters")
        if url not in self.gateways and len(self.gateways) >= 64:
            oldest = min(self.gateways, key=lambda u: self.gateways[u])
            del self.gateways[oldest]
        self.gateways[url] = time.monotonic()
        return {"gateways": self._live_gateways()}

    def op_broker_stop(self) -> dict[str, Any]:
        self.broker.request_stop("admin broker.stop")
        return {"stopping": True}

    # ------------------------------------------------------------ apps

    def _app(self, name: str) -> App:
        app = self.broker.apps.get(name)
        if app is None:
            raise errors.NotFound(f"no app named {name!r}")
        return app

    def op_app_create(
        self,
        name: str,
        input_type: str,
        input_shape: list[int] | None = None,
        slo_ms: float | None = None,
        default: Any = None,
        has_default: bool | None = None,
        models: list[str] | None = None,
        cache: bool = True,
        finite_only: bool = False,
    ) -> dict[str, Any]:
        _check_name("app", name)
        if name in self.broker.apps:
            raise errors.Conflict(f"app {name!r} exists")
        try:
            dtype = proto.dtype_code(input_type)
        except (ValueError, AttributeError) as exc:
            raise errors.Invalid(str(exc)) from None
        shape = tuple(int(d) for d in (input_shape or ()))
        if any(d < -1 or d == 0 for d in shape):
            raise errors.Invalid(f"input shape {list(shape)}: each dimension is a positive size or -1 (any)")
        if dtype in proto.TEXT_DTYPES and shape:
            raise errors.Invalid(f"{input_type} inputs take no shape")
        slo = self.broker.config.default_slo_ms if slo_ms is None else float(slo_ms)
        if not (math.isfinite(slo) and 0 < slo <= 3_600_000):
            raise errors.Invalid(f"slo_ms {slo_ms!r} must be a positive number of milliseconds")
        app = App(
            name=name,
            input_dtype=dtype,
            input_shape=shape,
            slo_ms=slo,
            default=default,
            has_default=default is not None if has_default is None else bool(has_default),
            cache=bool(cache),
            finite_only=bool(finite_only),
        )
        for model in models or []:
            self._link(app, model)
        self.broker.apps[name] = app
        self.broker.persistence.persist_app(app)
        return self._app_doc(app)

    def op_app_configure(
        self, name: str, cache: bool | None = None, slo_ms: float | None = None
    ) -> dict[str, Any]:
        app = self._app(name)
        if slo_ms is not None:
            slo = float(slo_ms)
            if not (math.isfinite(slo) and 0 < slo <= 3_600_000):
                raise errors.Invalid(f"slo_ms {slo_ms!r} must be a positive number of milliseconds")
            app.slo_ms = slo
        if cache is not None:
            app.cache = bool(cache)
        self.broker.persistence.persist_app(app)
        return self._app_doc(app)

    def op_app_list(self) -> list[dict[str, Any]]:
        return [self._app_doc(a) for a in sorted(self.broker.apps.values(), key=lambda a: a.name)]

    def op_app_show(self, name: str) -> dict[str, Any]:
        return self._app_doc(self._app(name))

    def op_app_delete(self, name: str) -> dict[str, Any]:
        self._app(name)
        del self.broker.apps[name]
        self.broker.persistence.forget_app(name)
        return {"deleted": name}

    def _link(self, app: App, model_name: str) -> None:
        _check_name("model", model_name)
        if model_name in app.models:
            raise errors.Conflict(f"app {app.name!r} already links model {model_name!r}")
        model = self.broker.models.get(model_name)
        if model is None:
            model = self.broker.models[model_name] = Model(model_name)
            self.broker.persistence.persist_model(model)
        problem = schema_conflict(app, model)
        if problem:
            raise errors.Invalid(problem)
        app.models.append(model_name)

    def op_app_link(self, app: str, model: str) -> dict[str, Any]:
        a = self._app(app)
        self._link(a, model)
        self.broker.persistence.persist_app(a)
        return self._app_doc(a)

    def op_app_unlink(self, app: str, model: str) -> dict[str, Any]:
        a = self._app(app)
        if model not in a.models:
            raise errors.NotFound(f"app {app!r} does not link model {model!r}")
        a.models.remove(model)
        self.broker.persistence.persist_app(a)
        return self._app_doc(a)

    def _app_doc(self, app: App) -> dict[str, Any]:
        return {**app.to_json(), "figures": app.figures(), "selection": app.policy.describe()}

    def op_app_set_policy(
        self, name: str, policy: str, options: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Choose how an app's linked models are used: single, weighted, shadow, exp3, exp4, ensemble.

        The same policy again keeps what it learned and takes the new options; another starts
        afresh.
        """
        app = self._app(name)
        options = dict(options or {})
        try:
            if policy == app.policy.name:
                app.policy = app.policy.reconfigure(**options)
            else:
                app.policy = make_policy(policy, **options)
        except (ValueError, TypeError) as exc:
            raise errors.Invalid(str(exc)) from None
        app.policy_dirty = True
        self.broker.persistence.persist_app(app)
        self.broker.persistence.save_policies()
        return self._app_doc(app)

    # ------------------------------------------------------------ models

    def _model(self, name: str) -> Model:
        model = self.broker.models.get(name)
        if model is None:
            raise errors.NotFound(f"no model named {name!r}")
        return model

    def _model_doc(self, model: Model) -> dict[str, Any]:
        replicas = [r.to_json() for r in model.replicas.values() if r.state is not ReplicaState.DEAD]
        return {**model.to_json(), "figures": model.figures(), "replicas": replicas}

    def op_model_list(self) -> list[dict[str, Any]]:
        return [self._model_doc(m) for m in sorted(self.broker.models.values(), key=lambda m: m.name)]

    def op_model_show(self, name: str) -> dict[str, Any]:
        return self._model_doc(self._model(name))

    def op_model_delete(self, name: str, force: bool = False) -> dict[str, Any]:
        """Forget a model: refused while replicas of it are live, or (unless ``force``, which
        unlinks it) while apps link it."""
        model = self._model(name)
        live = [r for r in model.replicas.values() if r.state is not ReplicaState.DEAD]
        if live:
            raise errors.Conflict(
                f"model {name!r} has {len(live)} live replica(s): stop them first (Ctrl-C its "
                f"ketch serve / model serve, or ketch down)"
            )
        linked = sorted(a.name for a in self.broker.apps.values() if name in a.models)
        if linked and not force:
            raise errors.Conflict(
                f"apps {', '.join(linked)} link model {name!r}: unlink it (ketch app unlink APP {name}) "
                "or delete with --force, which unlinks it"
            )
        for app_name in linked:
            app = self.broker.apps[app_name]
            app.models.remove(name)
            self.broker.persistence.persist_app(app)
        for p in model.queue.take(len(model.queue)):
            if not p.done:
                self.broker.answers.answer_error(p, ErrorCode.NO_MODEL, f"model {name!r} was deleted")
        del self.broker.models[name]
        self.broker.persistence.forget_model(name)
        return {"deleted": name, "unlinked_from": linked}

    def op_model_set_version(self, name: str, version: str) -> dict[str, Any]:
        model = self._model(name)
        version = str(version)
        if version not in model.known_versions:
            known = ", ".join(model.known_versions) or "none yet"
            raise errors.NotFound(f"model {name!r} has no version {version!r} (known: {known})")
        model.set_version(version)
        self.broker.persistence.persist_model(model)
        self.broker.dispatcher.mark_dirty(model)
        return self._model_doc(model)

    def op_model_rollback(self, name: str) -> dict[str, Any]:
        model = self._model(name)
        if not model.history:
            raise errors.Invalid(f"model {name!r} has no earlier version to roll back to")
        previous = model.history.pop()
        model.active_version = previous
        self.broker.persistence.persist_model(model)
        self.broker.dispatcher.mark_dirty(model)
        return self._model_doc(model)

    def op_model_configure(
        self,
        name: str,
        max_batch: int | None = None,
        max_queue: int | None = None,
        batching: str | None = None,
        batch_delay_ms: float | None = None,
        create: bool = False,
    ) -> dict[str, Any]:
        """Queue policy of a model: max batch, max queue, batching mode, batch delay."""
        if create and name not in self.broker.models:
            _check_name("model", name)
            self.broker.models[name] = Model(name)
        model = self._model(name)
        if max_batch is not None:
            if int(max_batch) < 0:
                raise errors.Invalid("max_batch must be 0 (broker default) or more")
            model.max_batch = int(max_batch)
        if max_queue is not None:
            if int(max_queue) < 0:
                raise errors.Invalid("max_queue must be 0 (broker default) or more")
            model.max_queue = int(max_queue)
        if batching is not None:
            if batching not in MODES:
                raise errors.Invalid(f"batching {batching!r}: one of {', '.join(MODES)}")
            model.batching = batching
        if batch_delay_ms is not None:
            delay = float(batch_delay_ms)
            if not (math.isfinite(delay) and 0 <= delay <= 10_000):
                raise errors.Invalid("batch_delay_ms must be between 0 and 10000")
            model.batch_delay_ms = delay
        self.broker.persistence.persist_model(model)
        self.broker.containers.reconfigure(model)
        return self._model_doc(model)

    def op_model_drain(self, name: str, replica: str | None = None) -> dict[str, Any]:
        """Ask a model's replicas (or one, by replica id) to finish their work and leave."""
        model = self._model(name)
        targets = [
            r
            for r in model.replicas.values()
            if r.state is not ReplicaState.DEAD and (replica is None or r.replica_id == replica)
        ]
        if replica is not None and not targets:
            raise errors.NotFound(f"model {name!r} has no live replica {replica!r}")
        for r in targets:
            self.broker.containers.drain(r, "drain requested")
        return {"draining": [r.replica_id for r in targets]}

    def op_replica_list(self, model: str | None = None) -> list[dict[str, Any]]:
        return [
            r.to_json()
            for r in self.broker.replicas.values()
            if (model is None or r.model == model) and r.state is not ReplicaState.DEAD
        ]

    # ------------------------------------------------------------ figures

    def op_stats(self) -> dict[str, Any]:
        b = self.broker
        return {
            "apps": {name: {**a.figures(), "models": list(a.models)} for name, a in sorted(b.apps.items())},
            "models": {
                name: {**m.figures(), "active_version": m.active_version}
                for name, m in sorted(b.models.items())
            },
            "replicas": [r.to_json() for r in b.replicas.values() if r.state is not ReplicaState.DEAD],
            "cache": {
                **b.cache.figures.to_json(),
                "entries": len(b.cache),
                "bytes": b.cache.bytes_used,
                "max_bytes": b.cache.max_bytes,
            },
            "counters": dict(b.counters),
        }
