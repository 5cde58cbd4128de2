"""Run a broker and model replicas as local processes on free loopback ports.

Used by ``ketch demo``, the benchmarks and the tests; handy in notebooks too::

    with LocalBroker() as broker, LocalModel("ketch.examples.iris:model", "iris",
                                             backend=broker.backend, replicas=2):
        ...

Each process is started by its own pid and stopped by it (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ketch import errors
from ketch.admin import Admin


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """Poll ``condition`` until it returns something truthy; raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS's pick), for a server that cannot bind port 0
    itself and report it; another process may take it before it is used, so rarely, a
    caller that fails to bind picks again."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen | None, grace_s: float) -> int | None:
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Endpoints:
    """The three addresses of a broker, from its ``endpoints`` dict."""

    endpoints: dict[str, str]

    @property
    def frontend(self) -> str:
        return self.endpoints["frontend"]

    @property
    def backend(self) -> str:
        return self.endpoints["backend"]

    @property
    def admin(self) -> str:
        return self.endpoints["admin"]


class LocalBroker(Endpoints):
    """A ``ketchd`` process bound to free ports on 127.0.0.1."""

    def __init__(
        self,
        state_path: str | None = None,
        *,
        extra_args: list[str] | None = None,
        log_path: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="ketch-")
        self.state_path = state_path or os.path.join(self._tmp.name, "state.db")
        self.extra_args = extra_args or []
        self.log_path = log_path or os.path.join(self._tmp.name, "broker.log")
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.endpoints: dict[str, str] = {}

    def start(
        self,
        *,
        frontend: str | None = None,
        backend: str | None = None,
        admin: str | None = None,
        timeout_s: float = 20,
    ) -> LocalBroker:
        """Start (or restart on the same addresses, when given) and wait until it listens."""
        ready = Path(self._tmp.name) / "ready.json"
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "ketchd",
            "--frontend",
            frontend or "tcp://127.0.0.1:*",
            "--backend",
            backend or "tcp://127.0.0.1:*",
            "--admin",
            admin or "tcp://127.0.0.1:*",
            "--state",
            self.state_path,
            "--ready-file",
            str(ready),
            "--metrics",  # a free port, not the default one (extra_args may say otherwise)
            "127.0.0.1:0",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, env={**os.environ, **(self.env or {})})
        log.close()

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"broker exited with {self.proc.returncode}; log:\n{self.log_text()[-3000:]}"
                )
            return ready.exists()

        wait_for(up, timeout_s, "the broker to listen")
        self.endpoints = {k: v for k, v in json.loads(ready.read_text()).items() if k != "pid"}
        return self

    def log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def admin_client(self, timeout_ms: float = 5000) -> Admin:
        return Admin(self.admin, timeout_ms=timeout_ms)

    def stop(self, grace_s: float = 15) -> int | None:
        return _stop(self.proc, grace_s)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, timeout_s: float = 20) -> LocalBroker:
        """Start again on the same addresses and state file (after stop or kill)."""
        return self.start(frontend=self.frontend, backend=self.backend, admin=self.admin, timeout_s=timeout_s)

    def __enter__(self) -> LocalBroker:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._tmp.cleanup()


class LocalModel:
    """``ketch model serve TARGET`` as a supervised process group of ``replicas`` replicas.

    ``admin`` is the broker's admin address, needed when ``extra_args`` set the model's
    queue policy (``--batching``, ``--batch-delay-ms``, ``--max-queue``, ``--max-batch``).
    """

    def __init__(
        self,
        target: str,
        name: str,
        *,
        backend: str,
        version: str = "1",
        replicas: int = 1,
        input_type: str = "float64",
        input_shape: str | None = None,
        supervised: bool = True,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | None = None,
        admin: str | None = None,
    ) -> None:
        cmd = "serve" if supervised else "run"
        self.argv = [
            sys.executable,
            "-m",
            "ketch.cli",
            *(["--admin", admin] if admin else []),
            "model",
            cmd,
            target,
            "--name",
            name,
            "--version",
            str(version),
            "--input-type",
            input_type,
            "--backend",
            backend,
            *(["--input-shape", input_shape] if input_shape is not None else []),
            *(["--replicas", str(replicas)] if supervised else []),
            *(extra_args or []),
        ]
        self.name, self.version, self.replicas = name, str(version), replicas
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalModel:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=out, env={**os.environ, **(self.env or {})}
        )
        if self.log_path:
            out.close()
        return self

    def wait_ready(self, admin: Admin, timeout_s: float = 30, count: int | None = None) -> None:
        """Wait until ``count`` (default: all) replicas of this version are registered."""
        want = self.replicas if count is None else count

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"model process exited with {self.proc.returncode}")
            try:
                reps = admin.replicas(self.name)
            except errors.Unavailable:
                return False
            return len([r for r in reps if r["version"] == self.version]) >= want

        wait_for(ready, timeout_s, f"{want} replicas of {self.name} v{self.version}")

    def stop(self, grace_s: float = 15) -> int | None:
        return _stop(self.proc, grace_s)

    def __enter__(self) -> LocalModel:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
