"""``LocalGateway``: ``ketch gateway`` as a local process on a free port (tests, benchmarks).

    with LocalBroker() as broker, LocalGateway(broker.frontend, broker.admin) as gw:
        httpx.get(gw.url + "/v2/health/ready")

Started and stopped by its own pid (SIGTERM, then SIGKILL), like ``ketch.local``'s helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from ketch.local import _stop, wait_for


class LocalGateway:
    def __init__(
        self,
        frontend: str,
        admin: str,
        *,
        workers: int = 1,
        listen: str = "127.0.0.1:0",
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ketch-gateway-")
        self.ready_path = Path(self._tmp.name) / "ready.json"
        self.log_path = log_path or os.path.join(self._tmp.name, "gateway.log")
        self.argv = [
            sys.executable,
            "-m",
            "ketch.cli",
            "--admin",
            admin,
            "gateway",
            "--broker",
            frontend,
            "--listen",
            listen,
            "--workers",
            str(workers),
            "--ready-file",
            str(self.ready_path),
            *(extra_args or []),
        ]
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.grpc = ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout_s: float = 30) -> LocalGateway:
        """Start and wait until ``/v2/health/live`` answers 200."""
        self.ready_path.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(
            self.argv, stdout=log, stderr=log, env={**os.environ, **(self.env or {})}
        )
        log.close()

        def bound() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {self.proc.returncode}; log:\n{self.log_text()[-3000:]}"
                )
            return self.ready_path.exists()

        wait_for(bound, timeout_s, "the gateway to listen")
        ready = json.loads(self.ready_path.read_text())
        self.url = ready["url"]
        self.grpc = ready.get("grpc") or ""  # HOST:PORT of KServe V2 over gRPC ("" when off)

        def live() -> bool:
            bound()
            try:
                return httpx.get(self.url + "/v2/health/live", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(live, timeout_s, "the gateway to answer", interval_s=0.05)
        return self

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, grace_s: float = 15) -> int | None:
        return _stop(self.proc, grace_s)

    def __enter__(self) -> LocalGateway:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()
