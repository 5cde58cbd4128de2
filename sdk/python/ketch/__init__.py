"""Ketch: low-latency prediction serving.

Clients: ``Client``, ``AsyncClient``; control: ``Admin``; the model side: ``serve``,
``Replica`` and the wrappers in ``ketch.models``. Every error is a ``KetchError``.

The names are loaded on first use (PEP 562): ``import ketch`` alone imports nothing
else, so that a process that needs one part (the ``ketch model serve`` supervisor, the
CLI's commands) does not carry the others (numpy, ZeroMQ, a model's framework).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ketch.admin import Admin
    from ketch.client import AsyncClient, Client, Prediction
    from ketch.errors import (
        BadInput,
        Conflict,
        DeadlineExceeded,
        Invalid,
        KetchError,
        ModelError,
        NoModel,
        NotFound,
        Overloaded,
        ProtocolError,
        RequestError,
        ShuttingDown,
        Timeout,
        Unavailable,
        UnknownApp,
    )
    from ketch.models import NumpyModel, SklearnModel, numpy_model
    from ketch.runtime import Replica, serve

_WHERE = {
    "Admin": "ketch.admin",
    "AsyncClient": "ketch.client",
    "Client": "ketch.client",
    "Prediction": "ketch.client",
    "NumpyModel": "ketch.models",
    "SklearnModel": "ketch.models",
    "numpy_model": "ketch.models",
    "Replica": "ketch.runtime",
    "serve": "ketch.runtime",
    **dict.fromkeys(
        (
            "BadInput",
            "Conflict",
            "DeadlineExceeded",
            "Invalid",
            "KetchError",
            "ModelError",
            "NoModel",
            "NotFound",
            "Overloaded",
            "ProtocolError",
            "RequestError",
            "ShuttingDown",
            "Timeout",
            "Unavailable",
            "UnknownApp",
        ),
        "ketch.errors",
    ),
}

__all__ = [
    "Admin",
    "AsyncClient",
    "BadInput",
    "Client",
    "Conflict",
    "DeadlineExceeded",
    "Invalid",
    "KetchError",
    "ModelError",
    "NoModel",
    "NotFound",
    "NumpyModel",
    "Overloaded",
    "Prediction",
    "ProtocolError",
    "Replica",
    "RequestError",
    "ShuttingDown",
    "SklearnModel",
    "Timeout",
    "Unavailable",
    "UnknownApp",
    "__version__",
    "numpy_model",
    "serve",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ketch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup is a plain one
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
