"""A model's queue: strict priority classes, earliest deadline first within a class.

Pure code (no sockets). Entries are any objects with ``deadline``, ``priority`` and a
``queued`` field that the queue owns (0 when not queued, else the token of its heap
entry); an entry answered or taken elsewhere is taken out with ``discard`` in O(1) and
skipped when its heap entry reaches the head. The token tells an entry pushed again (a
query back from a replica that died) from the stale heap entry that ``discard`` left: only
the newest one is live, so no entry is ever taken twice.

Order (docs/protocol.md, "Priority"): a query of a higher priority is always served
before one of a lower priority; within one priority, the earliest deadline first; among
equal deadlines, the first to arrive. There is no ageing: a query of a low class that
higher classes keep behind is never held past its deadline (it is answered then, with
the app's default or ``DEADLINE``), and admission refuses at once a query that the work
already queued in its class and above would keep past its deadline
(``ketchd.overload``), so a starved class hears so at once instead of waiting.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Protocol


class Queued(Protocol):
    deadline: float
    priority: int
    queued: int


class ModelQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Any]] = []
        self._live = 0
        self._seq = itertools.count(1)  # tokens: 0 is "not queued"
        self._classes: dict[int, int] = {}  # priority -> entries of that priority queued

    def __len__(self) -> int:
        return self._live

    def push(self, item: Queued) -> None:
        token = next(self._seq)
        item.queued = token
        priority = item.priority
        heapq.heappush(self._heap, (-priority, item.deadline, token, item))
        self._live += 1
        classes = self._classes
        classes[priority] = classes.get(priority, 0) + 1

    def discard(self, item: Queued) -> None:
        if item.queued:
            item.queued = 0
            self._live -= 1
            classes = self._classes
            left = classes[item.priority] - 1
            if left:
                classes[item.priority] = left
            else:
                del classes[item.priority]

    def _skip_removed(self) -> None:
        heap = self._heap
        while heap and heap[0][3].queued != heap[0][2]:  # taken out, or pushed again since
            heapq.heappop(heap)

    def peek(self) -> Any | None:
        self._skip_removed()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Any | None:
        self._skip_removed()
        if not self._heap:
            return None
        item = heapq.heappop(self._heap)[3]
        item.queued = 0  # as discard does, inline: this is the hot path
        self._live -= 1
        classes = self._classes
        left = classes[item.priority] - 1
        if left:
            classes[item.priority] = left
        else:
            del classes[item.priority]
        return item

    def take(self, n: int) -> list[Any]:
        """Up to ``n`` entries, in queue order."""
        out: list[Any] = []
        while len(out) < n:
            item = self.pop()
            if item is None:
                break
            out.append(item)
        return out

    def take_latest(self) -> Any | None:
        """The queued entry with the latest deadline (the most time left), taken out of the
        queue; O(n), for the rare probe of a replica (``Dispatcher.probe``)."""
        best = None
        for entry in self._heap:
            item = entry[3]
            if item.queued == entry[2] and (best is None or item.deadline > best.deadline):
                best = item
        if best is not None:
            self.discard(best)
        return best

    def take_freshest(self, n: int) -> list[Any]:
        """Up to ``n`` queued entries with the most time left (of the highest priority
        first, then the latest deadline first), taken out of the queue; O(queued), for a
        slow replica of a pool, which takes what the fast ones will not reach in time
        (``ketchd.dispatch.tail_batch``)."""
        live = [entry for entry in self._heap if entry[3].queued == entry[2]]
        out = [entry[3] for entry in heapq.nlargest(n, live, key=lambda e: (-e[0], e[1]))]
        for item in out:
            self.discard(item)
        return out

    def ahead(self, priority: int) -> int:
        """Entries that are served before a new entry of ``priority`` whatever its deadline
        may be: every queued entry of that priority or a higher one (an upper bound for one
        of an early deadline, which EDF puts before some of its own class)."""
        classes = self._classes
        if len(classes) <= 1:
            return self._live if priority in classes or any(c > priority for c in classes) else 0
        return sum(n for c, n in classes.items() if c >= priority)
