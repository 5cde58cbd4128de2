"""Tiny models for tests and benchmarks: each is a plain batch function."""

from __future__ import annotations

import os
import time
from typing import Any


def noop(inputs: list[Any]) -> list[Any]:
    """Answers 0 for every input: the cheapest possible model."""
    return [0] * len(inputs)


def total(inputs: list[Any]) -> list[float]:
    """The sum of each float array."""
    return [float(x.sum()) for x in inputs]


def echo(inputs: list[Any]) -> list[Any]:
    """Each input back, same type (str, bytes or array)."""
    return list(inputs)


def upper(inputs: list[str]) -> list[str]:
    return [s.upper() for s in inputs]


def fail(inputs: list[Any]) -> list[Any]:
    raise ValueError("this model always fails")


def fail_on_negative(inputs: list[Any]) -> list[Any]:
    """Fails the batch when any input has a negative first element."""
    if any(float(x.flat[0]) < 0 for x in inputs):
        raise ValueError("negative input")
    return [float(x.sum()) for x in inputs]


def slow(inputs: list[Any]) -> list[float]:
    """Sleeps KETCH_SLOW_MS (default 200) per batch, then sums."""
    time.sleep(float(os.environ.get("KETCH_SLOW_MS", "200")) / 1000)
    return [float(x.sum()) for x in inputs]


def overhead(inputs: list[Any]) -> list[float]:
    """A fixed cost per call plus a small cost per item, like a framework with a launch cost.

    KETCH_OVERHEAD_MS (default 2) per batch and KETCH_PER_ITEM_MS (default 0.02) per input.
    """
    time.sleep(
        (
            float(os.environ.get("KETCH_OVERHEAD_MS", "2"))
            + float(os.environ.get("KETCH_PER_ITEM_MS", "0.02")) * len(inputs)
        )
        / 1000
    )
    return [float(x.sum()) for x in inputs]
