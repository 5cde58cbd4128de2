"""``exp3`` and ``exp4`` (``ensemble``): policies whose weights are learned from feedback."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from ketchd.policies.base import (
    DEFAULT_MAX_CONTEXTS,
    MAX_LOG_RATIO,
    ModelFigures,
    Policy,
    _need,
    _number,
    _weights,
)
from ketchd.policies.combine import Selection, combine_answers

# ---------------------------------------------------------------- learned weights


class _Weights:
    """Log-weights of models, the largest 0, none below -MAX_LOG_RATIO."""

    __slots__ = ("log",)

    def __init__(self, log: Mapping[str, float] | None = None) -> None:
        self.log: dict[str, float] = dict(log or {})

    def copy(self) -> _Weights:
        return _Weights(self.log)

    def sync(self, models: list[str]) -> None:
        """Follow the linked models: drop the unlinked, give the new the mean weight."""
        log = self.log
        if len(log) == len(models) and all(m in log for m in models):
            return
        fill = _log_mean([log[m] for m in models if m in log])
        self.log = {m: log.get(m, fill) for m in models}
        self.normalise()

    def ensure(self, models: Iterable[str]) -> None:
        """Add models it lacks (at the mean weight), dropping none."""
        new = [m for m in models if m not in self.log]
        if new:
            fill = _log_mean(list(self.log.values()))
            for m in new:
                self.log[m] = fill
            self.normalise()

    def normalise(self) -> None:
        log = self.log
        if log:
            top = max(log.values())
            for m, v in log.items():
                log[m] = max(v - top, -MAX_LOG_RATIO)

    def shares(self, models: list[str]) -> list[float]:
        """Linear weights of ``models`` (all in the table), summing to 1."""
        w = [math.exp(self.log[m]) for m in models]
        total = sum(w)
        return [x / total for x in w]


def _log_mean(logs: list[float]) -> float:
    """log(mean(exp(logs))), stably; 0 for none."""
    if not logs:
        return 0.0
    top = max(logs)
    return top + math.log(sum(math.exp(v - top) for v in logs) / len(logs))


class _Learner(Policy):
    """Shared by Exp3 and Exp4: an app-wide weight table and an LRU of per-context tables."""

    learns = True
    DEFAULTS = {**Policy.DEFAULTS, "weights": None, "max_contexts": DEFAULT_MAX_CONTEXTS}

    def _configure(self, opts: dict[str, Any]) -> None:
        initial = _weights("weights", opts["weights"])
        n = opts["max_contexts"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"option max_contexts={n!r}: an integer >= 0 (0: no state per context)")
        self.max_contexts = n
        self.table = _Weights()
        if initial:
            top = max(initial.values())
            self.table.log = {m: math.log(w / top) if w > 0 else -MAX_LOG_RATIO for m, w in initial.items()}
            self.table.normalise()
        self.contexts: OrderedDict[str, _Weights] = OrderedDict()

    def _table(self, context: str, models: list[str]) -> _Weights:
        """The table to select or combine with for this context, following ``models``."""
        table = self.table
        if context and self.max_contexts:
            own = self.contexts.get(context)
            if own is not None:
                self.contexts.move_to_end(context)
                table = own
        table.sync(models)
        return table

    def _tables_to_learn(self, context: str) -> list[_Weights]:
        """The context's table (made from the app-wide one at its first feedback), then the app's."""
        if not (context and self.max_contexts):
            return [self.table]
        own = self.contexts.get(context)
        if own is None:
            own = self.contexts[context] = self.table.copy()
            if len(self.contexts) > self.max_contexts:
                self.contexts.popitem(last=False)
        else:
            self.contexts.move_to_end(context)
        return [own, self.table]

    def weights(self, context: str = "") -> dict[str, float]:
        """Normalised weights (summing to 1) of the models the table knows, for a context."""
        table = self.contexts.get(context, self.table) if context else self.table
        models = list(table.log)
        return dict(zip(models, table.shares(models), strict=True)) if models else {}

    def _state_extra(self) -> dict[str, Any]:
        return {
            "log_weights": dict(self.table.log),
            "contexts": [[k, dict(t.log)] for k, t in self.contexts.items()],  # least recent first
        }

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.table = _Weights({m: float(v) for m, v in state.get("log_weights", {}).items()})
        self.contexts = OrderedDict(
            (str(k), _Weights({m: float(v) for m, v in log.items()})) for k, log in state.get("contexts", [])
        )
        while len(self.contexts) > self.max_contexts:
            self.contexts.popitem(last=False)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        for m, w in self.weights().items():
            d["models"].setdefault(m, ModelFigures().describe())["weight"] = w
        d["contexts"] = len(self.contexts)
        return d


class Exp3(_Learner):
    """One model per query, drawn by Exp3 (Auer, Cesa-Bianchi, Freund, Schapire 2002).

    With K linked models, weights w_i and exploration ``gamma`` in (0, 1], model i is drawn
    with probability ``p_i = (1 - gamma) * w_i / sum(w) + gamma / K``. Feedback gives the drawn
    model's reward ``x = 1 - loss`` (in [0, 1]); its importance-weighted estimate
    ``xhat = x / p_i`` (p_i as it was when the query was drawn, from ``selection``) is unbiased
    for every model, so only the drawn one is updated: ``w_i *= exp(gamma * xhat / K)``.
    Every model keeps at least ``gamma / K`` of the traffic, which is what lets Exp3 notice a
    model getting better; the log-weight floor (module docstring) bounds how long that takes.
    ``weights`` sets the initial weights (default equal).
    """

    name = "exp3"
    DEFAULTS = {**_Learner.DEFAULTS, "gamma": 0.1}

    def _configure(self, opts: dict[str, Any]) -> None:
        super()._configure(opts)
        self.gamma = _number("gamma", opts["gamma"], 0.0, 1.0, lo_open=True)

    def probabilities(self, models: list[str], context: str = "") -> list[float]:
        """The chance of each of ``models`` being drawn for a query of this context."""
        shares = self._table(context, models).shares(models)
        g, k = self.gamma, len(models)
        return [(1.0 - g) * s + g / k for s in shares]

    def select(self, models: list[str], context: str = "") -> Selection:
        _need(models)
        probs = self.probabilities(models, context)
        u = self.rng.random()
        m = models[-1]
        for name, p in zip(models, probs, strict=True):
            u -= p
            if u < 0.0:
                m = name
                break
        self._served([m])
        return Selection([m], [m], False, dict(zip(models, probs, strict=True)))

    def feedback(
        self, answers: Mapping[str, Any], label: Any, context: str = "", *, selection: Selection | None = None
    ) -> None:
        losses = self._record_losses(answers, label)
        chosen = [m for m in (selection.answer_from if selection else answers) if m in losses]
        if not chosen:
            return
        if selection is not None and selection.probabilities:
            probs, k = selection.probabilities, len(selection.probabilities)
        else:  # the chances it has now, in the table this context draws from
            table = self.contexts.get(context, self.table) if context and self.max_contexts else self.table
            table.ensure(chosen)
            names = list(table.log)
            probs = dict(zip(names, self.probabilities(names, context), strict=True))
            k = len(names)
        floor = self.gamma / k  # no chance was ever below gamma / K
        step = {m: self.gamma * (1.0 - losses[m]) / max(probs.get(m, 1.0), floor) / k for m in chosen}
        for table in self._tables_to_learn(context):
            table.ensure(chosen)
            for m, s in step.items():
                table.log[m] += s
            table.normalise()


class Exp4(_Learner):
    """Every linked model answers; the answers are combined with weights learned from feedback.

    Clipper calls this ensemble policy Exp4; since every model answers every query the
    feedback is full information, so the weights follow exponential weights (Hedge,
    Freund & Schapire 1997): each model that answered is updated ``w_i *= exp(-eta * loss_i)``
    (``eta`` >= 0, the learning rate; 0 keeps the initial ``weights`` fixed). A model that did
    not answer is not updated. Labels are combined by a vote with these weights, numbers by a
    weighted mean (module docstring), per context when the context has its own table. The
    combined answer's own loss (with the weights at feedback time) is kept as a figure.
    """

    name = "exp4"
    DEFAULTS = {**_Learner.DEFAULTS, "eta": 0.2}

    def _configure(self, opts: dict[str, Any]) -> None:
        super()._configure(opts)
        self.eta = _number("eta", opts["eta"], 0.0, math.inf)
        self.combined_figures = ModelFigures()

    def select(self, models: list[str], context: str = "") -> Selection:
        _need(models)
        self._served(models)
        return Selection(list(models), list(models), True)

    def _combine_weights(self, asked: list[str], context: str) -> Mapping[str, float]:
        table = self._table(context, asked)
        return dict(zip(asked, table.shares(asked), strict=True))

    def feedback(
        self, answers: Mapping[str, Any], label: Any, context: str = "", *, selection: Selection | None = None
    ) -> None:
        if not answers:
            return
        asked = list(answers)
        table = self.contexts.get(context, self.table) if context and self.max_contexts else self.table
        table.ensure(asked)
        together = combine_answers(answers, asked, dict(zip(asked, table.shares(asked), strict=True)))
        self.combined_figures.feedback += 1
        self.combined_figures.loss_sum += self.loss(together.output, label)
        losses = self._record_losses(answers, label)
        for t in self._tables_to_learn(context):
            t.ensure(asked)
            for m, x in losses.items():
                t.log[m] -= self.eta * x
            t.normalise()

    def _state_extra(self) -> dict[str, Any]:
        return {**super()._state_extra(), "combined": self.combined_figures.to_json()}

    def _load(self, state: dict[str, Any]) -> None:
        super()._load(state)
        self.combined_figures = ModelFigures(**state.get("combined", {}))

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        c = self.combined_figures
        d["combined"] = {"feedback": c.feedback, "mean_loss": c.loss_sum / c.feedback if c.feedback else None}
        return d


class Ensemble(Exp4):
    """``exp4`` under its other name (the same policy)."""

    name = "ensemble"
