"""What a model source names, and how it is loaded: one place for ``ketch serve``, ``ketch up``,
``ketch model serve|run`` and the images' entry point (``python -m ketch.container``).

A source is one of:

- ``*.joblib``, ``*.pkl``, ``*.pickle``: a pickled scikit-learn estimator (or any object
  with ``predict``), loaded with joblib. Unpickling runs code: load only files you trust.
- ``*.onnx``: an ONNX model, run by ONNX Runtime; input type and shape come from the model.
- ``*.pt``, ``*.pth``, ``*.torchscript``: a TorchScript module (``torch.jit.save``).
- a folder holding exactly one such file (or a ``model.py`` defining ``predict``), and
  optionally a settings file, ``model.toml`` (``SETTING_KEYS``: name, version, input type
  and shape, replicas, SLO, ...);
- ``MODULE:ATTR`` or ``FILE.py:ATTR``: Python code (``load_target``).

``resolve`` says which kind a source is without importing any framework; ``load`` loads it
and reports what the model says of its input (``n_features_in_``, ONNX input metadata).
Every failure is a ``BadSource`` (a ``ValueError``) whose message says what to do.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# file suffix -> kind of model
SUFFIXES = {
    ".joblib": "sklearn",
    ".pkl": "sklearn",
    ".pickle": "sklearn",
    ".onnx": "onnx",
    ".pt": "torch",
    ".pth": "torch",
    ".torchscript": "torch",
}
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
SETTINGS_FILE = "model.toml"
# what a folder's model.toml may say (the same keys as a model entry of a deployment file)
SETTING_KEYS = {
    "name": str, "version": (str, int), "input_type": str, "input_shape": list, "output": str,
    "replicas": int, "slo_ms": (int, float), "default": object, "nondeterministic": bool,
    "credits": int, "max_batch": int,
}  # fmt: skip
# the package each kind needs, and what to install for it
_NEEDS = {
    "sklearn": ("joblib", "pip install scikit-learn (or pip install 'ketch[sklearn]')"),
    "onnx": ("onnxruntime", "pip install onnxruntime (or pip install 'ketch[onnx]')"),
    "torch": ("torch", "pip install torch (or apt-get install python3-torch)"),
}


class BadSource(ValueError):
    """A model source that cannot be served, with what to do about it."""


@dataclass(frozen=True)
class ModelSource:
    """What a source names: ``kind`` is sklearn, onnx, torch or python; ``where`` a file path
    or MODULE:ATTR / FILE.py:ATTR; ``settings`` what the folder's model.toml says."""

    kind: str
    where: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def default_name(self) -> str:
        if self.settings.get("name"):
            return str(self.settings["name"])
        if self.kind == "python":
            where, attr = self.where.rsplit(":", 1)
            stem = Path(where).stem if where.endswith(".py") else where.rsplit(".", 1)[-1]
            return stem if attr in ("predict", "model") else attr
        return Path(self.where).stem

    @property
    def is_pickle(self) -> bool:
        return self.kind == "sklearn" and Path(self.where).suffix in PICKLE_SUFFIXES


def read_settings(path: Path) -> dict[str, Any]:
    """A folder's model.toml, checked against ``SETTING_KEYS``."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BadSource(f"{path}: not readable TOML ({exc})") from None
    for key, value in doc.items():
        if key not in SETTING_KEYS:
            raise BadSource(f"{path}: unknown key {key!r} (known: {', '.join(sorted(SETTING_KEYS))})")
        want = SETTING_KEYS[key]
        if want is not object and (not isinstance(value, want) or (isinstance(value, bool) and want is int)):
            raise BadSource(f"{path}: {key} = {value!r} has the wrong type")
    if "version" in doc:
        doc["version"] = str(doc["version"])
    return doc


def resolve(spec: str) -> ModelSource:
    """Which kind of model ``spec`` names (a file, a folder with one model file, or code)."""
    path = Path(spec)
    settings: dict[str, Any] = {}
    if path.is_dir():
        if (path / SETTINGS_FILE).is_file():
            settings = read_settings(path / SETTINGS_FILE)
        found = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not found and (path / "model.py").is_file():
            return ModelSource("python", f"{path / 'model.py'}:predict", settings)
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise BadSource(
                f"{spec}: a model folder holds exactly one model file "
                f"({', '.join(sorted(SUFFIXES))}) or a model.py defining predict; found {names}"
            )
        path = found[0]
    if path.suffix in SUFFIXES:
        if not path.is_file():
            raise BadSource(f"{spec}: no such file")
        return ModelSource(SUFFIXES[path.suffix], str(path), settings)
    if ":" in spec:
        where = spec.rsplit(":", 1)[0]
        if Path(where).suffix in SUFFIXES:
            raise BadSource(
                f"{spec}: {where} is a model file, not Python code: name the file alone ({where})"
            )
        return ModelSource("python", spec, settings)
    if path.suffix == ".py":
        raise BadSource(f"{spec}: name the function or object in it too, e.g. {spec}:predict")
    if path.exists():
        raise BadSource(
            f"{spec}: not a model Ketch can load; name a model file ({', '.join(sorted(SUFFIXES))}), "
            "a folder holding one, or Python code as MODULE:ATTR or FILE.py:ATTR"
        )
    raise BadSource(
        f"{spec}: no such file or folder; name a model file ({', '.join(sorted(SUFFIXES))}), "
        "a folder holding one, or Python code as MODULE:ATTR or FILE.py:ATTR"
    )


def _require(kind: str) -> None:
    module, how = _NEEDS[kind]
    if importlib.util.find_spec(module) is None:
        raise BadSource(f"serving a {kind} model needs the {module} package: {how}")


def load(
    source: ModelSource, *, output: str | None = None, input_type: str | None = None
) -> tuple[Any, dict]:
    """The model object and what it says of its input (``input_type``, ``input_shape``; None
    where it says nothing)."""
    output = output or source.settings.get("output")
    if source.kind == "sklearn":
        _require("sklearn")
        import joblib

        from ketch.models import SklearnModel

        try:
            estimator = joblib.load(source.where)
        except ModuleNotFoundError as exc:
            raise BadSource(
                f"{source.where} was pickled with a module this Python lacks ({exc.name}): "
                f"install it here (pip install {exc.name})"
            ) from None
        except Exception as exc:
            raise BadSource(f"{source.where}: not a loadable pickle ({type(exc).__name__}: {exc})") from None
        n = getattr(estimator, "n_features_in_", None)
        meta = {"input_type": "float64", "input_shape": [int(n)] if n else None}
        method = output or "predict"
        if hasattr(estimator, "fit") and hasattr(estimator, method):
            return SklearnModel(estimator, method), meta
        if output and not hasattr(estimator, output):
            raise BadSource(f"{source.where}: a {type(estimator).__name__} has no {output}()")
        if not hasattr(estimator, "predict") and not callable(estimator):
            raise BadSource(
                f"{source.where} holds a {type(estimator).__name__}: it has no predict() and is not callable"
            )
        return estimator, {"input_type": None, "input_shape": None}
    if source.kind == "onnx":
        _require("onnx")
        from ketch.models import OnnxModel

        try:
            model = OnnxModel(source.where, output=output)
        except (TypeError, ValueError) as exc:
            raise BadSource(str(exc)) from None
        except Exception as exc:  # onnxruntime's own errors
            raise BadSource(f"{source.where}: ONNX Runtime cannot load it ({exc})") from None
        return model, {"input_type": model.input_type, "input_shape": model.input_shape}
    if source.kind == "torch":
        _require("torch")
        from ketch.models import TorchScriptModel

        model = TorchScriptModel(source.where, dtype=input_type or "float32")
        return model, {"input_type": model.input_type, "input_shape": None}
    return load_target(source.where), {"input_type": None, "input_shape": None}


def load_target(target: str) -> Any:
    """The object ``target`` (``MODULE:ATTR`` or ``FILE.py:ATTR``) names; a class or a
    zero-argument factory function is called.

    ``module:attr`` imports the module (the current directory is on the path);
    ``file.py:attr`` loads that file. A plain function that takes one argument is taken
    to be the batch predict itself and returned as is.
    """
    if ":" not in target:
        raise BadSource(f"{target!r}: name the model as MODULE:ATTR or FILE.py:ATTR")
    where, attr = target.rsplit(":", 1)
    if Path(where).suffix in SUFFIXES:
        raise BadSource(f"{target}: {where} is a model file, not Python code: name the file alone ({where})")
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.is_file():
            raise BadSource(f"{where}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # so that it can import its neighbours
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name and (where == exc.name or where.startswith(exc.name + ".")):
                hint = (
                    f"; is {where.replace('.', '/')}.py in this folder? name a file as FILE.py:{attr}"
                    if "/" not in where
                    else ""
                )
                raise BadSource(f"{target}: no Python module named {where!r} on the path{hint}") from None
            raise BadSource(
                f"{target}: importing {where} needs the module {exc.name!r}: pip install {exc.name}"
            ) from None
    try:
        obj = getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
        has = ", ".join(public) or "nothing"
        raise BadSource(f"{where} has no attribute {attr!r} (it has: {has})") from None
    if inspect.isclass(obj):
        return obj()
    if inspect.isfunction(obj):
        params = [
            p
            for p in inspect.signature(obj).parameters.values()
            if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if not params:
            return obj()  # a factory
    return obj


def trust_warning(source: ModelSource) -> str | None:
    """The warning a pickle deserves (None for other kinds)."""
    if not source.is_pickle:
        return None
    return (
        f"warning: {Path(source.where).name} is a pickle: loading it runs any code it holds. "
        "Serve only files you made or trust."
    )
