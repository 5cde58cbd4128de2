"""Batch formation: when to send a batch to a replica, and how many queries to put in it.

Pure code (no sockets, no clock of its own): the broker asks ``decide`` with the state of
a model's queue and one replica's ``BatchController``, and feeds each finished batch back
through ``BatchController.observe``. Three modes, chosen per model:

``fixed``
    Always up to ``max_batch`` queries (with ``batch_delay_ms``, wait to fill it).
``aimd``
    Additive increase, multiplicative decrease, as in Clipper: the size grows by
    ``step`` while the observed latency of a batch (compute + RPC, never queue wait) stays
    under the latency budget, and shrinks by 10% when it goes over.
``model`` (the default)
    A latency model per replica: for each batch size seen, a high quantile (p95) of its
    recent latencies; a line fitted through those points predicts the latency of any
    size, and the batch is the largest size whose predicted completion meets the earliest
    deadline in the queue. Until it has points for two sizes it behaves as ``aimd``,
    which explores; it never jumps to more than twice the largest size it has seen.

The budget of a batch is the time left to the earliest deadline among the queries it
would carry, less the time the replica still needs for the batch it is computing.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

MODES = ("model", "aimd", "fixed")
REFIT_EVERY = 8  # observations between two fits of the latency model


@dataclass
class BatchPolicy:
    """A model's batching settings (queue policy as data)."""

    mode: str = "model"
    max_batch: int = 64  # hard ceiling
    batch_delay_ms: float = 0.0  # wait this long at most to fill a batch, if deadlines allow
    aimd_step: int = 2
    aimd_backoff: float = 0.9
    quantile: float = 0.95
    window: int = 32  # latencies kept per batch size
    safety: float = 0.9  # use this share of a deadline's time left

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"batching mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if self.batch_delay_ms < 0:
            raise ValueError("batch_delay_ms must be 0 or more")


@dataclass
class BatchController:
    """One replica's batch size: AIMD state and the latency model."""

    policy: BatchPolicy
    aimd_size: float = 1.0
    _samples: dict[int, deque[float]] = field(default_factory=dict)
    _fit: tuple[float, float] | None = None  # (intercept ms, ms per item)
    _fitted: bool = False  # _fit is current (None then means: fewer than two sizes)
    _largest_seen: int = 0
    _stale: int = 0  # observations since the fit was computed
    _quantiles: dict[int, tuple[float, float]] = field(default_factory=dict)  # size -> (q, value)
    _fastest: float | None = None  # fastest_ms, kept for REFIT_EVERY observations
    _fastest_age: int = 0
    _observed: int = 0  # observations in all
    _median_fit: tuple[float, float] | None = None  # (intercept, slope) through the medians
    _median_at: tuple[int, int] = (-REFIT_EVERY, 0)  # (_observed, sizes seen) when fitted

    def observe(self, size: int, latency_ms: float, budget_ms: float) -> None:
        """A batch of ``size`` took ``latency_ms`` (compute + RPC) against ``budget_ms``."""
        p = self.policy
        if latency_ms <= budget_ms:
            self.aimd_size = min(float(p.max_batch), self.aimd_size + p.aimd_step)
        else:
            self.aimd_size = max(1.0, self.aimd_size * p.aimd_backoff)
        window = self._samples.get(size)
        if window is None:
            window = self._samples[size] = deque(maxlen=p.window)
            if self._fit is None:  # a second size makes a fit possible at once
                self._fitted = False
        window.append(latency_ms)
        self._observed += 1
        self._quantiles.pop(size, None)
        self._fastest_age += 1
        if self._fastest_age >= REFIT_EVERY:  # a latency that left its window may leave the floor
            self._fastest, self._fastest_age = None, 0
        elif self._fastest is not None and latency_ms < self._fastest:
            self._fastest = latency_ms
        if size > self._largest_seen:
            self._largest_seen = size
            self._fit, self._fitted = None, False
        self._stale += 1
        if self._stale >= REFIT_EVERY:  # refitting costs ~100 us: not on every batch
            self._fit, self._fitted = None, False

    def fastest_ms(self) -> float | None:
        """The quickest recent batch of any size: an optimistic floor on any batch's latency.

        Used to give up on queries that cannot make their deadline; being optimistic keeps
        a stale, pessimistic estimate from starving the replica of the work that would
        correct it. Kept for REFIT_EVERY observations: a minimum that has left its window
        may count until then.
        """
        if self._fastest is None:
            lows = [min(w) for w in self._samples.values() if w]
            self._fastest = min(lows) if lows else None
        return self._fastest

    def typical_line(self) -> tuple[float, float] | None:
        """(intercept ms, ms per item) of a line through the medians of the sizes seen
        (refitted every REFIT_EVERY observations); flat (as long as the only size seen)
        before there are two sizes. Robust to the odd stall (a cold start, a pause of the
        machine) that the high quantile of ``fit`` carries for a whole window: within a
        size by the median, and across sizes by a Theil-Sen fit (``_robust_line``), so that
        a size seen once, in a stall, does not steepen the line (a least-squares fit
        through it did, and admission then refused at light load). None before the first
        batch."""
        if not self._samples:
            return None
        if self._observed - self._median_at[0] >= REFIT_EVERY or len(self._samples) != self._median_at[1]:
            self._median_at = (self._observed, len(self._samples))
            points = sorted((n, _quantile_of(w, 0.5), len(w)) for n, w in self._samples.items() if w)
            if len(points) < 2:
                latency = points[-1][1]
                self._median_fit = (latency, 0.0)  # flat: as long as the largest seen
            else:
                sizes = np.array([n for n, _, _ in points], dtype=float)
                lat = np.array([v for _, v, _ in points], dtype=float)
                counts = np.array([c for _, _, c in points], dtype=float)
                intercept, slope = _robust_line(sizes, lat, counts)
                intercept = max(intercept, float(lat.min()) - slope * float(sizes.min()))
                self._median_fit = (intercept, slope)
        return self._median_fit

    def typical_ms(self, size: int) -> float | None:
        """The median latency of a batch of ``size`` (``typical_line``): for throughput and
        for choosing replicas, where the high quantile of ``predict_ms`` would be needlessly
        pessimistic. None before the first batch."""
        line = self.typical_line()
        if line is None:
            return None
        return max(line[0] + line[1] * size, 1e-3)

    def serving(self, budget_ms: float) -> tuple[int, float, float] | None:
        """(batch size, its typical latency, its high-quantile latency; ms) for queries with
        ``budget_ms`` left: the largest size the policy allows whose typical latency
        (``typical_line``, extrapolated past the sizes seen: the batches of the moment may be
        small only because little was queued) fits ``budget_ms`` with the policy's safety;
        its typical latency (for throughput) and the latency model's (``predict_ms``: for
        the batch a query ends in, as the dispatcher reckons it). None until the latency
        model has seen two sizes and REFIT_EVERY batches: a figure from a first batch or two
        (a cold start, a stall) would say little."""
        if self._observed < REFIT_EVERY or len(self._samples) < 2:
            return None
        line = self.typical_line()
        assert line is not None
        a, b = line
        p = self.policy
        usable = budget_ms * p.safety
        n = p.max_batch if b <= 0 or p.mode == "fixed" else int((usable - a) / b)
        n = max(1, min(p.max_batch, n))
        typical = max(a + b * n, 1e-3)
        return n, typical, max(typical, self.predict_ms(n) or typical)

    def _quantile(self, size: int) -> float:
        """The policy's quantile of the recent latencies of ``size`` (cached until one is added)."""
        q = self.policy.quantile
        cached = self._quantiles.get(size)
        if cached is not None and cached[0] == q:
            return cached[1]
        value = _quantile_of(self._samples[size], q)
        self._quantiles[size] = (q, value)
        return value

    def quantile_points(self) -> list[tuple[int, float]]:
        return sorted((size, self._quantile(size)) for size, w in self._samples.items() if w)

    def fit(self) -> tuple[float, float] | None:
        """(intercept, slope) of latency against batch size, or None without two sizes."""
        if not self._fitted:
            self._stale = 0
            self._fitted = True
            points = self.quantile_points()
            if len(points) < 2:
                self._fit = None
                return None
            sizes = np.array([s for s, _ in points], dtype=float)
            lat = np.array([v for _, v in points], dtype=float)
            weights = np.array([len(self._samples[s]) for s, _ in points], dtype=float)
            slope, intercept = np.polyfit(sizes, lat, 1, w=np.sqrt(weights))
            # the line must not promise less than the worst small batch seen
            intercept = max(intercept, float(lat.min()) - max(slope, 0.0) * float(sizes.min()))
            self._fit = (float(intercept), max(float(slope), 1e-6))
        return self._fit

    def predict_ms(self, size: int) -> float | None:
        """Predicted latency (high quantile) of a batch of ``size``; None without data."""
        fit = self.fit()
        if fit is None:
            if not self._samples.get(size):
                return None
            return self._quantile(size)
        return fit[0] + fit[1] * size

    def size_for(self, budget_ms: float) -> int:
        """The batch size to send when the earliest deadline leaves ``budget_ms``."""
        p = self.policy
        if p.mode == "fixed":
            return p.max_batch
        aimd = max(1, min(p.max_batch, int(self.aimd_size)))
        if p.mode == "aimd":
            return aimd
        fit = self.fit()
        if fit is None:
            return aimd
        intercept, slope = fit
        ceiling = min(p.max_batch, max(2 * self._largest_seen, 2))
        usable = budget_ms * p.safety
        if math.isinf(usable):
            return ceiling
        if usable <= intercept:
            return 1
        return max(1, min(ceiling, int((usable - intercept) / slope)))

    @property
    def current_size(self) -> int:
        """The size it would choose with no deadline pressing (for figures)."""
        return self.size_for(math.inf)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])


def _robust_line(sizes: np.ndarray, latencies: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """(intercept, slope >= 0) of latency against batch size (at least two sizes): the
    Theil-Sen line, each pair of sizes weighing the product of their batch counts: the slope
    is the weighted median of the pairs' slopes, the intercept the weighted median of what
    each size leaves. One size's point, however far off, moves it no more than its
    share of the weight (a least-squares line it could tilt at will)."""
    i, j = np.triu_indices(len(sizes), 1)
    slopes = (latencies[j] - latencies[i]) / (sizes[j] - sizes[i])
    slope = max(_weighted_median(slopes, counts[i] * counts[j]), 0.0)
    return _weighted_median(latencies - slope * sizes, counts), slope


def _quantile_of(values: deque[float], q: float) -> float:
    """numpy's default ("linear") quantile, in plain Python: ~10x quicker on a short window."""
    ordered = sorted(values)
    at = q * (len(ordered) - 1)
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


@dataclass
class Decision:
    send: int  # queries to send now (0: wait)
    wait_ms: float  # when send is 0: how long to wait at most before asking again


def decide(
    controller: BatchController,
    queued: int,
    earliest_left_ms: float,
    oldest_waited_ms: float,
    replica_busy_ms: float = 0.0,
) -> Decision:
    """How many of ``queued`` queries to send to this replica now.

    ``earliest_left_ms``: time left to the earliest deadline in the queue;
    ``oldest_waited_ms``: how long the oldest queued query has waited;
    ``replica_busy_ms``: predicted time before the replica can start this batch.
    """
    if queued <= 0:
        return Decision(0, math.inf)
    p = controller.policy
    if queued == 1 and p.batch_delay_ms <= 0:
        return Decision(1, 0.0)  # whatever the size, one query is all there is to send
    budget = earliest_left_ms - replica_busy_ms
    target = controller.size_for(budget)
    if queued >= target or p.batch_delay_ms <= 0:
        return Decision(min(queued, target), 0.0)
    # fewer queued than we could send: wait to fill, while the delay and the deadline allow
    wait = p.batch_delay_ms - oldest_waited_ms
    predicted = controller.predict_ms(target) or 0.0
    slack = budget * p.safety - predicted
    wait = min(wait, slack)
    if wait <= 0:
        return Decision(queued, 0.0)
    return Decision(0, wait)
