"""Model versions and the model repository, transport-free: what the HTTP routes (and the
gRPC service) answer, as data, or a ``ketch.errors`` exception (404 for what does not exist).

A V2 model is a Ketch app; its versions are its linked model's versions (``ketch.pins``:
``VERSION`` for an app of one model, ``MODEL:VERSION`` for one of several). Every version the
broker has known (a replica of it connected once) exists; it is READY while a replica of it
takes work, whichever version is active (a canary, an older one still connected: a pinned
request is served by it).

Triton's repository extension, mapped to what Ketch can do:

    index             every app and version with its state (``READY``, ``LOADING`` while its
                      replicas connect, ``UNLOADING`` while they drain, ``UNAVAILABLE``) and why
    unload            drain the replicas of the app's model(s), or of one version
                      (``parameters.version``): they finish what they hold and leave. A model
                      another app links too is refused (409) unless ``parameters.force``.
    load              Ketch does not start model processes: replicas connect to the broker
                      (``ketch model serve``, ``ketch up``, a container). An app whose models
                      each have a live replica of their active version is loaded (200, nothing
                      to do); any other is refused with 400 saying which model needs a replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ketch import errors
from ketch.gateway.backend import LIVE_STATES, AppInfo, BrokerLink
from ketch.pins import no_version, pin_text, split_pin

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


@dataclass(frozen=True)
class Pin:
    """A version of an app, resolved: the app, its model that has it, and the version."""

    info: AppInfo
    model: str
    version: str
    model_doc: Mapping[str, Any]

    @property
    def name(self) -> str:
        """The version as the app names it (``MODEL:VERSION`` for an app of several models)."""
        return pin_text(self.info.models, self.model, self.version)


def version_state(model_doc: Mapping[str, Any], version: str) -> tuple[str, str]:
    """(state, reason) of one version of a model (``model.show``'s document)."""
    states = [r.get("state") for r in model_doc.get("replicas") or () if r.get("version") == version]
    active = model_doc.get("active_version")
    if any(s in LIVE_STATES for s in states):
        if version == active:
            return READY, ""
        return READY, f"not the active version ({active}): serves the requests pinned to it"
    if "connecting" in states:
        return LOADING, "its replicas are connecting"
    if "draining" in states:
        return UNLOADING, "its replicas are draining"
    return UNAVAILABLE, f"no live replica of model {model_doc.get('name')!r} version {version!r}"


async def _model_doc(link: BrokerLink, model: str, *, fresh: bool = False) -> dict[str, Any]:
    try:
        return await link.model(model, fresh=fresh)
    except errors.NotFound:
        raise errors.NotFound(f"model {model!r} is not known to the broker") from None


async def resolve(link: BrokerLink, app: str, version: str) -> Pin:
    """The version ``version`` of ``app``; UnknownApp, NotFound (no such version) or Invalid
    (a plain version for an app of several models)."""
    info = await link.app(app)
    model, v = split_pin(info.name, info.models, version)
    doc = await _model_doc(link, model)
    if v not in (doc.get("versions") or ()):  # maybe new since the cached answer: ask again
        doc = await _model_doc(link, model, fresh=True)
        if v not in (doc.get("versions") or ()):
            raise no_version(model, v, doc.get("versions") or ())
    return Pin(info, model, v, doc)


async def versions(link: BrokerLink, info: AppInfo) -> list[str]:
    """Every version of the app, as it names them."""
    names = []
    for model in info.models:
        try:
            doc = await link.model(model)
        except errors.NotFound:
            continue
        names.extend(pin_text(info.models, model, str(v)) for v in doc.get("versions") or ())
    return names


async def version_readiness(link: BrokerLink, app: str, version: str) -> tuple[Pin, str]:
    """The version and why it is not ready ("" when it is); 404 when it does not exist."""
    pin = await resolve(link, app, version)
    state, reason = version_state(pin.model_doc, pin.version)
    return pin, "" if state == READY else reason


def _entries(app: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    linked: Sequence[str] = app.get("models") or ()
    if not linked:
        return [{"name": app["name"], "version": "", "state": UNAVAILABLE, "reason": "links no model"}]
    out = []
    for model in linked:
        doc = models.get(model)
        if doc is None or not doc.get("versions"):
            out.append(
                {
                    "name": app["name"],
                    "version": "",
                    "state": UNAVAILABLE,
                    "reason": f"model {model!r} has no version yet: no replica of it has connected",
                }
            )
            continue
        for version in doc["versions"]:
            state, reason = version_state(doc, str(version))
            out.append(
                {
                    "name": app["name"],
                    "version": pin_text(linked, model, str(version)),
                    "state": state,
                    "reason": reason,
                }
            )
    return out


async def index(link: BrokerLink, *, ready: bool = False) -> list[dict[str, str]]:
    """Every app and version: ``{"name", "version", "state", "reason"}`` (Triton's repository
    index), only the READY ones with ``ready``. Asked of the broker anew (not cached)."""
    apps = await link.admin.call("app.list")
    models = {m["name"]: m for m in await link.admin.call("model.list")}
    entries = [e for app in apps for e in _entries(app, models)]
    return [e for e in entries if e["state"] == READY] if ready else entries


def _bool_parameter(parameters: Mapping[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise errors.Invalid(f"parameters.{name} must be true or false")
    return value


async def unload(link: BrokerLink, app: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Drain the replicas of ``app``'s models, or of one version (``parameters["version"]``).

    Refused (Conflict) when another app links one of those models too, unless
    ``parameters["force"]``. Returns ``{"name", "draining": {model: [replica id, ...]}}``."""
    info = await link.app(app)
    force = _bool_parameter(parameters, "force")
    version = parameters.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, str | int)):
        raise errors.Invalid("parameters.version must be a string")
    if version is not None:
        pin = await resolve(link, info.name, str(version))
        targets: list[tuple[str, str | None]] = [(pin.model, pin.version)]
    else:
        if not info.models:
            raise errors.Invalid(f"app {info.name!r} links no model: nothing to unload")
        targets = [(m, None) for m in info.models]
    if not force:
        others = {
            a["name"]: [m for m, _ in targets if m in (a.get("models") or ())]
            for a in await link.admin.call("app.list")
            if a["name"] != info.name
        }
        shared = {a: ms for a, ms in others.items() if ms}
        if shared:
            which = "; ".join(f"app {a!r} links {', '.join(ms)}" for a, ms in sorted(shared.items()))
            raise errors.Conflict(
                f"unloading {info.name!r} drains models other apps serve ({which}); "
                'send {"parameters": {"force": true}} to drain them anyway'
            )
    draining: dict[str, list[str]] = {}
    for model, v in targets:
        try:
            if v is None:
                done = await link.admin.call("model.drain", name=model)
            else:
                done = await link.admin.call("model.drain", name=model, version=v)
        except errors.NotFound:  # a linked model no replica ever served: nothing to drain
            done = {"draining": []}
        draining[model] = list(done.get("draining") or ())
        link.forget_model(model)
    return {"name": info.name, "draining": draining}


async def load(link: BrokerLink, app: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Ketch cannot start model processes: an app whose models each have a live replica of
    their active version is loaded already (returned as such); else Invalid, saying which
    model needs a replica and how to start one."""
    info = await link.app(app)
    unsupported = sorted(k for k in parameters if k == "config" or k.startswith("file:"))
    if unsupported:
        raise errors.Invalid(
            f"Ketch takes no model configuration or files through the repository API "
            f"({', '.join(unsupported)}): a model is what its replicas serve when they connect"
        )
    if not info.models:
        raise errors.Invalid(f"app {info.name!r} links no model: link one (ketch app link) first")
    missing = []
    for model in info.models:
        try:
            doc = await _model_doc(link, model, fresh=True)
        except errors.NotFound:
            missing.append(f"model {model!r} has never had a replica")
            continue
        active = doc.get("active_version")
        if active is None or version_state(doc, str(active))[0] != READY:
            missing.append(f"model {model!r} has no live replica of its active version {active!r}")
    if missing:
        raise errors.Invalid(
            "Ketch does not start model processes from the repository API; "
            + "; ".join(missing)
            + ": start replicas (ketch model serve, ketch up, or a container) and the app is"
            " served as soon as one connects"
        )
    return {"name": info.name, "loaded": True}
