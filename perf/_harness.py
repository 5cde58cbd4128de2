"""Shared pieces of the benchmarks: quantiles, tables, timing loops."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import psutil


def machine() -> str:
    return (
        f"{platform.node()}: {psutil.cpu_count(logical=True)} cpus, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
    )


def quantiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(seconds) * 1000
    if not len(arr):
        return {k: float("nan") for k in ("p50", "p90", "p99", "p999")}
    return {
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "p999": float(np.percentile(arr, 99.9)),
    }


def closed_loop_one(call: Callable[[int], Any], n: int, warmup: int = 200) -> tuple[float, list[float]]:
    """``n`` calls one at a time: (throughput per second, latencies in seconds)."""
    for i in range(warmup):
        call(i)
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        s = time.perf_counter()
        call(i)
        lat.append(time.perf_counter() - s)
    return n / (time.perf_counter() - t0), lat


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    cells = [columns] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
