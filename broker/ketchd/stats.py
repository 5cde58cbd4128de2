"""Figures the broker keeps: bounded latency windows with quantiles, batch sizes, and
Prometheus histograms of latencies in seconds."""

from __future__ import annotations

from array import array
from bisect import bisect_left
from typing import Any

import numpy as np


class LatencyWindow:
    """The last ``size`` latencies (ms) in a ring; quantiles computed on demand."""

    def __init__(self, size: int = 8192) -> None:
        # a plain array of doubles: writing one Python float is several times cheaper
        # than a numpy item assignment, and numpy reads it without a copy
        self._ring = array("d", bytes(8 * size))
        self._size = size
        self._n = 0

    def add(self, ms: float) -> None:
        self._ring[self._n % self._size] = ms
        self._n += 1

    def __len__(self) -> int:
        return min(self._n, self._size)

    def _values(self) -> np.ndarray:
        return np.frombuffer(self._ring, dtype=np.float64)[: len(self)]

    def quantiles(self, *qs: float) -> list[float]:
        n = len(self)
        if n == 0:
            return [0.0 for _ in qs]
        return [float(x) for x in np.quantile(self._values(), qs)]

    def summary(self) -> dict[str, float]:
        p50, p99 = self.quantiles(0.5, 0.99)
        return {"p50_ms": round(p50, 3), "p99_ms": round(p99, 3)}

    def mean(self) -> float:
        n = len(self)
        return float(self._values().mean()) if n else 0.0


class SizeHistogram:
    """Counts of batch sizes in power-of-two buckets: 1, 2, 3-4, 5-8, ..."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, size: int) -> None:
        bucket = 1 << max(0, (size - 1).bit_length())
        self.counts[bucket] = self.counts.get(bucket, 0) + 1

    def to_json(self) -> dict[str, int]:
        out = {}
        for upper in sorted(self.counts):
            lower = upper // 2 + 1 if upper > 1 else 1
            out[str(upper) if lower == upper else f"{lower}-{upper}"] = self.counts[upper]
        return out


# Prometheus buckets (upper bounds, seconds) of every latency histogram the broker keeps:
# from a tenth of a millisecond (an RPC on loopback) to 10 s (past any SLO worth the name)
LATENCY_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Histogram:
    """Latencies (seconds) counted in ``LATENCY_BUCKETS_S`` and a last one for the rest
    (+Inf), with their sum: what a Prometheus histogram exports, kept as plain counts so
    that an observation costs a bisection and two additions on the broker's loop."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS_S, seconds)] += 1  # le: a bound counts itself
        self.sum += seconds

    def to_json(self) -> dict[str, Any]:
        """Counts per bucket (not cumulative; the last is +Inf) and the sum in seconds."""
        return {"counts": list(self.counts), "sum_s": self.sum}


class Histograms:
    """Histograms by label values (a tuple), made on first use."""

    __slots__ = ("by_labels",)

    def __init__(self) -> None:
        self.by_labels: dict[tuple[str, ...], Histogram] = {}

    def get(self, *labels: str) -> Histogram:
        h = self.by_labels.get(labels)
        if h is None:
            h = self.by_labels[labels] = Histogram()
        return h

    def to_json(self, names: tuple[str, ...], **fixed: str) -> list[dict[str, Any]]:
        return [
            {**fixed, **dict(zip(names, labels, strict=True)), **h.to_json()}
            for labels, h in sorted(self.by_labels.items())
        ]
