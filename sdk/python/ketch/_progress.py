"""One status line for long work: redrawn in place on a terminal, printed at start and end
elsewhere (logs and CI stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress("waiting for 2 replicas") as p: p.update("1 of 2")``."""

    def __init__(self, what: str, *, total: float | None = None, stream: TextIO | None = None) -> None:
        self.what, self.total = what, total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last = ""
        self._drawn = 0.0

    def __enter__(self) -> Progress:
        if not self.tty:
            self.stream.write(f"{self.what} ...\n")
            self.stream.flush()
        return self

    def bar(self, done: float, width: int = 24) -> str:
        if not self.total:
            return ""
        share = max(0.0, min(1.0, done / self.total))
        full = int(share * width)
        return "[" + "#" * full + "-" * (width - full) + f"] {share * 100:3.0f}% "

    def update(self, detail: str = "", done: float | None = None) -> None:
        self._last = detail
        now = time.monotonic()
        if not self.tty or now - self._drawn < 0.1:
            return
        self._drawn = now
        bar = self.bar(done) if done is not None else ""
        line = f"{self.what}: {bar}{detail} ({now - self.started:.0f} s)"
        self.stream.write("\r\033[K" + line[:200])
        self.stream.flush()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        took = time.monotonic() - self.started
        status = "done" if exc_type is None else "stopped"
        end = f"{self.what}: {self._last + ', ' if self._last else ''}{status} in {took:.1f} s"
        self.stream.write(("\r\033[K" if self.tty else "") + end + "\n")
        self.stream.flush()
