"""What a replica serves, as a short string announced in its Hello (``Hello.fingerprint``).

The broker keys its prediction cache on it, and refuses a replica whose fingerprint differs
from the live replicas of the same model version (docs/protocol.md, Hello): changed code
under an unchanged version never answers from the old code's cached predictions.

    build:<id>           an explicit build id (``build_id=``, ``--build-id`` or $KETCH_BUILD_ID)
    sha256:<32 hex>      a digest of the source file(s) that define the model (the module of
                         its function, or of its class), the bytes of any ``files`` given
                         (weights), and, for a fitted estimator, its pickled state

What the digest cannot see (a module the model imports, weights fetched at start) changes
nothing in it: give a build id where that matters.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ketch.protocol.limits import MAX_FINGERPRINT

_CHUNK = 1 << 20


def fingerprint(
    model: Any, *, build_id: str | None = None, files: Iterable[str | os.PathLike[str]] = ()
) -> str:
    """The fingerprint of ``model`` (what ``ketch.serve`` was given), see the module docstring."""
    build_id = build_id or os.environ.get("KETCH_BUILD_ID") or None
    if build_id is not None:
        text = f"build:{build_id}"
        if len(text) > MAX_FINGERPRINT or not text.isascii() or not text.isprintable() or " " in text:
            raise ValueError(
                f"build id {build_id!r}: at most {MAX_FINGERPRINT - 6} printable ASCII characters, no space"
            )
        return text
    h = hashlib.sha256()
    seen = False
    for path in sorted({str(Path(p).resolve()) for p in (*_source_files(model), *map(str, files))}):
        h.update(path.rsplit(os.sep, 1)[-1].encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        seen = True
    if hasattr(model, "fit") and hasattr(model, "predict"):  # a fitted estimator: its learned state
        try:
            h.update(pickle.dumps(model, protocol=4))
            seen = True
        except Exception:  # not picklable: its class's source only
            pass
    return f"sha256:{h.hexdigest()[:32]}" if seen else ""


def _source_files(model: Any) -> list[str]:
    """The files of the modules defining ``model``: its function's, its method's object's class',
    its class'."""
    targets = [model]
    owner = getattr(model, "__self__", None)  # a bound method: its object
    if owner is not None:
        targets.append(owner)
    files = []
    for obj in targets:
        for candidate in (obj, type(obj)):
            module = sys.modules.get(getattr(candidate, "__module__", "") or "")
            path = getattr(module, "__file__", None)
            if path is None:
                try:
                    path = inspect.getsourcefile(candidate)
                except TypeError:
                    path = None
            if path and os.path.isfile(path):
                files.append(path)
    return files
