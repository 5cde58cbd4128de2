"""The ``Policy`` base class every selection policy derives from, its options and figures."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ketchd.policies.combine import Combined, Selection, combine_answers, loss, needs_default

STATE_VERSION = 1
MAX_LOG_RATIO = 20.0  # a weight is never below exp(-20) times the largest
DEFAULT_MAX_CONTEXTS = 10_000
_TWO_TO_MINUS_53 = 2.0**-53


# ---------------------------------------------------------------- options


def _number(
    name: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        span = f"in {lb}{lo:g}, {hi:g}{rb}" if math.isfinite(hi) else f"{'>' if lo_open else '>='} {lo:g}"
        raise ValueError(f"option {name}={value!r}: must be a number {span}")
    return float(value)


def _weights(name: str, value: Any) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise ValueError(f"option {name}: a non-empty mapping of model name to weight, got {value!r}")
    out = {}
    for model, w in value.items():
        if not isinstance(model, str):
            raise ValueError(f"option {name}: model names are strings, got {model!r}")
        out[model] = _number(f"{name}[{model!r}]", w, 0.0, math.inf)
    if not any(out.values()):
        raise ValueError(f"option {name}: at least one weight must be above 0")
    return out


def _optional_str(name: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"option {name}={value!r}: a model name (string) or nothing")
    return value


# ---------------------------------------------------------------- figures


@dataclass
class ModelFigures:
    """What one model did under this policy (app-wide, never per context)."""

    served: int = 0  # queries it was asked to answer (in answer_from)
    feedback: int = 0  # feedbacks that carried its answer
    loss_sum: float = 0.0
    compared: int = 0  # shadow: answers compared with the primary's
    agreement_sum: float = 0.0
    missing: int = 0  # shadow: queries it did not answer in time

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def describe(self) -> dict[str, Any]:
        d: dict[str, Any] = {"served": self.served, "feedback": self.feedback}
        d["mean_loss"] = self.loss_sum / self.feedback if self.feedback else None
        if self.compared or self.missing:
            d["compared"] = self.compared
            d["agreement"] = self.agreement_sum / self.compared if self.compared else None
            d["missing"] = self.missing
        return d


# ---------------------------------------------------------------- the base class


class Policy:
    """A selection policy: ``select`` / ``combine`` / ``feedback`` / ``state``.

    Options shared by all policies: ``min_confidence`` (in [0, 1]; below it the default is
    returned), ``scale`` (numeric loss scale, module docstring), ``seed`` (for the policy's own
    random generator when none is given).
    """

    name: ClassVar[str] = "policy"
    learns: ClassVar[bool] = False  # whether feedback changes the selection or the combination
    DEFAULTS: ClassVar[dict[str, Any]] = {"min_confidence": 0.0, "scale": None, "seed": None}

    def __init__(self, *, rng: np.random.Generator | None = None, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(
                f"policy {self.name!r} takes no option {unknown[0]!r} "
                f"(its options: {', '.join(sorted(self.DEFAULTS))})"
            )
        opts = {**self.DEFAULTS, **options}
        self.min_confidence = _number("min_confidence", opts["min_confidence"], 0.0, 1.0)
        self.scale = None if opts["scale"] is None else _number("scale", opts["scale"], 0.0, math.inf, True)
        seed = opts["seed"]
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"option seed={seed!r}: a non-negative integer")
        self._configure(opts)
        self._options = {k: copy.deepcopy(v) for k, v in options.items() if v != self.DEFAULTS[k]}
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.figures: dict[str, ModelFigures] = {}

    def _configure(self, opts: dict[str, Any]) -> None:
        """Validate and take the policy's own options."""

    # -- the query path

    def select(self, models: list[str], context: str = "") -> Selection:
        raise NotImplementedError

    def combine(self, answers: Mapping[str, Any], asked: list[str], context: str = "") -> Combined:
        """The reply from the answers that arrived (module docstring: votes and means)."""
        return combine_answers(answers, asked, self._combine_weights(asked, context))

    def _combine_weights(self, asked: list[str], context: str) -> Mapping[str, float] | None:
        return None

    def use_default(self, combined: Combined) -> bool:
        """True when the app's default must be returned instead of ``combined.output``."""
        return needs_default(combined, self.min_confidence)

    def record_shadow(
        self, primary_answer: Any, shadow_answers: Mapping[str, Any], missing: Iterable[str] = ()
    ) -> None:
        """Agreement of shadow models with the primary; nothing to record outside ``shadow``."""

    # -- feedback

    def loss(self, answer: Any, label: Any) -> float:
        return loss(answer, label, self.scale)

    def feedback(
        self, answers: Mapping[str, Any], label: Any, context: str = "", *, selection: Selection | None = None
    ) -> None:
        """The true ``label`` of a query whose models answered ``answers``: figures (and learning)."""
        self._record_losses(answers, label)

    def _record_losses(self, answers: Mapping[str, Any], label: Any) -> dict[str, float]:
        losses = {}
        for m, answer in answers.items():
            losses[m] = x = self.loss(answer, label)
            f = self._fig(m)
            f.feedback += 1
            f.loss_sum += x
        return losses

    def _fig(self, model: str) -> ModelFigures:
        f = self.figures.get(model)
        if f is None:
            f = self.figures[model] = ModelFigures()
        return f

    def _served(self, models: list[str]) -> None:
        figures = self.figures
        for m in models:
            f = figures.get(m)
            if f is None:
                f = figures[m] = ModelFigures()
            f.served += 1

    # -- persistence and figures

    def options(self) -> dict[str, Any]:
        """The options given that differ from the defaults (what ``make_policy`` needs again)."""
        return dict(self._options)

    def state(self) -> dict[str, Any]:
        """Everything to rebuild this policy, as JSON-serialisable values."""
        return {
            "version": STATE_VERSION,
            "policy": self.name,
            "options": self.options(),
            "figures": {m: f.to_json() for m, f in self.figures.items()},
            **self._state_extra(),
        }

    def _state_extra(self) -> dict[str, Any]:
        return {}

    def _load(self, state: dict[str, Any]) -> None:
        self.figures = {m: ModelFigures(**f) for m, f in state.get("figures", {}).items()}

    @classmethod
    def from_state(cls, state: dict[str, Any], rng: np.random.Generator | None = None) -> Policy:
        """The policy ``state()`` described (called on ``Policy``, it builds whichever kind)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"policy state version {got!r}: this broker reads version {STATE_VERSION}")
        from ketchd.policies import make_policy  # the registry imports this module

        policy = make_policy(state.get("policy", ""), rng=rng, **state.get("options", {}))
        if not isinstance(policy, cls):
            raise ValueError(f"state of a {policy.name!r} policy is not a {cls.name!r} policy")
        try:
            policy._load(state)
        except (TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"malformed {policy.name!r} policy state: {e}") from e
        return policy

    def reconfigure(self, **options: Any) -> Policy:
        """The same policy with some options changed, keeping what it learned and its figures."""
        state = self.state()
        state["options"] = {**state["options"], **options}
        return Policy.from_state(state, rng=self.rng)

    def describe(self) -> dict[str, Any]:
        """Options, weights and figures for ``ketch app show``."""
        return {
            "policy": self.name,
            "learns": self.learns,
            "options": {**self.DEFAULTS, **self._options},
            "models": {m: f.describe() for m, f in sorted(self.figures.items())},
        }


def _need(models: list[str]) -> None:
    if not models:
        raise ValueError("no model is linked to this app")
