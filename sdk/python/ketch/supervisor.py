"""Run N replica processes of one model and keep them running.

A crashed replica is restarted with exponential backoff (reset once it has run for a
while). A replica whose first run ends with ``fatal_exit`` (its model does not load: a
restart would not help) stops them all, and ``run`` returns that code. SIGTERM or SIGINT
stops every replica with SIGTERM (they drain and say goodbye), then SIGKILL for any still
alive after ``grace_s``.

The supervisor imports nothing of Ketch but this module and its logging: it lives as
long as its replicas, and what they load (numpy, ZeroMQ, the model's framework) would be
paid twice. ``ketch model serve`` parses its options, then replaces itself (same pid) with

    python -m ketch.supervisor --replicas N [--fatal-exit CODE] -- REPLICA COMMAND...

so that not even the CLI stays loaded.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import structlog

from ketch import logs

log = structlog.get_logger("ketch.supervisor")


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    runs: int = 0


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        replicas: int,
        *,
        grace_s: float = 10.0,
        stable_s: float = 30.0,
        fatal_exit: int | None = None,
    ) -> None:
        self.argv = argv  # the command of one replica
        self.children = [_Child(i) for i in range(replicas)]
        self.grace_s = grace_s
        self.stable_s = stable_s
        self.fatal_exit = fatal_exit  # a first run ending so stops everything
        self._stopping = False
        self._code = 0

    def _start(self, child: _Child) -> None:
        # a restarted replica keeps its id (HOST/NAME/VERSION/PID.INDEX); two supervisors of one
        # model version (ketch up replacing a group, a second model serve) have ids of their own
        env = {**os.environ, "KETCH_REPLICA_INDEX": f"{os.getpid()}.{child.index}"}
        child.proc = subprocess.Popen(self.argv, env=env)
        child.started = time.monotonic()
        child.runs += 1
        log.info("replica started", index=child.index, pid=child.proc.pid)

    def stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        for child in self.children:
            self._start(child)
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                if child.proc is not None and child.proc.poll() is not None:
                    code = child.proc.returncode
                    lived = now - child.started
                    if code == self.fatal_exit and child.runs == 1:
                        log.error("replica cannot start; stopping", index=child.index, code=code)
                        child.proc = None
                        self._stopping, self._code = True, code
                        break
                    child.failures = 0 if lived > self.stable_s else child.failures + 1
                    delay = min(30.0, 0.5 * 2 ** max(0, child.failures - 1)) if child.failures else 0.5
                    log.warning(
                        "replica exited",
                        index=child.index,
                        code=code,
                        lived_s=round(lived, 1),
                        restart_in_s=delay,
                    )
                    child.proc = None
                    child.restart_at = now + delay
                if child.proc is None and now >= child.restart_at:
                    self._start(child)
            time.sleep(0.1)
        return self._shutdown()

    def _shutdown(self) -> int:
        live = [c.proc for c in self.children if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for proc in live:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("replica did not stop in time, killing", pid=proc.pid)
                proc.kill()
                proc.wait()
        log.info("replicas stopped", count=len(live))
        return self._code


def replica_argv(target: str, options: list[str]) -> list[str]:
    """The command line of one replica: ``ketch model run TARGET OPTIONS``."""
    return [sys.executable, "-m", "ketch.cli", "model", "run", target, *options]


def exec_supervisor(argv: list[str], replicas: int, *, fatal_exit: int | None = None) -> None:
    """Replace this process (same pid) with a supervisor of ``replicas`` runs of ``argv``."""
    cmd = [sys.executable, "-m", "ketch.supervisor", "--replicas", str(replicas)]
    if fatal_exit is not None:
        cmd += ["--fatal-exit", str(fatal_exit)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [*cmd, "--", *argv])


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ketch.supervisor", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--fatal-exit", type=int, default=None)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- the command of one replica")
    opts = parser.parse_args(args)
    argv = opts.argv[1:] if opts.argv[:1] == ["--"] else opts.argv
    if not argv or opts.replicas < 1:
        parser.error("give --replicas N (N >= 1) and, after --, the command of one replica")
    logs.configure()
    return Supervisor(argv, opts.replicas, fatal_exit=opts.fatal_exit).run()


if __name__ == "__main__":
    sys.exit(main())
