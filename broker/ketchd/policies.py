"""Model selection: which linked models get a query, how their answers become one reply, and
what feedback teaches.

Pure code (no sockets, no clock, no global random state: randomness comes from the
``numpy.random.Generator`` a policy holds, given to it or seeded from its ``seed`` option).
One policy object per app, owned by the broker loop; nothing here takes a lock.

Policies, chosen per app by name (``make_policy(name, **options)``):

``single``    the linked model named by ``model`` (else the first linked).
``weighted``  one model per query, drawn by configured weights (canary, A/B); with a context key
              the draw is a hash of the key, so a user stays on the same model.
``shadow``    the primary answers; every query is also sent to the shadow models, whose answers
              only feed agreement figures (``record_shadow``).
``exp3``      one model per query, drawn by Exp3 weights learned from feedback (a bandit).
``exp4``      (alias ``ensemble``) every linked model per query; the answers are combined with
              weights learned from feedback (exponential weights, "Hedge").

How the broker drives a policy (one query)
------------------------------------------
1. ``sel = policy.select(app.models, context)`` where ``app.models`` is the current list of
   linked models (never empty: an app without models is answered NO_MODEL before this) and
   ``context`` is the query's context key ("" for none). ``sel.send_to``: the models that get
   the query; ``sel.answer_from``: those whose answers may reach the caller (a shadow model is
   in ``send_to`` only); ``sel.wait_all``: when True (ensembles) the reply waits for all of
   ``answer_from`` or the app's deadline, whichever is first, and is made with the answers
   that arrived (stragglers never hold a reply); when False it goes at the first answer from
   ``answer_from`` (or at the deadline).
2. ``c = policy.combine(answers, sel.answer_from, context)`` where ``answers`` maps each model
   of ``answer_from`` that answered to its decoded output (a model that failed or missed the
   deadline is simply absent; answers from other models are ignored). ``c.output``,
   ``c.confidence``, ``c.answered``, ``c.missing`` and ``c.model`` fill the reply.
   ``policy.use_default(c)`` says whether to send the app's default instead: nothing
   answered, or a confidence under the app's ``min_confidence``.
   With one model in ``answer_from`` and ``wait_all`` False, ``combine`` returns that model's
   answer with confidence 1, so the broker may forward the payload frame undecoded and skip
   ``combine``; it must decode outputs only for ``wait_all`` selections (ensembles).
3. Shadow traffic: when the shadows have answered (or at the deadline, with those that did),
   ``policy.record_shadow(primary_answer, shadow_answers, missing)``; not called when the
   primary itself did not answer. ``record_shadow`` is a no-op for other policies.
4. Feedback (``Feedback{app, request_id, label}``): the broker keeps, for a bounded number of
   answered requests, ``(context, sel, answers)`` (answers decoded lazily is fine; answers that
   arrived after the reply may be included) and calls
   ``policy.feedback(answers, label, context, selection=sel)``. Every policy keeps per-model
   loss figures from feedback (an A/B test's result); ``exp3``/``exp4`` also learn
   (``policy.learns``). Without ``selection`` Exp3 uses the current probabilities instead of
   those the query was drawn with (slightly biased, still converges).
5. Persistence: ``policy.state()`` is a JSON-serialisable dict (options, learned weights of the
   app and of each context, figures); ``Policy.from_state(d, rng=...)`` rebuilds the policy.
   With 10,000 contexts of three models, ``state()`` takes about 2 ms and its JSON text is
   about 700 kB (10 ms to encode): take the snapshot on the loop, encode and write it off the
   loop, e.g. every N feedbacks and at shutdown. (``select`` and ``combine`` change state
   too, but only in ways a restart may lose: LRU order, the weight table following the
   linked models, figures.)
   ``policy.reconfigure(**options)`` (``app set-policy`` with the same policy) keeps what was
   learned; another policy name starts afresh from ``make_policy``.
6. ``policy.describe()`` gives options, weights and figures for ``ketch app show``.

Invalid names or options raise ``ValueError`` with a message a person can act on; so does
``select`` with no models.

Outputs, votes and means
------------------------
Answers are decoded Python values. Floating-point values (``float``, numpy floating scalars
and arrays, JSON lists of numbers that hold a float) are *numbers*; everything else (``str``,
``bytes``, ``bool``, ``int``, integer arrays, JSON objects and other lists, ``None``) is a
*label*, compared as a whole (``1`` equals ``1.0``, ``True`` does not equal ``1``, one-element
arrays compare as their item). When every answer is a number of one shape the output is the
weighted mean (same type as the heaviest answer: float, numpy scalar, array or list);
otherwise it is a weighted majority vote, the output being the winning label as answered by
the heaviest model that voted for it (a tie goes to the label whose voters come first in
``asked``).

``confidence = agreement * answered / asked`` (counts of models), in [0, 1], where agreement
is, for a vote, the weight share of the answered models that voted for the winner, and for
numbers ``1 - spread / rms``: spread is the weighted root-mean-square distance of the answers
from their mean, rms the weighted root-mean-square size of the answers (spread <= rms, so it
is in [0, 1]; 1 when all agree, 0 for answers x and -x; answers near zero look less agreeing
than the same differences far from zero).

Loss (feedback)
---------------
A number answered for a numeric label (int or float, same number of elements):
``loss = e2 / (e2 + s2)`` with ``e2`` the mean squared error and ``s2`` the square of the
``scale`` option, or by default the label's mean square (relative error; a label of exactly 0
gives loss 0 for an exact answer, else 1). An error the size of ``scale`` costs 0.5. Any
other answer: loss 0 when it equals the label (as above), else 1. Reward = 1 - loss.

Weights
-------
Learned weights live in log space, normalised after every update so the largest is 0, and
never more than ``MAX_LOG_RATIO`` below it (a weight ratio of e**20): sums cannot overflow,
and a model that gets better later is found again in bounded time (a light form of Exp3.S /
fixed share). The weight table follows the linked models: at ``select``/``combine`` a model
that is no longer linked is dropped and a newly linked model gets the mean (linear) weight of
the others.

Per-context state: with a context key and ``max_contexts > 0``, a learning policy keeps a
table per key, created as a copy of the app-wide table at the key's first feedback; a key
without a table selects with the app-wide one. Feedback updates the app-wide table and the
key's table, so new keys start from what all traffic taught. Tables are kept LRU, at most
``max_contexts`` of them (default 10,000); an evicted key starts again from the app-wide table.
``weighted`` needs no state per key: weighted rendezvous hashing of (salt, key, model) gives
each model a share equal to its weight, and moves as few keys as possible when a weight or the
model list changes (raising a canary's weight only moves users onto the canary).
"""

from __future__ import annotations

import bisect
import copy
import itertools
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import xxhash

STATE_VERSION = 1
MAX_LOG_RATIO = 20.0  # a weight is never below exp(-20) times the largest
DEFAULT_MAX_CONTEXTS = 10_000
_TWO_TO_MINUS_53 = 2.0**-53


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


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Single, Weighted, Shadow, Exp3, Exp4, Ensemble)}


def make_policy(name: str, *, rng: np.random.Generator | None = None, **options: Any) -> Policy:
    """The policy called ``name`` with ``options``; ``rng`` replaces the one seeded from ``seed``."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}: one of {', '.join(POLICIES)}")
    return cls(rng=rng, **options)
