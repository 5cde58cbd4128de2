"""How answers become one reply: selections, combination, agreement, loss (pure functions)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# ---------------------------------------------------------------- selections and replies


@dataclass(frozen=True, slots=True)
class Selection:
    """Where one query goes, and how its reply is made (keep it with the query for feedback)."""

    send_to: list[str]  # every model that gets the query
    answer_from: list[str]  # those whose answers may reach the caller (a subset of send_to)
    wait_all: bool  # True: reply when all of answer_from answered or at the deadline; False: first
    probabilities: dict[str, float] = field(default_factory=dict)  # exp3: chance each model had


@dataclass(frozen=True, slots=True)
class Combined:
    """The reply made from the answers that arrived."""

    output: Any  # None when nothing answered
    confidence: float  # agreement * answered / asked, in [0, 1]
    answered: list[str]
    missing: list[str]
    model: str | None = None  # whose answer the output is (None for a mean of several)


# ---------------------------------------------------------------- values


def _floats(value: Any, ints: bool = False) -> np.ndarray | None:
    """The value as a float64 array when it is a number (see the module docstring), else None.

    With ``ints``, integers count as numbers too (for labels given to a numeric answer).
    """
    if isinstance(value, bool | np.bool_):
        return None
    kinds = "fiu" if ints else "f"
    if isinstance(value, float | np.floating) or (ints and isinstance(value, int | np.integer)):
        return np.asarray(value, dtype=np.float64)
    if isinstance(value, np.ndarray):
        return value.astype(np.float64, copy=False) if value.dtype.kind in kinds else None
    if isinstance(value, list) and value:
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged
            return None
        if arr.dtype.kind in kinds and not _holds_bool(value):
            return arr.astype(np.float64, copy=False)
    return None


def _holds_bool(value: list[Any]) -> bool:
    return any(_holds_bool(v) if isinstance(v, list) else isinstance(v, bool) for v in value)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, bytes | bytearray):
        return obj.decode("latin-1")
    return repr(obj)


def label_key(value: Any) -> tuple[Any, ...]:
    """A hashable key under which equal labels meet (see the module docstring)."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", value)
    if isinstance(value, str):
        return ("s", value)
    if isinstance(value, bytes | bytearray | memoryview):
        return ("y", bytes(value))
    if value is None:
        return ("z",)
    return ("j", json.dumps(value, sort_keys=True, separators=(",", ":"), default=_json_default))


def loss(answer: Any, label: Any, scale: float | None = None) -> float:
    """A model's loss in [0, 1] for ``answer`` when the truth is ``label`` (module docstring)."""
    a = _floats(answer)
    if a is not None:
        y = _floats(label, ints=True)
        if y is not None and y.size == a.size:
            e2 = float(np.mean((a.ravel() - y.ravel()) ** 2)) if a.size else 0.0
            if not math.isfinite(e2):
                return 1.0
            s2 = scale * scale if scale else (float(np.mean(y * y)) if y.size else 0.0)
            if s2 <= 0.0:
                return 0.0 if e2 == 0.0 else 1.0
            return e2 / (e2 + s2)
    return 0.0 if label_key(answer) == label_key(label) else 1.0


def _like(template: Any, mean: np.ndarray[Any, Any] | float) -> Any:
    """The mean in the form of the answer it stands for."""
    if isinstance(template, np.ndarray):
        return np.asarray(mean).astype(template.dtype, copy=False)
    if isinstance(template, np.floating):
        return template.dtype.type(mean)
    if isinstance(template, list):
        return np.asarray(mean).tolist()
    return float(mean)


def _numeric_agreement(arrays: list[np.ndarray], shares: np.ndarray) -> tuple[np.ndarray, float]:
    """(weighted mean, 1 - spread / rms) of same-shape arrays; ``shares`` sum to 1."""
    stack = np.stack(arrays).reshape(len(arrays), -1)
    mean = shares @ stack
    if stack.shape[1] == 0:
        return mean.reshape(arrays[0].shape), 1.0
    spread2 = float(shares @ np.mean((stack - mean) ** 2, axis=1))
    rms2 = float(shares @ np.mean(stack * stack, axis=1))
    agreement = 1.0 if rms2 <= 0.0 else 1.0 - math.sqrt(max(spread2, 0.0) / rms2)
    if not math.isfinite(agreement):
        agreement = 0.0
    return mean.reshape(arrays[0].shape), min(1.0, max(0.0, agreement))


def agreement(a: Any, b: Any) -> float:
    """How much two answers agree, in [0, 1]: 1 or 0 for labels, ``1 - spread / rms`` for numbers."""
    fa, fb = _floats(a), _floats(b)
    if fa is not None and fb is not None and fa.shape == fb.shape:
        return _numeric_agreement([fa, fb], np.array([0.5, 0.5]))[1]
    return 1.0 if label_key(a) == label_key(b) else 0.0


def combine_answers(
    answers: Mapping[str, Any], asked: list[str], weights: Mapping[str, float] | None = None
) -> Combined:
    """Weighted vote or weighted mean of the answers of ``asked`` that arrived.

    ``weights`` (any non-negative scale; missing models count 0) default to equal weights;
    when the answered models weigh nothing together they count equally.
    """
    answered = [m for m in asked if m in answers]
    missing = [m for m in asked if m not in answers]
    if not answered:
        return Combined(None, 0.0, answered, missing)
    share = len(answered) / len(asked)
    if len(answered) == 1:
        return Combined(answers[answered[0]], share, answered, missing, answered[0])
    w = [float(weights.get(m, 0.0)) for m in answered] if weights is not None else [1.0] * len(answered)
    total = sum(w)
    if not total > 0.0:
        w, total = [1.0] * len(answered), float(len(answered))
    heaviest = max(range(len(answered)), key=lambda i: (w[i], -i))
    values = [answers[m] for m in answered]
    if all(isinstance(v, float | np.floating) for v in values):  # scalars: the same, without arrays
        mean = sum(x * float(v) for x, v in zip(w, values, strict=True)) / total
        spread2 = sum(x * (float(v) - mean) ** 2 for x, v in zip(w, values, strict=True)) / total
        rms2 = sum(x * float(v) ** 2 for x, v in zip(w, values, strict=True)) / total
        agree = 1.0 if rms2 <= 0.0 else 1.0 - math.sqrt(max(spread2, 0.0) / rms2)
        agree = min(1.0, max(0.0, agree)) if math.isfinite(agree) else 0.0
        return Combined(_like(values[heaviest], mean), agree * share, answered, missing, None)
    arrays = [a for a in (_floats(v) for v in values) if a is not None]
    if len(arrays) == len(values) and len({a.shape for a in arrays}) == 1:
        shares = np.asarray(w) / total
        mean_array, agree = _numeric_agreement(arrays, shares)
        return Combined(_like(values[heaviest], mean_array), agree * share, answered, missing, None)
    # weighted majority vote: key -> [weight, first position, heaviest voter, its weight]
    tally: dict[tuple[Any, ...], list[Any]] = {}
    for i, (m, v) in enumerate(zip(answered, values, strict=True)):
        key = label_key(v)
        t = tally.get(key)
        if t is None:
            tally[key] = [w[i], i, m, w[i]]
        else:
            t[0] += w[i]
            if w[i] > t[3]:
                t[2], t[3] = m, w[i]
    best = max(tally.values(), key=lambda t: (t[0], -t[1]))
    return Combined(answers[best[2]], best[0] / total * share, answered, missing, best[2])


def needs_default(combined: Combined, min_confidence: float = 0.0) -> bool:
    """True when the app's default must be sent instead: nothing answered, or too little confidence."""
    return not combined.answered or combined.confidence < min_confidence
