"""Memory given back to the system after a burst (glibc; elsewhere there is nothing to do).

Payload frames are malloc'd by libzmq and Python. When they are freed, glibc keeps the
memory in its heaps for reuse: it returns pages to the system only from the top of a heap,
and it raises its mmap threshold to the size of the largest block freed, so after a burst of
1 MiB payloads the next ones come from the heap too. The broker's RSS would stay at the
peak of any burst (a client's 200 MiB of queries, a refused 2 GB message) for good.

``Trimmer`` looks, at most once a second on the loop, at the process's resident size
(``/proc/self/statm``) and at the heaps' free bytes (``mallinfo2``; ~15 us each), and keeps
the lowest of each since the last trim. When the heaps hold more than ``threshold`` free and
either has grown by more than ``threshold`` over its lowest (the resident size: free memory
touched again and freed between two looks; the free bytes: memory in use at the last trim
freed since), a thread of its own asks glibc to return the free pages (``malloc_trim(0)``:
of every heap, not just their tops; tens of milliseconds for a burst of 100 MB, spent off
the loop: ctypes calls run without the GIL, and Python's small objects are not allocated
by malloc). A full cache, memory in use, is not trimmed over and over: neither figure grows.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

import structlog

log = structlog.get_logger("ketchd")


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc, or older than 2.33
        return None


class Trimmer:
    def __init__(self, threshold: int = 16 * 1024 * 1024, every_s: float = 1.0) -> None:
        self.threshold, self.every_s = threshold, every_s
        self.trims = 0
        self.returned = 0  # resident bytes given back by the trims, summed
        self._libc = _glibc()
        self._next = 0.0
        self._low_resident = 0  # the lowest seen since the last trim (0: none yet)
        self._low_free = 0
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None

    @property
    def works(self) -> bool:
        return self._libc is not None

    def start(self) -> None:
        if self._libc is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ketchd-trim", daemon=True)
            self._thread.start()

    def free_bytes(self) -> int:
        """Bytes free in malloc's heaps (0 where that cannot be known)."""
        return int(self._libc.mallinfo2().fordblks) if self._libc is not None else 0

    def resident_bytes(self) -> int:
        """The process's resident size (0 where /proc cannot tell)."""
        try:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * self._page
        except (OSError, ValueError, IndexError):
            return 0

    def check(self, now: float) -> None:
        """On the loop (housekeeping): wake the trimming thread when the heaps hold much free."""
        if now < self._next or self._thread is None:
            return
        self._next = now + self.every_s
        if self._wake.is_set():
            return
        resident, free = self.resident_bytes(), self.free_bytes()
        if not self._low_resident:
            self._low_resident, self._low_free = resident, free
        self._low_resident = min(self._low_resident, resident)
        self._low_free = min(self._low_free, free)
        grown = max(resident - self._low_resident, free - self._low_free)
        if free > self.threshold and grown > self.threshold:
            self._wake.set()

    def _run(self) -> None:
        assert self._libc is not None
        while True:
            self._wake.wait()
            if self._stop:
                return
            before = self.resident_bytes()
            t0 = time.perf_counter()
            self._libc.malloc_trim(0)
            self.trims += 1
            after = self.resident_bytes()
            self._low_resident, self._low_free = after, self.free_bytes()
            self.returned += max(0, before - after)
            log.info(
                "memory returned",
                returned_mb=round((before - after) / 2**20, 1),
                ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            self._wake.clear()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop = True
            self._wake.set()
            self._thread.join(5)
            self._thread = None
