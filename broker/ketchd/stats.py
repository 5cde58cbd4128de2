"""Figures the broker keeps: bounded latency windows with quantiles."""

from __future__ import annotations

from array import array

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
