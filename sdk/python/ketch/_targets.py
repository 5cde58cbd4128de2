"""Load a model named ``module:attr`` or ``path/to/file.py:attr`` as a batch predict."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any


def load_target(target: str) -> Any:
    """The object ``target`` names; a class or a zero-argument factory function is called.

    ``module:attr`` imports the module (the current directory is on the path);
    ``file.py:attr`` loads that file. A plain function that takes one argument is taken
    to be the batch predict itself and returned as is.
    """
    if ":" not in target:
        raise ValueError(f"{target!r}: name the model as MODULE:ATTR or FILE.py:ATTR")
    where, attr = target.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where).resolve()
        if not path.exists():
            raise ValueError(f"{where}: no such file")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        module = importlib.import_module(where)
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{where} has no attribute {attr!r}") from None
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
