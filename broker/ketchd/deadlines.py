"""Deadlines of the queries the broker holds, at millisecond resolution.

Every query is added once and leaves when its deadline passes, answered or not (an
answered one is skipped then: removing it earlier would cost a search). A heap of all of
them costs O(log n) per query for both, with n = rate x SLO: 30,000 entries at 30k q/s
with a 1 s SLO, about 6% of the broker's CPU. Here a query goes into the list of its
millisecond (O(1)); a heap holds one key per millisecond that has queries, so expiry is
amortised O(1) per query. A deadline is rounded up to its millisecond: an answer at the
deadline is never early, and at most 1 ms late, which is the resolution of the broker's
poll anyway.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any


class Deadlines:
    def __init__(self) -> None:
        self._slots: dict[int, list[Any]] = {}  # millisecond -> items due then
        self._keys: list[int] = []  # heap of the slots' milliseconds

    def add(self, deadline: float, item: Any) -> None:
        key = math.ceil(deadline * 1000)
        slot = self._slots.get(key)
        if slot is None:
            self._slots[key] = [item]
            heapq.heappush(self._keys, key)
        else:
            slot.append(item)

    def next_due(self) -> float | None:
        """When the earliest slot falls due (seconds), or None when empty."""
        return self._keys[0] / 1000 if self._keys else None

    def due(self, now: float) -> Iterator[Any]:
        """The items whose deadline is at or before ``now``, slot by slot, earliest first."""
        keys, slots = self._keys, self._slots
        while keys and keys[0] <= now * 1000:
            yield from slots.pop(heapq.heappop(keys))

    def items(self) -> Iterator[Any]:
        for slot in self._slots.values():
            yield from slot

    def __len__(self) -> int:
        return sum(map(len, self._slots.values()))
