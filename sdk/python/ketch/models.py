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


# ONNX element types (onnx.TensorProto) and ONNX Runtime's type strings -> Ketch dtypes
_ONNX_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(uint8)": "uint8", "tensor(uint16)": "uint16", "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64", "tensor(bool)": "bool", "tensor(string)": "string",
}  # fmt: skip


class OnnxModel:
    """An ONNX model run by ONNX Runtime on the CPU: the batch is stacked into the model's
    (first) input, and row ``i`` of ``output`` (default: the first output) answers input ``i``.

    ``input_type`` and ``input_shape`` are what the model declares, per item (its first
    dimension is the batch; a named or unknown dimension is -1).
    """

    def __init__(self, path: str, output: str | None = None, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        if first.type not in _ONNX_TYPES:
            raise TypeError(f"{path}: input {first.name!r} is a {first.type}, which Ketch cannot send")
        self.input_type = _ONNX_TYPES[first.type]
        self.input_shape = [d if isinstance(d, int) and d >= 0 else -1 for d in first.shape[1:]]
        names = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in names:
            raise ValueError(f"{path}: no output named {output!r} (outputs: {', '.join(names)})")
        self.output = output or names[0]
        self._np_dtype = None if self.input_type == "string" else np.dtype(self.input_type)

    def predict(self, inputs: list[Any]) -> list[Any]:
        batch = np.stack([np.asarray(x, dtype=self._np_dtype) for x in inputs])
        (out,) = self.session.run([self.output], {self.input_name: batch})
        return list(out)


class TorchScriptModel:
    """A TorchScript module (``torch.jit.save``) run on the CPU without gradients: the batch
    is stacked into one tensor of ``dtype`` and row ``i`` of the result answers input ``i``.
    Loading TorchScript runs no pickled Python code."""

    def __init__(self, path: str, dtype: str = "float32", threads: int = 1) -> None:
        import torch

        torch.set_num_threads(threads)
        self._torch = torch
        self.module = torch.jit.load(path, map_location="cpu").eval()
        self.input_type = dtype
        self._np_dtype = np.dtype(dtype)

    def predict(self, inputs: list[Any]) -> list[Any]:
        batch = self._torch.from_numpy(np.stack([np.asarray(x, dtype=self._np_dtype) for x in inputs]))
        with self._torch.no_grad():
            out = self.module(batch)
        return list(out.numpy())
