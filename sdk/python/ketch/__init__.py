"""Ketch: low-latency prediction serving.

Clients: ``Client``, ``AsyncClient``; control: ``Admin``; the model side: ``serve``,
``Replica`` and the wrappers in ``ketch.models``. Every error is a ``KetchError``.
"""

__version__ = "0.1.0"

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
