"""Admin operations: the JSON control messages of docs/protocol.md section 7.

Each op is a method ``op_<name with _ for .>`` taking keyword arguments and returning a
JSON-ready result, or raising a ``ketch`` RequestError whose code goes on the wire.
They run on the broker loop, so they only touch memory; persistence is queued.

Every argument of every op is checked against the op's own type hints before it runs
(``_conform``): a string where a number belongs, a fraction for a count, a list of text
for a shape, an unknown or missing argument is answered INVALID with a message naming the
argument. Ranges are checked by the ops. Whatever else goes wrong in an op is a bug: it is
answered INTERNAL, logged with its traceback and counted, never left unanswered.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time
import types
import typing
from typing import TYPE_CHECKING, Any

import structlog
from ketch import errors
from ketch import protocol as proto
from ketch.pins import no_version
from ketch.protocol import ErrorCode

from ketchd.batching import MODES
from ketchd.policies import make_policy
from ketchd.registry import App, Model, ReplicaState
from ketchd.stats import LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd.admin")

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")

# limits of the admin socket (docs/protocol.md section 8)
MAX_ADMIN_BYTES = 1024 * 1024  # one admin message
MAX_JSON_DEPTH = 32  # of any JSON value an op takes (an app's default, a policy option)
MAX_SHAPE_DIMS = 32
MAX_DIM = 2**31 - 1
MAX_LINKED_MODELS = 256
MAX_BATCH = 1_000_000
MAX_QUEUE = 1_000_000
MAX_TEXT = 256  # a version or a replica id


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > 128 or set(name) - _NAME_CHARS:
        raise errors.Invalid(f"{kind} name {_short(name)} must be 1-128 letters, digits, '-', '_' or '.'")
    return name


# ---------------------------------------------------------------- argument types


def _json_value(value: Any, name: str) -> Any:
    """A JSON value as an op takes it: finite numbers, at most MAX_JSON_DEPTH deep."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise errors.Invalid(f"{name}: NaN and infinity are not JSON; use null or a number")
        if isinstance(v, list | dict):
            if depth > MAX_JSON_DEPTH:
                raise errors.Invalid(f"{name} nests lists or objects deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
    return value


def _conform(value: Any, hint: Any, name: str) -> Any:
    """``value`` as type ``hint`` (bool, int, float, str, None, Any, list[X], dict[str, X] and
    unions of them), or Invalid. JSON's numbers: an int is a float too, a bool is neither."""
    if hint is Any:
        return _json_value(value, name)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _conform(value, option, name)
            except errors.Invalid as exc:
                problems.append(exc.message)
        raise errors.Invalid(problems[0] if len(problems) == 1 else f"{name}: {_short(value)} is not valid")
    if origin is list:
        if not isinstance(value, list):
            raise errors.Invalid(f"{name} must be a list, got {_short(value)}")
        (item,) = typing.get_args(hint)
        return [_conform(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise errors.Invalid(f"{name} must be an object, got {_short(value)}")
        _, item = typing.get_args(hint)
        return {k: _conform(v, item, f"{name}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise errors.Invalid(f"{name} must be true or false, got {_short(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise errors.Invalid(f"{name} must be a whole number, got {_short(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise errors.Invalid(f"{name} must be a number, got {_short(value)}")
        if isinstance(value, int) and abs(value) > 2**1023:
            raise errors.Invalid(f"{name}: {_short(value)} is out of range")
        value = float(value)
        if not math.isfinite(value):
            raise errors.Invalid(f"{name} must be a finite number, got {value}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise errors.Invalid(f"{name} must be a string, got {_short(value)}")
        return value
    raise TypeError(f"admin op argument {name}: no check for type {hint!r}")  # a bug here, not the caller's


@functools.cache
def _signature(method: Any) -> tuple[dict[str, Any], frozenset[str]]:
    """The op's argument types and the names it needs."""
    hints = typing.get_type_hints(method)
    params = inspect.signature(method).parameters
    required = frozenset(n for n, p in params.items() if p.default is inspect.Parameter.empty)
    return {n: hints.get(n, Any) for n in params}, required


def _arguments(op: str, method: Any, args: dict[str, Any]) -> dict[str, Any]:
    hints, required = _signature(method.__func__)
    hints = {n: h for n, h in hints.items() if n != "self"}
    unknown = sorted(set(args) - set(hints))
    if unknown:
        takes = ", ".join(hints) or "no arguments"
        raise errors.Invalid(f"{op}: unknown argument {_short(unknown[0])} (it takes {takes})")
    missing = sorted(required - {"self"} - set(args))
    if missing:
        raise errors.Invalid(f"{op}: missing argument {missing[0]!r}")
    return {n: _conform(v, hints[n], n) for n, v in args.items()}


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
        """The reply to one admin message: always one, whatever the message holds."""
        req_id = None
        op = None
        try:
            if len(raw) > MAX_ADMIN_BYTES:
                raise errors.TooLarge(f"admin message of {len(raw)} bytes, over {MAX_ADMIN_BYTES}")
            try:
                req = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise errors.ProtocolError(f"admin message is not JSON: {exc}") from None
            except RecursionError:
                raise errors.ProtocolError("admin message nests too deep to read") from None
            if not isinstance(req, dict):
                raise errors.ProtocolError("admin message must be a JSON object")
            req_id = req.get("id")
            if isinstance(req_id, list | dict):
                req_id = None  # an id is a number or a string; anything else is not echoed
            op = req.get("op")
            args = req.get("args") or {}
            if not isinstance(op, str) or not isinstance(args, dict):
                raise errors.ProtocolError("admin message needs a string 'op' and an object 'args'")
            method = getattr(self, "op_" + op.replace(".", "_"), None) if op.isascii() else None
            if method is None:
                raise errors.UnknownMessage(f"unknown admin op {_short(op)}")
            result = method(**_arguments(op, method, args))
            return {"id": req_id, "ok": True, "result": result}
        except errors.RequestError as exc:
            return {"id": req_id, "ok": False, "error": {"code": exc.code_name, "message": exc.message}}
        except Exception as exc:  # a bug: the caller still gets an answer
            self.broker.counters["internal_errors"] += 1
            log.exception("admin op failed", op=op if isinstance(op, str) else None)
            return {"id": req_id, "ok": False, "error": {"code": "INTERNAL", "message": errors.describe(exc)}}

    # ------------------------------------------------------------ broker

    def op_ping(self) -> dict[str, Any]:
        return {
            "version": proto.PROTOCOL_VERSION,
            "versions": list(proto.PROTOCOL_VERSIONS),
            "uptime_s": round(time.time() - self.broker.started, 3),
        }

    def op_status(self) -> dict[str, Any]:
        b = self.broker
        store = b.persistence.store
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
            "state_unsaved": store.unsaved if store is not None else 0,
            "state_error": store.last_error if store is not None else "",
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
            raise errors.NotFound(f"no app named {_short(name)}")
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
            raise errors.Invalid(str(exc)[:200]) from None
        shape = tuple(input_shape or ())
        if len(shape) > MAX_SHAPE_DIMS:
            raise errors.Invalid(f"input shape has {len(shape)} dimensions, at most {MAX_SHAPE_DIMS}")
        if any(d < -1 or d == 0 or d > MAX_DIM for d in shape):
            raise errors.Invalid(
                f"input shape {_short(list(shape))}: each dimension is a size from 1 to {MAX_DIM} or -1 (any)"
            )
        if dtype in proto.TEXT_DTYPES and shape:
            raise errors.Invalid(f"{input_type} inputs take no shape")
        slo = self.broker.config.default_slo_ms if slo_ms is None else _slo(slo_ms)
        if len(models or ()) > MAX_LINKED_MODELS:
            raise errors.Invalid(f"an app links at most {MAX_LINKED_MODELS} models")
        app = App(
            name=name,
            input_dtype=dtype,
            input_shape=shape,
            slo_ms=slo,
            default=default,
            has_default=default is not None if has_default is None else has_default,
            cache=cache,
            finite_only=finite_only,
        )
        for model in models or []:
            self._link(app, model)
        self.broker.apps[name] = app
        self.broker.persistence.persist_app(app)
        app.policy_dirty = True  # its fresh policy replaces any state an app of this name left
        self.broker.persistence.save_policies()
        return self._app_doc(app)

    def op_app_configure(
        self, name: str, cache: bool | None = None, slo_ms: float | None = None
    ) -> dict[str, Any]:
        app = self._app(name)
        if slo_ms is not None:
            app.slo_ms = _slo(slo_ms)
        if cache is not None:
            app.cache = cache
        self.broker.persistence.persist_app(app)
        return self._app_doc(app)

    def op_app_list(self) -> list[dict[str, Any]]:
        return [self._app_doc(a) for a in sorted(self.broker.apps.values(), key=lambda a: a.name)]

    def op_app_show(self, name: str) -> dict[str, Any]:
        return self._app_doc(self._app(name))

    def op_app_delete(self, name: str) -> dict[str, Any]:
        self._app(name)
        del self.broker.apps[name]
        self.broker.persistence.forget_app(name)  # and what it learned
        return {"deleted": name}

    def _link(self, app: App, model_name: str) -> None:
        _check_name("model", model_name)
        if model_name in app.models:
            raise errors.Conflict(f"app {app.name!r} already links model {model_name!r}")
        if len(app.models) >= MAX_LINKED_MODELS:
            raise errors.Invalid(f"an app links at most {MAX_LINKED_MODELS} models")
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
            raise errors.NotFound(f"app {app!r} does not link model {_short(model)}")
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
        if "rng" in options:
            raise errors.Invalid("unknown option 'rng' (seed the policy with the 'seed' option)")
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
            raise errors.NotFound(f"no model named {_short(name)}")
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
        for queue in (model.queue, *(lane.queue for lane in model.lanes.values())):
            for p in queue.take(len(queue)):
                if not p.done:
                    self.broker.answers.answer_error(p, ErrorCode.NO_MODEL, f"model {name!r} was deleted")
        del self.broker.models[name]
        self.broker.persistence.forget_model(name)
        return {"deleted": name, "unlinked_from": linked}

    def op_model_set_version(self, name: str, version: str | int) -> dict[str, Any]:
        model = self._model(name)
        version = str(version)
        if version not in model.known_versions:
            known = ", ".join(model.known_versions) or "none yet"
            raise errors.NotFound(f"model {name!r} has no version {_short(version)} (known: {known})")
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
        model = self.broker.models.get(name)
        if model is None and not create:
            self._model(name)  # NotFound
        if model is None:
            _check_name("model", name)
        # every value is checked before any is set (or the model made): a refused call
        # changes nothing
        if max_batch is not None and not 0 <= max_batch <= MAX_BATCH:
            raise errors.Invalid(f"max_batch must be 0 (broker default) to {MAX_BATCH}")
        if max_queue is not None and not 0 <= max_queue <= MAX_QUEUE:
            raise errors.Invalid(f"max_queue must be 0 (broker default) to {MAX_QUEUE}")
        if batching is not None and batching not in MODES:
            raise errors.Invalid(f"batching {_short(batching)}: one of {', '.join(MODES)}")
        if batch_delay_ms is not None and not 0 <= batch_delay_ms <= 10_000:
            raise errors.Invalid("batch_delay_ms must be between 0 and 10000")
        if model is None:
            model = self.broker.models[name] = Model(name)
        if max_batch is not None:
            model.max_batch = max_batch
        if max_queue is not None:
            model.max_queue = max_queue
        if batching is not None:
            model.batching = batching
        if batch_delay_ms is not None:
            model.batch_delay_ms = batch_delay_ms
        self.broker.persistence.persist_model(model)
        self.broker.containers.reconfigure(model)
        return self._model_doc(model)

    def op_model_drain(
        self, name: str, replica: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """Ask a model's replicas (or one, by replica id, or those of one version) to finish
        their work and leave."""
        model = self._model(name)
        if version is not None and version not in model.known_versions:
            raise no_version(name, version, model.known_versions)
        targets = [
            r
            for r in model.replicas.values()
            if r.state is not ReplicaState.DEAD
            and (replica is None or r.replica_id == replica)
            and (version is None or r.version == version)
        ]
        if replica is not None and not targets:
            raise errors.NotFound(f"model {name!r} has no live replica {_short(replica)}")
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
            "memory": b.memory_figures(),
            "histograms": self._histograms(),
        }

    def _histograms(self) -> dict[str, Any]:
        """The broker's latency histograms (``ketchd.stats.Histogram``): bucket bounds in
        seconds, and per label set its counts per bucket (not cumulative; the last is +Inf)
        and its sum. ``ketch.broker_metrics`` turns them into Prometheus histograms."""
        b = self.broker
        models = sorted(b.models.items())

        def per_model(kind: str) -> list[dict[str, Any]]:
            return [row for name, m in models for row in getattr(m, kind).to_json(("version",), model=name)]

        return {
            "buckets_s": list(LATENCY_BUCKETS_S),
            "query_duration": [
                row
                for name, a in sorted(b.apps.items())
                for row in a.durations.to_json(("model", "version"), app=name)
            ],
            "queue_wait": per_model("queue_waits"),
            "rpc": per_model("rpc_times"),
            "compute": per_model("compute_times"),
        }


def _slo(slo_ms: float) -> float:
    if not 0 < slo_ms <= 3_600_000:
        raise errors.Invalid(f"slo_ms {slo_ms!r} must be a positive number of milliseconds, at most an hour")
    return slo_ms
