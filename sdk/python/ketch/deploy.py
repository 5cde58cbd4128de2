"""A declarative deployment: apps, models, versions, replicas, SLOs, defaults and policies in
one file (TOML, YAML or JSON) or a model-repository folder. ``ketch up`` brings a broker to
it (``ketch.up``), ``ketch app apply`` takes its apps, and ``render_values`` turns it into
the Helm chart's values. docs/deploy.md#one-file-ketch-up describes the format::

    [defaults]                  # for every model and app that does not say otherwise
    replicas = 2
    slo_ms = 50

    [[models]]                  # one entry per model version
    name = "iris"
    version = "1"
    source = "models/iris.joblib"   # a model file, a folder, FILE.py:ATTR or MODULE:ATTR
    replicas = 2

    [[apps]]                    # the format of `ketch app apply`
    name = "iris"
    models = ["iris"]           # input_type and input_shape: the model's unless given
    slo_ms = 20
    default = -1
    policy = "single"

A model-repository folder holds one folder per model (its name), each with a model file
(version 1) or numbered version folders holding one (Triton's layout), an optional
``model.toml`` of settings (``ketch.loading.SETTING_KEYS``), and optionally a deployment
file ``ketch.toml`` (or ``.yaml``/``.json``) at the top for defaults, apps and policies.
A model that no app links gets an app of its own name.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from ketch import loading

APP_KEYS = {"name", "input_type", "input_shape", "slo_ms", "default", "cache", "finite_only", "models",
            "policy", "policy_options"}  # fmt: skip
MODEL_KEYS = {"name", "version", "source", "replicas", "input_type", "input_shape", "output", "credits",
              "max_batch", "nondeterministic", "batching", "batch_delay_ms", "max_queue", "active",
              "image", "slo_ms", "default"}  # fmt: skip
QUEUE_KEYS = ("max_batch", "batching", "batch_delay_ms", "max_queue")
DEFAULT_KEYS = {"replicas", "credits", "max_batch", "batching", "batch_delay_ms", "max_queue", "slo_ms",
                "cache", "policy"}  # fmt: skip
TOP_KEYS = {"apps", "models", "defaults", "helm"}
DEPLOYMENT_FILES = ("ketch.toml", "ketch.yaml", "ketch.yml", "ketch.json")
IMAGES = {"sklearn": "python-sklearn", "onnx": "python-onnx", "torch": "python-torch", "python": "python"}


class BadDeployment(ValueError):
    """A deployment file or folder that says something wrong; the message names where."""


def read_document(path: str | Path) -> dict[str, Any]:
    """A JSON, TOML or YAML file (by its suffix; JSON when unsure) as a dict."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadDeployment(f"{path}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            doc = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            doc = yaml.safe_load(text)
        else:
            doc = json.loads(text)
    except Exception as exc:  # each parser has its own error class
        kind = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}.get(suffix, "JSON")
        raise BadDeployment(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(doc, dict):
        raise BadDeployment(f"{path}: expected a table/mapping at the top (apps, models, defaults)")
    return doc


def check(
    doc: dict[str, Any], where: str, *, apps_need_types: bool = False, base: Path | None = None
) -> dict[str, Any]:
    """``doc`` validated and normalised: every list present, versions as strings, defaults
    applied, each model's ``path`` its source as this machine finds it (paths are taken
    from ``base``, the file's folder). ``apps_need_types``: apps must name their input type
    (``ketch app apply``)."""
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise BadDeployment(f"{where}: unknown top-level keys: {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(sorted(TOP_KEYS))})")  # fmt: skip
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) - DEFAULT_KEYS:
        raise BadDeployment(f"{where}: defaults may set {', '.join(sorted(DEFAULT_KEYS))}")
    apps, models = doc.get("apps") or [], doc.get("models") or []
    if not isinstance(apps, list) or not isinstance(models, list):
        raise BadDeployment(f"{where}: apps and models are lists ([[apps]] and [[models]] in TOML)")
    out_models = []
    seen = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not m.get("name"):
            raise BadDeployment(f"{where}: models[{i}] needs a name")
        bad = set(m) - MODEL_KEYS
        if bad:
            raise BadDeployment(f"{where}: model {m['name']!r} has unknown keys: {', '.join(sorted(bad))}")
        entry = {**{k: v for k, v in defaults.items() if k in MODEL_KEYS and k != "slo_ms"}, **m}
        entry["version"] = str(entry.get("version", "1"))
        key = (entry["name"], entry["version"])
        if key in seen:
            raise BadDeployment(f"{where}: model {key[0]!r} version {key[1]} appears twice")
        seen.add(key)
        if not entry.get("source"):
            raise BadDeployment(
                f"{where}: model {m['name']!r} needs a source (a file, folder or MODULE:ATTR)"
            )
        entry["path"] = _relative_to(base or Path("."), str(entry["source"]))
        out_models.append(entry)
    out_apps = []
    for i, a in enumerate(apps):
        if not isinstance(a, dict) or not a.get("name"):
            raise BadDeployment(f"{where}: apps[{i}] needs a name")
        bad = set(a) - APP_KEYS
        if bad:
            raise BadDeployment(f"{where}: app {a['name']!r} has unknown keys: {', '.join(sorted(bad))}")
        if apps_need_types and not a.get("input_type"):
            raise BadDeployment(f"{where}: apps[{i}] needs a name and an input_type")
        entry = {**{k: v for k, v in defaults.items() if k in ("slo_ms", "cache", "policy")}, **a}
        out_apps.append(entry)
    names = {m["name"] for m in out_models}
    for m in {m["name"] for m in out_models}:
        if not any(m in a.get("models", []) for a in out_apps):
            first = next(e for e in out_models if e["name"] == m)
            app: dict[str, Any] = {"name": m, "models": [m]}
            app.update({k: first[k] for k in ("slo_ms", "default") if k in first})
            app.update(
                {k: v for k, v in defaults.items() if k in ("slo_ms", "cache", "policy") and k not in app}
            )
            out_apps.append(app)
    for a in out_apps:
        for m in a.get("models", []):
            if out_models and m not in names and not apps_need_types:
                raise BadDeployment(
                    f"{where}: app {a['name']!r} links model {m!r}, which no model entry serves"
                )
    return {"apps": out_apps, "models": out_models, "helm": doc.get("helm") or {}, "defaults": defaults}


def load(target: str | Path) -> dict[str, Any]:
    """A deployment from a file or a model-repository folder, checked (``check``)."""
    path = Path(target)
    if path.is_dir():
        return check(_repository(path), str(path), base=path)
    if not path.exists():
        raise BadDeployment(f"{path}: no such file or folder")
    return check(read_document(path), str(path), base=path.parent)


def _relative_to(base: Path, source: str) -> str:
    """A source as the file names it, with paths taken from the file's folder."""
    head = source.rsplit(":", 1)[0] if ":" in source else source
    if ":" in source and not head.endswith(".py"):
        return source  # MODULE:ATTR
    candidate = base / head
    if candidate.exists() and not Path(head).is_absolute():
        return str(candidate) + (source[len(head) :] if ":" in source else "")
    return source


def _repository(root: Path) -> dict[str, Any]:
    """A Triton/MLServer-style model repository as a deployment document."""
    doc: dict[str, Any] = {}
    for name in DEPLOYMENT_FILES:
        if (root / name).is_file():
            doc = read_document(root / name)
            break
    declared = {
        (m.get("name"), str(m.get("version", "1"))) for m in doc.get("models") or [] if isinstance(m, dict)
    }
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        settings = loading.read_settings(folder / loading.SETTINGS_FILE) if (
            folder / loading.SETTINGS_FILE).is_file() else {}  # fmt: skip
        name = str(settings.get("name") or folder.name)
        versions = sorted(
            (p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
        )
        sources = [(v.name, str(v.relative_to(root))) for v in versions] or [
            (str(settings.get("version", "1")), folder.name)
        ]
        for version, source in sources:
            if (name, version) in declared:
                continue
            try:
                loading.resolve(str(root / source))
            except loading.BadSource as exc:
                raise BadDeployment(f"{root}: model {name!r} version {version}: {exc}") from None
            entry = {k: v for k, v in settings.items() if k in MODEL_KEYS and k not in ("name", "version")}
            found.append({"name": name, "version": version, "source": source, **entry})
        if len(sources) > 1:
            found[-1]["active"] = True  # the highest version answers
    if not found and not doc.get("models"):
        raise BadDeployment(f"{root}: no model folders (NAME/model.joblib, or NAME/1/model.onnx, ...)")
    doc["models"] = [*(doc.get("models") or []), *found]
    return doc


def app_apply_spec(app: dict[str, Any]) -> dict[str, Any]:
    """An app entry as ``ketch app apply`` takes it (keys it knows only)."""
    return {k: v for k, v in app.items() if k in APP_KEYS}


def render_values(deployment: dict[str, Any], schemas: dict[str, tuple[str, list[int]]]) -> tuple[dict, list]:
    """The Helm chart's values (deploy/helm/ketch) for a deployment, and warnings.

    ``schemas`` gives each model's (input type, input shape), for apps that do not name
    theirs. The mapping (docs/deploy.md): apps as they are; each model version a ``models``
    entry with the image of its kind (or its own ``image``: a ``ketch model build`` image),
    ``model`` its path under /models (files come from ``helm.models_volume``, mounted
    there) or its MODULE:ATTR; replicas, credits and max_batch as camelCase; the defaults'
    replicas, credits and max_batch as ``modelDefaults``.
    """
    warnings = []
    helm = deployment.get("helm") or {}
    volume = helm.get("models_volume")
    values: dict[str, Any] = {"apps": [], "models": []}
    model_defaults = {
        {"max_batch": "maxBatch"}.get(k, k): v
        for k, v in deployment["defaults"].items()
        if k in ("replicas", "credits", "max_batch")
    }
    if model_defaults:
        values["modelDefaults"] = model_defaults
    for app in deployment["apps"]:
        spec = app_apply_spec(app)
        if not spec.get("input_type") and spec.get("models"):
            kind, shape = schemas[spec["models"][0]]
            spec["input_type"] = kind
            spec.setdefault("input_shape", shape)
        values["apps"].append(spec)
    for m in deployment["models"]:
        source = loading.resolve(m["path"])
        entry: dict[str, Any] = {"name": m["name"], "version": m["version"]}
        entry["image"] = m.get("image") or IMAGES[source.kind]
        if source.kind == "python":
            where, attr = source.where.rsplit(":", 1)
            written = m["source"].rsplit(":", 1)[0]
            entry["model"] = f"/models/{written}:{attr}" if where.endswith(".py") else source.where
            in_image = not where.endswith(".py")
        else:
            entry["model"] = f"/models/{m['source'].rstrip('/')}"
            in_image = False
        built = ":" in entry["image"] or "/" in entry["image"]  # a `ketch model build` image
        if not in_image and not built:
            if volume:
                entry["volume"] = volume
            else:
                warnings.append(
                    f"model {m['name']} v{m['version']} reads {entry['model']}: set helm.models_volume "
                    f"(a volume holding it) or image (ketch model build {m['source']} --name {m['name']})"
                )
        if built:
            entry.pop("model")  # a `ketch model build` image names its model itself
        kind, shape = schemas.get(m["name"], (None, None))
        if m.get("input_type") or kind:
            entry["inputType"] = m.get("input_type") or kind
        shape = m.get("input_shape", shape)
        if shape is not None:
            entry["inputShape"] = ",".join(str(d) for d in shape)
        for key, helm_key in (("replicas", "replicas"), ("credits", "credits"), ("max_batch", "maxBatch")):
            if key in m and m[key] != deployment["defaults"].get(key):
                entry[helm_key] = m[key]
        values["models"].append(entry)
    return values, warnings
