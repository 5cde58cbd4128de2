"""The status file a model container keeps for its probes (``docker/ketch-probe``).

One word, ``ready`` (the broker has welcomed this replica and it is not draining),
``connecting`` or ``draining``, written atomically whenever it changes and at least every
``refresh_s`` while the runtime's heartbeat path runs, so that its age tells a liveness
probe whether the runtime is still alive (a long batch does not stop it), and a readiness
probe that a ``ready`` written long ago is stale. The Java and R SDKs write the same file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

log = structlog.get_logger("ketch.status")

READY, CONNECTING, DRAINING = "ready", "connecting", "draining"


class StatusFile:
    def __init__(self, path: str | os.PathLike | None, refresh_s: float = 1.0) -> None:
        self.path = Path(path) if path else None
        self.refresh_s = refresh_s
        self._written: str | None = None
        self._at = 0.0

    @classmethod
    def from_env(cls, path: str | None = None) -> StatusFile:
        return cls(path or os.environ.get("KETCH_STATUS_FILE") or None)

    def update(self, state: str) -> None:
        """Write ``state`` if it changed or the last write is ``refresh_s`` old."""
        if self.path is None:
            return
        now = time.monotonic()
        if state == self._written and now - self._at < self.refresh_s:
            return
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            tmp.write_text(state + "\n")
            tmp.replace(self.path)
        except OSError as exc:
            if self._written is not None or self._at == 0.0:
                log.warning("cannot write the status file", path=str(self.path), error=str(exc))
            self._written, self._at = None, now
            return
        self._written, self._at = state, now

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self._written = None
