"""``single``, ``weighted`` and ``shadow``: policies that learn nothing from feedback but figures."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Any

import xxhash

from ketchd.policies.base import _TWO_TO_MINUS_53, Policy, _need, _optional_str, _weights
from ketchd.policies.combine import Selection, agreement

# ---------------------------------------------------------------- single, weighted, shadow


class Single(Policy):
    """One model answers every query: the linked model named by ``model``, else the first linked.

    Setting the model's active version (and rolling back) is the registry's business: the
    policy names the model, the broker sends to its active version, so both are instant.
    """

    name = "single"
    DEFAULTS = {**Policy.DEFAULTS, "model": None}

    def _configure(self, opts: dict[str, Any]) -> None:
        self.model = _optional_str("model", opts["model"])

    def select(self, models: list[str], context: str = "") -> Selection:
        _need(models)
        m = self.model if self.model in models else models[0]
        self._served([m])
        return Selection([m], [m], False)


class Weighted(Policy):
    """One model per query, each with a share of traffic proportional to its weight.

    ``weights`` maps model names to non-negative weights (canary: ``{"v1": 95, "v2": 5}``;
    A/B: equal weights); without it all linked models share equally. A linked model missing
    from ``weights`` gets no traffic (linking a model never sends it traffic by surprise);
    when no linked model has a positive weight, all linked models share equally.

    Without a context key the model is drawn from the policy's generator. With one, the draw is
    weighted rendezvous hashing: each model scores ``-ln(u) / w`` with ``u`` in (0, 1) a 64-bit
    hash of (``salt``, key, model) and the lowest score wins. The scores are independent
    exponential variables of rates ``w``, so model i wins for a share ``w_i / sum(w)`` of keys;
    a key keeps its model across queries and restarts, a removed model's keys spread over the
    others, and raising one weight only moves keys onto that model. Nothing is stored per key.
    """

    name = "weighted"
    DEFAULTS = {**Policy.DEFAULTS, "weights": None, "salt": ""}

    def _configure(self, opts: dict[str, Any]) -> None:
        self.weights = _weights("weights", opts["weights"])
        if not isinstance(opts["salt"], str):
            raise ValueError(f"option salt={opts['salt']!r}: a string")
        self.salt = opts["salt"]
        self._cached: tuple[tuple[str, ...], list[str], list[float], list[float]] | None = None

    def shares(self, models: list[str]) -> dict[str, float]:
        """Each linked model's share of traffic."""
        names, w, _ = self._split(models)
        total = sum(w)
        return {m: (w[names.index(m)] / total if m in names else 0.0) for m in models}

    def _split(self, models: list[str]) -> tuple[list[str], list[float], list[float]]:
        """(models with a positive weight, their weights, cumulative weights), per model list."""
        key = tuple(models)
        c = self._cached
        if c is None or c[0] != key:
            given = self.weights
            w = [given.get(m, 0.0) for m in models] if given else [1.0] * len(models)
            if not any(x > 0 for x in w):
                w = [1.0] * len(models)
            names = [m for m, x in zip(models, w, strict=True) if x > 0]
            w = [x for x in w if x > 0]
            c = self._cached = (key, names, w, list(itertools.accumulate(w)))
        return c[1], c[2], c[3]

    def select(self, models: list[str], context: str = "") -> Selection:
        _need(models)
        names, w, cumulative = self._split(models)
        if context:
            best, best_score = names[0], math.inf
            for m, x in zip(names, w, strict=True):
                h = xxhash.xxh64_intdigest(f"{self.salt}\x00{context}\x00{m}".encode()) >> 11
                score = -math.log((h + 0.5) * _TWO_TO_MINUS_53) / x  # u in (0, 1)
                if score < best_score:
                    best, best_score = m, score
            m = best
        else:
            i = bisect.bisect_right(cumulative, self.rng.random() * cumulative[-1])
            m = names[min(i, len(names) - 1)]
        self._served([m])
        return Selection([m], [m], False)


class Shadow(Policy):
    """The primary answers every query; each query is also sent to the shadow models.

    ``primary``: the model that answers (default: the first linked, also when the named one is
    not linked). ``shadows``: the models that shadow it (default: all other linked models).
    Shadow answers never reach the caller; ``record_shadow`` compares them with the primary's
    (``agreement``: 1 or 0 for labels, ``1 - spread / rms`` for numbers) for the figures.
    """

    name = "shadow"
    DEFAULTS = {**Policy.DEFAULTS, "primary": None, "shadows": None}

    def _configure(self, opts: dict[str, Any]) -> None:
        self.primary = _optional_str("primary", opts["primary"])
        shadows = opts["shadows"]
        if shadows is not None and (
            not isinstance(shadows, list | tuple) or not all(isinstance(s, str) for s in shadows)
        ):
            raise ValueError(f"option shadows={shadows!r}: a list of model names")
        self.shadows = list(shadows) if shadows is not None else None
        self._cached: tuple[tuple[str, ...], Selection] | None = None

    def select(self, models: list[str], context: str = "") -> Selection:
        _need(models)
        key = tuple(models)
        if self._cached is None or self._cached[0] != key:
            primary = self.primary if self.primary in models else models[0]
            pool = self.shadows if self.shadows is not None else models
            shadows = [m for m in pool if m in models and m != primary]
            self._cached = (key, Selection([primary, *shadows], [primary], False))
        sel = self._cached[1]
        self._served(sel.answer_from)
        return Selection(list(sel.send_to), list(sel.answer_from), False)

    def record_shadow(
        self, primary_answer: Any, shadow_answers: Mapping[str, Any], missing: Iterable[str] = ()
    ) -> None:
        for m, answer in shadow_answers.items():
            f = self._fig(m)
            f.compared += 1
            f.agreement_sum += agreement(primary_answer, answer)
        for m in missing:
            self._fig(m).missing += 1
