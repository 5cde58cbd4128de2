"""Ready-made wrappers that turn common models into batch ``predict`` functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _stack(inputs: list[Any]) -> np.ndarray:
    batch = np.stack([np.asarray(x) for x in inputs])
    return batch.reshape(len(inputs), -1) if batch.ndim == 1 else batch


class SklearnModel:
    """A scikit-learn estimator: one row per input, ``method`` applied to the whole batch.

    ``method`` is ``"predict"`` (labels or values) or ``"predict_proba"`` (one
    probability vector per input).
    """

    def __init__(self, estimator: Any, method: str = "predict") -> None:
        if not hasattr(estimator, method):
            raise TypeError(f"{type(estimator).__name__} has no {method}()")
        self.estimator = estimator
        self.method = method
        self._fn = getattr(estimator, method)

    def predict(self, inputs: list[Any]) -> list[Any]:
        return list(self._fn(_stack(inputs)))


class NumpyModel:
    """A function of a stacked batch ``(n, ...) -> (n, ...)``: one output row per input."""

    def __init__(self, fn: Callable[[np.ndarray], Any]) -> None:
        self.fn = fn

    def predict(self, inputs: list[Any]) -> list[Any]:
        return list(np.asarray(self.fn(np.stack([np.asarray(x) for x in inputs]))))


def numpy_model(fn: Callable[[np.ndarray], Any]) -> NumpyModel:
    return NumpyModel(fn)
