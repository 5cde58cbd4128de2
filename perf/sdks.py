"""Replicas of the three SDKs side by side: Python, Java and R serving a no-op model.

    python -m perf.sdks [--rounds 3] [--duration 3] [--sdks python,java,r,r-fork,r-inline]
                        [--sparse-rate 100]

One broker process (cache off) and one replica process per SDK, each serving its own
no-op model (float64 vector in, one scalar out) behind its own app. ``r`` is the R replica
as it runs by default (``fork = "auto"``: a batch of a model known to be fast is computed in
the serving process, any other in a worker process forked once), ``r-fork`` the same with
``fork = TRUE`` (every batch in the worker), ``r-inline`` with ``fork = FALSE`` (every batch
in the serving process; no heartbeats while it computes). In alternating rounds
(python, java, r, python, java, r, ...) so that a noisy moment on a shared machine falls on
all alike, each replica gets, closed loop through ``ketch.bench``:

- c=1: one query at a time for ``--duration`` s: queries per second and p50;
- c=64: 64 queries in flight (refills in one message, as ``ketch bench`` sends them):
  queries per second, and the replica's CPU time (user + system, its reaped children
  included) per 1000 answers, read with psutil around that phase;
- sparse: Poisson arrivals at ``--sparse-rate`` (100) per second for ``--duration`` s, a
  replica idle between most queries: p50 and p99 (the "no multi-ms outliers at idle" of
  issue 20).

The Java client (``io.ketch.tools.Bench``) is measured the same way against the Python
replica, in the same rounds, as the row ``java-client`` (compare with ``python``, whose
client is ``ketch.bench``): at c=64 each answer's callback queues the next query, and the
client sends the queries queued together in one message, as ``ketch.bench`` sends its
refills. It has no replica CPU of its own.

Prints one row per SDK and round, then the median and the range over the rounds with
each SDK's ratio to Python's median. Java needs ``mvn -f sdk/java/pom.xml package``
(the shaded jar); R needs Rscript with pbdZMQ and jsonlite.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
from ketch import Admin
from ketch.bench import closed_loop, open_loop
from ketch.local import LocalBroker, wait_for

from perf._harness import machine, table

ROOT = Path(__file__).resolve().parent.parent
JAR = ROOT / "sdk" / "java" / "target" / "ketch-sdk-0.1.0-all.jar"
R_EXAMPLE = ROOT / "sdk" / "r" / "inst" / "serve_example.R"
ROUND_COLUMNS = [
    "round", "sdk", "c1_qps", "c1_p50_ms", "c1_p99_ms", "c64_qps", "cpu_ms_per_1k",
    "sparse_p50_ms", "sparse_p99_ms", "not_ok",
]  # fmt: skip
SUMMARY_COLUMNS = [
    "sdk",
    "c1_qps",
    "c1_p50_ms",
    "c64_qps",
    "cpu_ms_per_1k",
    "sparse_p50_ms",
    "sparse_p99_ms",
    "p50_x_py",
    "c64_x_py",
    "cpu_x_py",
]


def replica_argv(sdk: str, backend: str) -> list[str]:
    name = f"{sdk}-noop"
    if sdk == "python":
        return [
            sys.executable, "-m", "ketch.cli", "model", "run", "ketch.examples.basic:noop",
            "--name", name, "--version", "1", "--input-type", "float64", "--backend", backend,
        ]  # fmt: skip
    if sdk == "java":
        return [
            "java", "-cp", str(JAR), "io.ketch.examples.Serve", "--broker", backend,
            "--name", name, "--version", "1", "--kind", "noop", "--replica-id", f"bench/{name}",
        ]  # fmt: skip
    return [
        "Rscript", str(R_EXAMPLE), "--broker", backend, "--name", name, "--version", "1",
        "--kind", "noop", "--replica-id", f"bench/{name}",
        "--fork", {"r-inline": "false", "r-fork": "true"}.get(sdk, "auto"),
    ]  # fmt: skip


def available(sdk: str) -> str | None:
    """Why an SDK cannot run here, or None."""
    if sdk == "java" and (shutil.which("java") is None or not JAR.exists()):
        return f"java and {JAR.relative_to(ROOT)} (mvn -f sdk/java/pom.xml package)"
    if sdk.startswith("r") and shutil.which("Rscript") is None:
        return "Rscript"
    return None


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of a replica: its own, its live children's (R's predict worker) and
    those of its reaped children."""
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(frontend: str, sdk: str, proc: psutil.Process, duration: float, sparse_rate: float) -> dict:
    app = f"{sdk}-noop"
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=4) for _ in range(256)]

    def make_input(k: int) -> np.ndarray:
        return inputs[k % len(inputs)]

    closed_loop(frontend, app, make_input, 8, 0.5)  # warm-up (JIT, templates)
    one = closed_loop(frontend, app, make_input, 1, duration)
    before = cpu_s(proc)
    many = closed_loop(frontend, app, make_input, 64, duration)
    used = cpu_s(proc) - before
    sparse = open_loop(frontend, app, make_input, sparse_rate, duration)
    answered = many.ok + many.defaults + many.errors
    bad = one.sent - one.ok + many.sent - many.ok + sparse.sent - sparse.ok
    return {
        "sdk": sdk,
        "c1_qps": one.throughput,
        "c1_p50_ms": one.quantile(50),
        "c1_p99_ms": one.quantile(99),
        "c64_qps": many.throughput,
        "cpu_ms_per_1k": used * 1e6 / answered if answered else float("nan"),
        "sparse_p50_ms": sparse.quantile(50),
        "sparse_p99_ms": sparse.quantile(99),
        "not_ok": bad,
    }


def measure_java_client(frontend: str, duration: float) -> dict:
    """The Java client against the Python replica: c=1 and c=64, as ``measure`` does."""
    nan = float("nan")
    row: dict = {"sdk": "java-client", "c1_p99_ms": nan, "cpu_ms_per_1k": nan}
    row.update(sparse_p50_ms=nan, sparse_p99_ms=nan)
    for c in (1, 64):
        out = subprocess.run(
            ["java", "-cp", str(JAR), "io.ketch.tools.Bench", "--frontend", frontend, "--app", "python-noop",
             "--concurrency", str(c), "--duration", str(duration), "--warmup", "0.5"],
            capture_output=True, text=True, timeout=duration + 60, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if c == 1:
            row.update(c1_qps=r["qps"], c1_p50_ms=r["p50_ms"], c1_p99_ms=r["p99_ms"])
        else:
            row["c64_qps"] = r["qps"]
        row["not_ok"] = row.get("not_ok", 0) + r["sent"] - r["ok"]
    return row


def summarise(rows: list[dict], sdks: list[str]) -> list[dict]:
    keys = ("c1_qps", "c1_p50_ms", "c64_qps", "cpu_ms_per_1k", "sparse_p50_ms", "sparse_p99_ms")
    med = {s: {k: statistics.median(r[k] for r in rows if r["sdk"] == s) for k in keys} for s in sdks}
    out = []
    for s in sdks:
        mine = [r for r in rows if r["sdk"] == s]
        row: dict = {"sdk": s}
        for k in keys:
            lo, hi = min(r[k] for r in mine), max(r[k] for r in mine)
            row[k] = f"{med[s][k]:.4g} ({lo:.3g}-{hi:.3g})"
        if "python" in med and s != "python":
            base = med["python"]
            row["p50_x_py"] = med[s]["c1_p50_ms"] / base["c1_p50_ms"]
            row["c64_x_py"] = med[s]["c64_qps"] / base["c64_qps"]
            row["cpu_x_py"] = med[s]["cpu_ms_per_1k"] / base["cpu_ms_per_1k"]
        out.append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load level")
    parser.add_argument("--sdks", default="python,java,r,r-fork,r-inline")
    parser.add_argument("--sparse-rate", type=float, default=100.0, help="queries/s of the sparse level")
    parser.add_argument("--no-java-client", dest="java_client", action="store_false",
                        help="leave out the Java client's row")  # fmt: skip
    args = parser.parse_args()
    sdks = [s.strip() for s in args.sdks.split(",") if s.strip()]
    if args.java_client and "python" not in sdks:
        args.java_client = False  # it queries the Python replica
    for s in sdks + (["java"] if args.java_client else []):
        why = available(s)
        if why:
            print(f"{s}: needs {why}", file=sys.stderr)
            return 2
    print(machine())
    logs = tempfile.TemporaryDirectory(prefix="ketch-sdks-")
    procs: dict[str, subprocess.Popen] = {}
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker:
        try:
            with Admin(broker.admin) as admin:
                for s in sdks:
                    admin.create_app(
                        f"{s}-noop", input_type="float64", input_shape=[-1], slo_ms=5000,
                        models=[f"{s}-noop"], cache=False,
                    )  # fmt: skip
                    log = open(os.path.join(logs.name, f"{s}.log"), "wb")  # noqa: SIM115
                    argv = replica_argv(s, broker.backend)
                    procs[s] = subprocess.Popen(argv, stdout=log, stderr=log, cwd=ROOT)
                    log.close()
                for s in sdks:
                    wait_for(lambda s=s: admin.replicas(f"{s}-noop"), 60, f"the {s} replica")
            rows = []
            for r in range(args.rounds):
                for s in sdks:
                    proc = psutil.Process(procs[s].pid)
                    row = measure(broker.frontend, s, proc, args.duration, args.sparse_rate)
                    row["round"] = r + 1
                    rows.append(row)
                    print(table([row], ROUND_COLUMNS), flush=True)
                if args.java_client:
                    row = measure_java_client(broker.frontend, args.duration)
                    row["round"] = r + 1
                    rows.append(row)
                    print(table([row], ROUND_COLUMNS), flush=True)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.terminate()
            for p in procs.values():
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            logs.cleanup()
    print()
    print(f"median (min-max) over {args.rounds} rounds of {args.duration:g} s per level; ratios to Python's")
    names = sdks + (["java-client"] if args.java_client else [])
    print(table(summarise(rows, names), SUMMARY_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
