"""Finding, waiting for and starting brokers from the CLI (``ketch serve``, ``ketch up``, and
every command that talks to a broker).

- ``probe``: whether anything listens on a ``tcp://`` address (a refused connection is
  certain and instant, where a ZeroMQ socket would retry in silence).
- ``wait_for_broker``: the broker's status, saying "waiting for the broker at ..." while
  it is not there, for at most ``wait_s`` seconds.
- ``BrokerProcess``: ``ketch broker start`` as a child process, in the foreground's
  lifetime (``ketch serve``) or detached (``ketch up``), stopped by its pid.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ketch import errors
from ketch.admin import Admin

_PR_SET_PDEATHSIG = 1


def tcp_host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://HOST:PORT`` address; None for other transports or port ``*``."""
    if not address.startswith("tcp://"):
        return None
    host, _, port = address[len("tcp://") :].rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


def connectable(address: str) -> str:
    """An address a local peer can connect to: a wildcard bind becomes loopback."""
    hp = tcp_host_port(address)
    if hp is None:
        return address
    host, port = hp
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def probe(address: str, timeout_s: float = 0.5) -> bool | None:
    """True when something accepts TCP connections at ``address``, False when the connection
    is refused or times out, None when it is not a TCP address."""
    hp = tcp_host_port(address)
    if hp is None:
        return None
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return True
    except OSError:
        return False


def port_free(address: str) -> bool:
    """Whether a ``tcp://HOST:PORT`` address could be bound now (True for other addresses)."""
    if not address.startswith("tcp://"):
        return True
    host, _, port = address[len("tcp://") :].rpartition(":")
    if not port.isdigit() or port == "0":
        return True
    host = host.strip("[]")
    host = "" if host == "*" else host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
    return True


def broker_status(admin_address: str, timeout_ms: float = 1500) -> dict[str, Any] | None:
    """The broker's status when one answers at ``admin_address``, else None (fast when
    nothing listens there)."""
    if probe(admin_address) is False:
        return None
    try:
        with Admin(admin_address, timeout_ms=timeout_ms) as admin:
            return admin.status()
    except errors.Unavailable:
        return None


def wait_for_broker(
    admin_address: str, wait_s: float, say: Callable[[str], None], *, what: str = "the broker"
) -> dict[str, Any]:
    """The broker's status, waiting up to ``wait_s`` for it to answer; says so once while it
    waits. Raises ``errors.Unavailable`` with what to do when it never answers."""
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        status = broker_status(admin_address)
        if status is not None:
            return status
        left = deadline - time.monotonic()
        if left <= 0:
            listening = probe(admin_address)
            why = (
                "something listens there but does not answer as a Ketch broker"
                if listening
                else "nothing listens there"
            )
            raise errors.Unavailable(
                f"no broker at {admin_address} ({why}).\n"
                "  start one: ketch broker start   (or serve a model with a broker: ketch serve FILE)\n"
                "  another broker: --admin ADDRESS or KETCH_ADMIN; --broker-wait S waits for one"
            )
        if not said:
            say(f"waiting for {what} at {admin_address} (up to {wait_s:g} s; start one: ketch broker start)")
            said = True
        time.sleep(min(0.25, max(0.0, left)))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the child gets SIGTERM when the process that started it dies (even by SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class BrokerProcess:
    """``ketch broker start`` (with its HTTP gateway unless ``http`` is None) as a child.

    ``detached``: in a session of its own that outlives this process (``ketch up``);
    otherwise in a process group of its own (so the terminal's Ctrl-C reaches only the
    parent, which stops it last) that dies with this process.
    """

    def __init__(
        self,
        *,
        frontend: str,
        backend: str,
        admin: str,
        state: str,
        http: str | None,
        log_path: str,
        ready_path: str,
        detached: bool = False,
        extra: list[str] | None = None,
    ) -> None:
        self.addresses = {"frontend": frontend, "backend": backend, "admin": admin}
        self.state, self.http = state, http
        self.log_path, self.ready_path = log_path, Path(ready_path)
        self.detached = detached
        self.extra = extra or []
        self.proc: subprocess.Popen | None = None
        self.endpoints: dict[str, str] = {}

    def busy_addresses(self) -> list[str]:
        """The addresses this broker would bind that another program holds."""
        wanted = [*self.addresses.values()]
        if self.http:
            wanted.append(f"tcp://{self.http}")
        return [a for a in wanted if not port_free(a)]

    def start(self, timeout_s: float = 30) -> dict[str, str]:
        """Start and wait until it listens; the bound endpoints. Raises RuntimeError with the
        broker's own last words when it fails."""
        self.ready_path.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "ketch.cli", "broker", "start",
            "--frontend", self.addresses["frontend"], "--backend", self.addresses["backend"],
            "--admin", self.addresses["admin"], "--state", self.state,
            "--ready-file", str(self.ready_path), *self.extra,
        ]  # fmt: skip
        argv += ["--http", self.http] if self.http else ["--no-http"]
        Path(self.log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            options: dict[str, Any] = (
                {"start_new_session": True}
                if self.detached
                else {"process_group": 0, "preexec_fn": _die_with_parent}
            )
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, **options)
        deadline = time.monotonic() + timeout_s
        while not self.ready_path.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the broker exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the broker did not listen within {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.05)
        self.endpoints = {k: v for k, v in json.loads(self.ready_path.read_text()).items() if k != "pid"}
        return self.endpoints

    def start_or_explain(self, busy_advice: str) -> dict[str, str]:
        """``start`` with progress on stderr; a ``click.ClickException`` that says what to do
        (``busy_advice`` when an address is taken, else the broker's last words) if it fails."""
        import click

        from ketch._progress import Progress

        busy = self.busy_addresses()
        if busy:
            raise click.ClickException(
                f"cannot start a broker: {', '.join(busy)} in use by another program{busy_advice}"
            )
        with Progress("starting a broker"):
            try:
                return self.start()
            except RuntimeError as exc:
                raise click.ClickException(str(exc)) from None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = Path(self.log_path).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("  " + line for line in text[-lines:])

    def stop(self, grace_s: float = 15) -> int | None:
        return stop_pid(self.proc.pid, grace_s, self.proc) if self.proc is not None else None


def stop_pid(pid: int, grace_s: float, proc: subprocess.Popen | None = None) -> int | None:
    """SIGTERM ``pid``, SIGKILL after ``grace_s``; its exit code when it is our child."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return proc.wait() if proc is not None else None
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                return proc.returncode
        elif not pid_alive(pid):
            return None
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return proc.wait() if proc is not None else None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child of ours counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def replica_command(
    source: str,
    *,
    name: str,
    version: str,
    backend: str,
    input_type: str | None = None,
    input_shape: list[int] | None = None,
    output: str | None = None,
    credits: int = 2,
    max_batch: int = 0,
    nondeterministic: bool = False,
) -> list[str]:
    """The command line of one replica of ``source`` (a file, a folder or code):
    ``python -m ketch.container``, the images' entry point, so loading is the same."""
    argv = [
        sys.executable, "-m", "ketch.container", source, "--name", name, "--version", str(version),
        "--backend", backend, "--credits", str(credits), "--max-batch", str(max_batch),
    ]  # fmt: skip
    if input_type:
        argv += ["--input-type", input_type]
    if input_shape is not None:
        argv += ["--input-shape", ",".join(str(d) for d in input_shape) or "scalar"]
    if output:
        argv += ["--output", output]
    if nondeterministic:
        argv.append("--nondeterministic")
    return argv


def live_replicas(admin: Admin, model: str, version: str) -> int:
    """Replicas of ``model`` ``version`` that the broker can send work to now."""
    try:
        reps = admin.replicas(model)
    except errors.Unavailable:
        return 0
    return sum(1 for r in reps if r["version"] == version and r["state"] in ("ready", "busy"))
