"""A model's queue: earliest deadline first, bounded, with lazy removal.

Pure code (no sockets). Entries are any objects with ``deadline``, ``priority`` and a
``queued`` flag that the queue owns; an entry answered elsewhere (at its deadline) is
taken out with ``discard`` in O(1) and skipped when it reaches the head.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Protocol


class Queued(Protocol):
    deadline: float
    priority: int
    queued: bool


class ModelQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Any]] = []
        self._live = 0
        self._seq = itertools.count()

    def __len__(self) -> int:
        return self._live

    def push(self, item: Queued) -> None:
        item.queued = True
        heapq.heappush(self._heap, (item.deadline, -item.priority, next(self._seq), item))
        self._live += 1

    def discard(self, item: Queued) -> None:
        if item.queued:
            item.queued = False
            self._live -= 1

    def _skip_removed(self) -> None:
        heap = self._heap
        while heap and not heap[0][3].queued:
            heapq.heappop(heap)

    def peek(self) -> Any | None:
        self._skip_removed()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Any | None:
        self._skip_removed()
        if not self._heap:
            return None
        item = heapq.heappop(self._heap)[3]
        item.queued = False
        self._live -= 1
        return item

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` entries, earliest deadline first."""
        out: list[Any] = []
        while len(out) < n:
            item = self.pop()
            if item is None:
                break
            out.append(item)
        return out
