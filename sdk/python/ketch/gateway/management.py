"""Clipper's management REST API on the gateway, under ``/admin/``, mapped to Ketch's admin API.

The routes, request fields and answers are those of Clipper's management frontend
(ucbrise/clipper, ``src/management/src/management_frontend.hpp``, v0.4.1), which
``clipper_admin.ClipperConnection`` calls: a Clipper user's admin code registers apps, links
models and reads the cluster's state through Ketch unchanged. Only admin tokens reach these
routes (``auth.py``). Each route runs one or a few broker admin ops (``ketchd/admin.py``);
what Ketch does differently from Clipper is in docs/http.md ("Clipper's management API").

Clipper's names of input types map to Ketch dtypes; Clipper inputs are vectors of any
length, so a numeric app gets the input shape ``[-1]``:

    integers -> int32    floats -> float32    doubles -> float64    bytes -> bytes    strings -> string

Writes answer 200 with a sentence (text, as Clipper's do); reads answer JSON in Clipper's
shapes; errors are Ketch's JSON errors (``{"error", "code"}``) with Ketch's status codes
(Clipper answers 400 for any refused operation; ``clipper_admin`` takes any non-200 as one).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import PlainTextResponse, Response

from ketch import errors
from ketch.gateway.errors import HTTPError, bad_request
from ketch.gateway.http import Call, json_response, parse_json, read_body

CLIPPER_TYPES = {
    "integers": "int32",
    "floats": "float32",
    "doubles": "float64",
    "bytes": "bytes",
    "strings": "string",
}
KETCH_TYPES = {v: k for k, v in CLIPPER_TYPES.items()}
# what Clipper records for a model that runs in no container it started (clipper_admin's
# CONTAINERLESS_MODEL_IMAGE): Ketch starts none, so ``set_num_replicas`` is refused by the client
CONTAINERLESS = "NO_CONTAINER"


def _text(message: str) -> Response:
    return PlainTextResponse(message)


async def _doc(call: Call) -> dict[str, Any]:
    doc = parse_json(call, await read_body(call))
    if not isinstance(doc, dict):
        raise bad_request("send a JSON object")
    return doc


def _str(doc: dict[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value:
        raise bad_request(f"{key!r} must be a non-empty string")
    return value


def _int(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key!r} must be a whole number")
    return value


def _verbose(doc: dict[str, Any]) -> bool:
    value = doc.get("verbose", False)
    if not isinstance(value, bool):
        raise bad_request("'verbose' must be true or false")
    return value


def _names(doc: dict[str, Any], key: str) -> list[str]:
    value = doc.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise bad_request(f"{key!r} must be a non-empty list of names")
    return value


def _version(doc: dict[str, Any], key: str = "model_version") -> str:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int) or str(value) == "":
        raise bad_request(f"{key!r} must be a version (a string)")
    return str(value)


async def _admin(call: Call, op: str, **args: Any) -> Any:
    return await call.gw.link.admin.call(op, **args)


def _forget_app(call: Call, name: str) -> None:
    """A change made here shows in this worker's next query at once, not after the TTL."""
    call.gw.link._cache.forget(("app", name))


def clipper_type(ketch_type: str) -> str:
    """Clipper's name of a Ketch dtype (Ketch's own name where Clipper has none)."""
    return KETCH_TYPES.get(ketch_type, ketch_type)


def _default_output(app: dict[str, Any]) -> str:
    """Clipper keeps the default as text; Ketch's is any JSON value."""
    default = app.get("default")
    if not app.get("has_default"):
        return ""
    return default if isinstance(default, str) else json.dumps(default)


def _app_info(app: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": app["name"],
        "input_type": clipper_type(app["input_type"]),
        "default_output": _default_output(app),
        "latency_slo_micros": round(float(app["slo_ms"]) * 1000),
        "linked_models": list(app.get("models") or ()),
    }


def _model_input_type(model: dict[str, Any], version: str, apps: list[dict[str, Any]]) -> str:
    """What a model version takes: its replicas say; else the apps linking the model; else ""."""
    for r in model.get("replicas") or ():
        if r.get("version") == version:
            return clipper_type(r["input_type"])
    for app in apps:
        if model["name"] in (app.get("models") or ()):
            return clipper_type(app["input_type"])
    return ""


def _model_info(model: dict[str, Any], version: str, apps: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "model_name": model["name"],
        "model_version": version,
        "input_type": _model_input_type(model, version, apps),
        "labels": [],
        "container_name": CONTAINERLESS,
        "model_data_path": "DEPRECATED",  # what clipper_admin sends and Clipper keeps
        "is_current_version": model.get("active_version") == version,
    }


def _containers(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Live replicas as Clipper's containers: ``model_replica_id`` is the replica's index
    among its model version's replicas (ordered by Ketch's replica id), as Clipper numbers
    them; ``replica_id`` is Ketch's own id."""
    out = []
    for model in models:
        by_version: dict[str, list[dict[str, Any]]] = {}
        for r in model.get("replicas") or ():
            by_version.setdefault(r["version"], []).append(r)
        for version, replicas in sorted(by_version.items()):
            for index, r in enumerate(sorted(replicas, key=lambda r: r["replica_id"])):
                out.append(
                    {
                        "model_id": f"{model['name']}:{version}",
                        "model_name": model["name"],
                        "model_version": version,
                        "model_replica_id": index,
                        "input_type": clipper_type(r["input_type"]),
                        "replica_id": r["replica_id"],
                        "state": r["state"],
                    }
                )
    return out


# ---------------------------------------------------------------- routes


async def ping(call: Call) -> Response:
    return _text("PONG")


async def add_app(call: Call) -> Response:
    doc = await _doc(call)
    name = _str(doc, "name")
    input_type = _str(doc, "input_type")
    if input_type not in CLIPPER_TYPES:
        raise bad_request(f"input_type {input_type!r}: one of {', '.join(CLIPPER_TYPES)}")
    default = doc.get("default_output")
    if not isinstance(default, str):
        raise bad_request("'default_output' must be a string")
    slo_micros = _int(doc, "latency_slo_micros")
    if slo_micros <= 0:
        raise bad_request("'latency_slo_micros' must be a positive number of microseconds")
    try:  # Clipper answers a default that is JSON text as that JSON value, else as text
        default_value = json.loads(default)
    except ValueError:
        default_value = default
    dtype = CLIPPER_TYPES[input_type]
    await _admin(
        call,
        "app.create",
        name=name,
        input_type=dtype,
        input_shape=[] if dtype in ("bytes", "string") else [-1],
        slo_ms=slo_micros / 1000,
        default=default_value,
        has_default=True,
    )
    _forget_app(call, name)
    return _text(f"Successfully added application with name '{name}'")


async def delete_app(call: Call) -> Response:
    name = _str(await _doc(call), "name")
    await _admin(call, "app.delete", name=name)
    _forget_app(call, name)
    return _text(f"Successfully deleted application with name '{name}'")


async def add_model_links(call: Call) -> Response:
    doc = await _doc(call)
    app, models = _str(doc, "app_name"), _names(doc, "model_names")
    for model in models:
        await _admin(call, "app.link", app=app, model=model)
    _forget_app(call, app)
    linked = ", ".join(f"'{m}'" for m in models)
    return _text(f"Successfully linked model with name {linked} to application '{app}'")


async def delete_model_links(call: Call) -> Response:
    doc = await _doc(call)
    app, models = _str(doc, "app_name"), _names(doc, "model_names")
    shown = await _admin(call, "app.show", name=app)
    missing = [m for m in models if m not in shown["models"]]
    if missing:  # checked first, as Clipper does: a refused call changes nothing
        raise bad_request(f"Cannot remove nonexistent link between app {app} and model {missing[0]}")
    for model in models:
        await _admin(call, "app.unlink", app=app, model=model)
    _forget_app(call, app)
    return _text("Success!")


async def add_model(call: Call) -> Response:
    """Clipper records a model version (its container was started by clipper_admin) and makes
    it current. Ketch starts nothing: the version is one its replicas announced (``ketch
    serve``/``ketch model serve`` with that version), which this makes active; a version no
    replica has announced yet is a 409 that says so."""
    doc = await _doc(call)
    name, version = _str(doc, "model_name"), _version(doc)
    input_type = _str(doc, "input_type")
    if input_type not in CLIPPER_TYPES:
        raise bad_request(f"input_type {input_type!r}: one of {', '.join(CLIPPER_TYPES)}")
    batch_size = doc.get("batch_size", -1)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or (batch_size <= 0 and batch_size != -1)
    ):
        raise bad_request("'batch_size' must be positive, or -1 (adaptive)")
    try:
        model = await _admin(call, "model.show", name=name)
    except errors.NotFound:
        model = None
    if model is None or version not in model["versions"]:
        known = ", ".join(model["versions"]) if model else "none"
        raise HTTPError(
            409,
            f"model {name!r} has no version {version!r} known to Ketch (known: {known}): Ketch starts "
            f"no container; start a replica of {name} version {version} (ketch serve / ketch model "
            "serve) and add the model again",
            code="CONFLICT",
        )
    dtype = CLIPPER_TYPES[input_type]
    for r in model["replicas"]:
        if r["version"] == version and r["input_type"] != dtype:
            raise bad_request(
                f"model {name!r} version {version} takes {clipper_type(r['input_type'])} "
                f"({r['input_type']}), not {input_type}"
            )
    for app in await _admin(call, "app.list"):
        if name in app["models"] and app["input_type"] != dtype:
            raise bad_request(
                f"Model with name '{name}' is already linked to app '{app['name']}' using input type "
                f"'{clipper_type(app['input_type'])}'. The input type you provided for a new version "
                f"of the model, '{input_type}', is not compatible."
            )
    if batch_size > 0:
        await _admin(call, "model.configure", name=name, max_batch=batch_size)
    await _admin(call, "model.set_version", name=name, version=version)
    return _text(f"Successfully added model with name '{name}' and input type '{input_type}'")


async def set_model_version(call: Call) -> Response:
    doc = await _doc(call)
    name, version = _str(doc, "model_name"), _version(doc)
    await _admin(call, "model.set_version", name=name, version=version)
    return _text(f"Successfully set model '{name}' to version '{version}'")


async def delete_versioned_model(call: Call) -> Response:
    """Clipper marks a version deleted once clipper_admin stopped its containers; Ketch drains
    the version's live replicas (they finish their work and leave). The active version is
    refused: set another first."""
    doc = await _doc(call)
    name, version = _str(doc, "model_name"), _version(doc)
    model = await _admin(call, "model.show", name=name)
    if version not in model["versions"]:
        raise HTTPError(404, f"model {name!r} has no version {version!r}", code="NOT_FOUND")
    if model["active_version"] == version:
        raise HTTPError(
            409,
            f"version {version!r} is model {name!r}'s active version: set another version first",
            code="CONFLICT",
        )
    for r in model["replicas"]:
        if r["version"] == version:
            await _admin(call, "model.drain", name=name, replica=r["replica_id"])
    return _text(f"Successfully deleted model with name '{name}' and version '{version}'")


async def get_all_applications(call: Call) -> Response:
    verbose = _verbose(await _doc(call))
    apps = await _admin(call, "app.list")
    return json_response([_app_info(a) for a in apps] if verbose else [a["name"] for a in apps])


async def get_application(call: Call) -> Response:
    name = _str(await _doc(call), "name")
    try:
        app = await _admin(call, "app.show", name=name)
    except errors.NotFound:
        return json_response({})  # Clipper: an empty object for an app that does not exist
    return json_response(_app_info(app))


async def get_linked_models(call: Call) -> Response:
    name = _str(await _doc(call), "app_name")
    app = await _admin(call, "app.show", name=name)
    return json_response(list(app["models"]))


async def get_all_models(call: Call) -> Response:
    verbose = _verbose(await _doc(call))
    models = await _admin(call, "model.list")
    if not verbose:
        return json_response([f"{m['name']}:{v}" for m in models for v in m["versions"]])
    apps = await _admin(call, "app.list")
    return json_response([_model_info(m, v, apps) for m in models for v in m["versions"]])


async def get_model(call: Call) -> Response:
    doc = await _doc(call)
    name, version = _str(doc, "model_name"), _version(doc)
    try:
        model = await _admin(call, "model.show", name=name)
    except errors.NotFound:
        return json_response({})  # Clipper: an empty object for a model that does not exist
    if version not in model["versions"]:
        return json_response({})
    return json_response(_model_info(model, version, await _admin(call, "app.list")))


async def get_all_containers(call: Call) -> Response:
    verbose = _verbose(await _doc(call))
    containers = _containers(await _admin(call, "model.list"))
    if verbose:
        return json_response(containers)
    return json_response([f"{c['model_id']}:{c['model_replica_id']}" for c in containers])


async def get_container(call: Call) -> Response:
    doc = await _doc(call)
    name, version, index = _str(doc, "model_name"), _version(doc), _int(doc, "replica_id")
    try:
        model = await _admin(call, "model.show", name=name)
    except errors.NotFound:
        return json_response({})
    for c in _containers([model]):
        if c["model_version"] == version and c["model_replica_id"] == index:
            return json_response(c)
    return json_response({})  # Clipper: an empty object for a container that does not exist


async def get_state(call: Call) -> Response:
    """Clipper's selection-policy state of an app (for its default policy, the default
    output); Ketch answers its policy's description (``ketch app show``'s ``selection``)."""
    doc = await _doc(call)
    app = await _admin(call, "app.show", name=_str(doc, "app_name"))
    return json_response({"policy": app["policy"], "selection": app.get("selection")})


ROUTES = {
    "add_app": add_app,
    "delete_app": delete_app,
    "add_model_links": add_model_links,
    "delete_model_links": delete_model_links,
    "add_model": add_model,
    "set_model_version": set_model_version,
    "delete_versioned_model": delete_versioned_model,
    "get_all_applications": get_all_applications,
    "get_application": get_application,
    "get_linked_models": get_linked_models,
    "get_all_models": get_all_models,
    "get_model": get_model,
    "get_all_containers": get_all_containers,
    "get_container": get_container,
    "get_state": get_state,
}
