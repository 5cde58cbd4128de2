"""Scheduling under stress: mixed-speed pools, a replica killed under load, a 10x flood.

    python -m perf.scheduling [--scenario mixed,polyglot,kill,overload] [--quick]

Every figure is a ratio against a bound measured in the same run, on the same broker:

``mixed``
    One model, two Python replicas of ``ketch.examples.basic:overhead`` (a sleep per batch
    and per query, so their speeds do not depend on who else wants the CPU): a fast one
    (2 ms + 0.1 ms per query) and one 10x slower (20 ms + 1 ms per query). Each alone is
    driven in closed loop with no deadline pressure (its capacity, measured just before);
    then both, joined in one order and then the other, are offered open-loop Poisson load
    at the sum of the two capacities, at an SLO the fast one alone meets (100 ms). Target:
    predictions within the SLO per second >= 90% of that sum, defaults < 1% (queries
    refused OVERLOADED are counted apart).
``polyglot``
    The same with a Java (``perf/SleepySum.java``, compiled against the SDK's jar), a
    Python and an R replica (``sdk/r/inst/serve_example.R --delay-ms --delay-per-item-ms``) of one model (the
    sum of a vector), each with its own speed (POLYGLOT), joined in one order and the other.
``kill``
    Two Python replicas under open-loop load (40% of the pool's capacity); the one holding
    batches is killed with SIGKILL. Target: its queries in flight are re-queued within
    100 ms (from the broker's log: when it saw the replica leave, against when the signal
    was sent), none is lost, and the p99 of the extra latency of the queries in flight at
    the kill is <= 100 ms + the model's compute time.
``overload``
    One replica; its capacity (predictions within the SLO per second) is measured in closed
    loop; then open-loop Poisson load at 10x that for FLOOD seconds. Target: predictions
    within the SLO per second >= 90% of the capacity, the rest refused with OVERLOADED at
    once (p99 of the refusals' round trip < 5 ms), and normal service (every query a
    prediction within the SLO) from 1 s after the flood.

Prints one table row per scenario run, with its figures and whether each target is met.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from ketch import Admin
from ketch.bench import LoadResult, _measuring, _Session, closed_loop, open_loop
from ketch.local import LocalBroker, wait_for
from ketch.protocol import ErrorCode

from perf._harness import machine, table

ROOT = Path(__file__).resolve().parent.parent
JAR = ROOT / "sdk" / "java" / "target" / "ketch-sdk-0.1.0-all.jar"
WIDTH = 4
INPUTS = np.random.default_rng(7).normal(size=(4096, WIDTH))


def make_input(k: int) -> np.ndarray:
    return INPUTS[k % len(INPUTS)]


# ------------------------------------------------------------------ replicas as processes


class Replicas:
    """Replica processes of any SDK, each started and stopped by its pid."""

    def __init__(self, backend: str, logs: Path) -> None:
        self.backend, self.logs = backend, logs
        self.procs: dict[str, subprocess.Popen] = {}
        self._java_classes: Path | None = None

    def start(
        self, sdk: str, model: str, rid: str, *, per_batch_ms: float = 0.0, per_item_ms: float = 0.0
    ) -> None:
        # every member serves the same function (a sum) under one version: one build id, so
        # the broker's fingerprint check lets the three languages' code serve it together
        env = dict(os.environ, KETCH_BUILD_ID=f"perf-scheduling-{model}")
        if sdk == "python":
            env.update(
                KETCH_REPLICA_INDEX=rid,
                KETCH_OVERHEAD_MS=str(per_batch_ms),
                KETCH_PER_ITEM_MS=str(per_item_ms),
            )
            argv = [sys.executable, "-m", "ketch.cli", "model", "run", "ketch.examples.basic:overhead",
                    "--name", model, "--backend", self.backend, "--input-shape", "-1"]  # fmt: skip
        elif sdk == "java":
            argv = ["java", "-cp", f"{JAR}{os.pathsep}{self.java_classes()}", "SleepySum",
                    self.backend, model, rid, str(per_batch_ms), str(per_item_ms)]  # fmt: skip
        elif sdk == "r":
            argv = ["Rscript", str(ROOT / "sdk" / "r" / "inst" / "serve_example.R"), "--broker", self.backend,
                    "--name", model, "--version", "1", "--kind", "sum", "--replica-id", rid,
                    "--delay-ms", str(per_batch_ms), "--delay-per-item-ms", str(per_item_ms)]  # fmt: skip
        else:
            raise ValueError(sdk)
        log = open(self.logs / f"{rid}.log", "ab")  # noqa: SIM115 (the child holds it)
        self.procs[rid] = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=ROOT)
        log.close()

    def java_classes(self) -> Path:
        """perf/SleepySum.java compiled against the SDK's jar, once."""
        if self._java_classes is None:
            out = self.logs / "java-classes"
            out.mkdir(exist_ok=True)
            subprocess.run(
                ["javac", "-cp", str(JAR), "-d", str(out), str(ROOT / "perf" / "SleepySum.java")], check=True
            )
            self._java_classes = out
        return self._java_classes

    def pid(self, rid: str) -> int:
        return self.procs[rid].pid

    def stop(self, rid: str, grace_s: float = 10.0) -> None:
        proc = self.procs.pop(rid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT if "r-" in rid else signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop_all(self) -> None:
        for rid in list(self.procs):
            self.stop(rid)


def wait_replicas(admin: Admin, model: str, rids: set[str], timeout_s: float = 90) -> None:
    def ready() -> bool:
        return rids <= {r["replica_id"].rsplit("/", 1)[-1] for r in admin.replicas(model)}

    wait_for(ready, timeout_s, f"replicas {sorted(rids)} of {model}")


def items_by_replica(admin: Admin, model: str, what: str = "items") -> dict[str, int]:
    return {r["replica_id"].rsplit("/", 1)[-1]: r[what] for r in admin.replicas(model)}


@contextmanager
def broker_and_replicas(*extra: str) -> Iterator[tuple[LocalBroker, Admin, Replicas]]:
    with tempfile.TemporaryDirectory(prefix="ketch-sched-") as tmp:
        broker = LocalBroker(extra_args=["--cache-mb", "0", *extra], log_path=os.path.join(tmp, "broker.log"))
        broker.start()
        replicas = Replicas(broker.backend, Path(tmp))
        admin = broker.admin_client(timeout_ms=20_000)
        try:
            yield broker, admin, replicas
        finally:
            replicas.stop_all()
            admin.close()
            broker.stop()


# ------------------------------------------------------------------ mixed pools


def capacity(frontend: str, app: str, concurrency: int, duration: float) -> float:
    """Predictions per second in closed loop with no deadline pressure (10 s timeouts)."""
    closed_loop(frontend, app, make_input, concurrency, 1.0, timeout_ms=10_000)  # warm-up
    return closed_loop(frontend, app, make_input, concurrency, duration, timeout_ms=10_000).throughput


def pool_run(
    name: str,
    members: list[tuple[str, str, float, float]],  # (sdk, replica id, ms per batch, ms per query)
    slo_ms: float,
    concurrency: int,
    duration: float,
) -> list[dict[str, Any]]:
    """For each join order (as given, then reversed): each member's capacity alone, just
    before (closed loop, no deadline pressure), then the pool joined in that order, offered
    open-loop Poisson load at the sum of those capacities; the figure is the predictions
    within the SLO per second, over that sum."""
    rows = []
    with broker_and_replicas() as (broker, admin, replicas):
        model = app = "pool"
        admin.create_app(
            app,
            input_type="float64",
            input_shape=[WIDTH],
            slo_ms=slo_ms,
            default=0,
            models=[model],
            cache=False,
        )

        def start(order: list[tuple[str, str, float, float]]) -> None:
            for sdk, rid, per_batch, per_item in order:  # joined one after the other
                replicas.start(sdk, model, rid, per_batch_ms=per_batch, per_item_ms=per_item)
                wait_replicas(admin, model, {rid})

        def stop(order: list[tuple[str, str, float, float]]) -> None:
            for _, rid, _, _ in order:
                replicas.stop(rid)
            wait_for(lambda: not admin.replicas(model), 30, "the replicas to leave")

        for order in (members, members[::-1]):
            caps = {}
            for member in order:
                start([member])
                caps[member[1]] = capacity(broker.frontend, app, concurrency, duration)
                stop([member])
            bound = sum(caps.values())
            start(order)
            open_loop(broker.frontend, app, make_input, bound / 2, 3.0, seed=11)  # warm-up (JIT, batches)
            before, late_before = items_by_replica(admin, model), items_by_replica(admin, model, "late")
            res = open_loop(broker.frontend, app, make_input, bound, duration, seed=12)
            after, late_after = items_by_replica(admin, model), items_by_replica(admin, model, "late")
            figures = admin.show_model(model)["figures"]
            measured, spread = figures["capacity_measured"], figures["capacity_spread"]
            stop(order)
            done = {rid: after.get(rid, 0) - before.get(rid, 0) for rid in after}
            total = max(1, sum(done.values()))
            good = goodput(res, slo_ms)
            ratio = good / bound
            defaults = res.defaults / max(1, res.sent)
            refused = res.error_codes.get("OVERLOADED", 0) / max(1, res.sent)
            rows.append(
                {
                    "scenario": f"{name}: {' then '.join(r for _, r, _, _ in order)}",
                    "figure": f"offered {bound:.0f}/s (alone: "
                    + " + ".join(f"{rid} {c:.0f}" for rid, c in caps.items())
                    + f"), within SLO {good:.0f}/s; defaults {100 * defaults:.2f}%, refused "
                    f"{100 * refused:.2f}% (admission at {measured:.2f} of its estimate, spread "
                    f"{spread:.2f}); "
                    f"p99 {res.quantile(99, ok_only=True):.1f} ms; "
                    + "; ".join(
                        f"{rid} took {100 * n / total:.0f}% ({late_after[rid] - late_before.get(rid, 0)} late)"  # noqa: E501
                        for rid, n in done.items()
                    )
                    + "".join(f"; default '{why}' {n}" for why, n in res.default_reasons.items()),
                    "ratio": f"{ratio:.3f}",
                    "target": ">= 0.9, defaults < 1%",
                    "met": "yes" if ratio >= 0.9 and defaults < 0.01 and not res.lost else "NO",
                }
            )
            print(f"  {rows[-1]}", flush=True)
    return rows


MIXED = [("python", "fast", 2.0, 0.1), ("python", "slow", 20.0, 1.0)]
# Java fastest, Python 3x slower, R 10x slower (per batch and per query); their sum, about
# 6,200 queries/s, is what the broker and the load generator can carry on two cores beside
# three replicas (at Java 2 + 0.1 ms/query the sum was 10,500/s: the machine, not the
# policy, then set the figure)
POLYGLOT = [("java", "java", 2.0, 0.2), ("python", "python", 6.0, 0.6), ("r", "r-slow", 20.0, 2.0)]


# ------------------------------------------------------------------ a replica killed


class _Timed(_Session):
    """Also keeps when each query was sent and answered."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.sent_at: dict[int, float] = {}
        self.done_at: dict[int, float] = {}

    def send(self, inputs: list[Any], at: list[float]) -> None:
        first = self._ids + 1
        super().send(inputs, at)
        for rid, t in zip(range(first, first + len(inputs)), at, strict=True):
            self.sent_at[rid] = t

    def _latency(self, rid: int, now: float) -> float | None:
        ms = super()._latency(rid, now)
        if ms is not None:
            self.done_at[rid] = now
        return ms


def drive(
    session: _Timed, rate: float, n: int, seed: int, tick: Callable[[float], None] | None = None
) -> float:
    """Open-loop Poisson arrivals at ``rate`` on ``session``, ``n`` queries, each message
    with those due; ``tick(seconds since the start)`` is called at every turn. Returns the
    start (perf_counter); the session's elapsed time is set."""
    arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, size=n))
    t0 = time.perf_counter()
    i = 0
    while i < n:
        now = time.perf_counter()
        due = i
        while due < n and t0 + arrivals[due] <= now:
            due += 1
        if due > i:
            session.send([make_input(k) for k in range(i, due)], [t0 + arrivals[k] for k in range(i, due)])
            i = due
        if tick is not None:
            tick(now - t0)
        wait_ms = ((t0 + arrivals[i]) - time.perf_counter()) * 1000 if i < n else 0
        session.receive(max(0.0, wait_ms))
    session.result.elapsed_s = time.perf_counter() - t0
    return t0


def broker_events(log_path: str, event: str) -> list[dict[str, Any]]:
    out = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == event:
            out.append(rec)
    return out


def kill_run(duration: float) -> list[dict[str, Any]]:
    rows = []
    per_batch, per_item = 5.0, 0.2
    with broker_and_replicas() as (broker, admin, replicas):
        admin.create_app(
            "pool", input_type="float64", input_shape=[WIDTH], slo_ms=2000, default=0, models=["pool"]
        )
        for rid in ("a", "b"):
            replicas.start("python", "pool", rid, per_batch_ms=per_batch, per_item_ms=per_item)
        wait_replicas(admin, "pool", {"a", "b"})
        cap = 2 * 64 / (per_batch + 64 * per_item) * 1000
        rate = 0.4 * cap
        closed_loop(broker.frontend, "pool", make_input, 64, 1.0)  # warm-up
        session = _Timed(broker.frontend, "pool", None)
        n = int(rate * duration)
        killed_at = None
        victim = None

        def kill(elapsed: float) -> None:
            nonlocal killed_at, victim
            if killed_at is None and elapsed > duration / 2:
                held = {r["replica_id"].rsplit("/", 1)[-1]: r["inflight"] for r in admin.replicas("pool")}
                if any(held.values()):
                    victim = max(held, key=lambda k: held[k])
                    killed_at = time.perf_counter()
                    os.kill(replicas.pid(victim), signal.SIGKILL)

        with contextlib.closing(session), _measuring():
            wall_minus_perf = time.time() - time.perf_counter()  # the broker logs wall clock
            drive(session, rate, n, 3, kill)
            session.drain(10.0)
        replicas.procs.pop(victim or "", None)
        res = session.result
        assert killed_at is not None, "no replica held a batch to kill"
        left = [
            e
            for e in broker_events(broker.log_path, "replica left")
            if e.get("reason") == "connection closed"
        ]
        seen = (
            datetime.fromisoformat(left[0]["timestamp"].replace("Z", "+00:00")).timestamp() if left else None
        )
        detect_ms = (seen - (wall_minus_perf + killed_at)) * 1000 if seen is not None else float("nan")
        requeued = left[0].get("requeued", 0) if left else 0
        # the queries in flight at the kill: sent before it, answered after it
        extra = [
            (session.done_at[r] - killed_at) * 1000
            for r, t in session.sent_at.items()
            if t < killed_at and session.done_at.get(r, 0) > killed_at
        ]
        compute = max(r["compute_ms"].get("p99_ms", 0.0) for r in admin.replicas("pool"))
        p99_extra = float(np.percentile(extra, 99)) if extra else float("nan")
        ok = detect_ms <= 100 and res.lost == 0 and res.errors == 0 and p99_extra <= 100 + compute + 20
        rows.append(
            {
                "scenario": f"kill: SIGKILL of a replica holding {requeued} queries, "
                f"2 Python replicas, {rate:.0f} q/s",
                "figure": f"seen gone {detect_ms:.1f} ms after the signal; requeued {requeued}; "
                f"lost {res.lost}; errors {res.errors}; defaults {res.defaults}; "
                f"p99 extra latency of the {len(extra)} in flight {p99_extra:.1f} ms "
                f"(compute p99 {compute:.1f} ms)",
                "ratio": f"{detect_ms:.1f} ms",
                "target": "<= 100 ms, 0 lost",
                "met": "yes" if ok else "NO",
            }
        )
        print(f"  {rows[-1]}", flush=True)
    return rows


# ------------------------------------------------------------------ 10x overload


def goodput(res: LoadResult, slo_ms: float) -> float:
    return sum(1 for v in res.ok_latencies_ms if v <= slo_ms) / res.elapsed_s if res.elapsed_s else 0.0


class _Refusals(_Timed):
    """Also keeps the round trip of each OVERLOADED answer."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.refused_ms: list[float] = []

    def _errored(self, code: int, ms: float) -> None:
        if code == ErrorCode.OVERLOADED:
            self.refused_ms.append(ms)


def overload_run(
    flood_s: float, per_batch: float = 2.0, per_item: float = 3.0, slo_ms: float = 100.0
) -> list[dict]:
    rows = []
    with broker_and_replicas() as (broker, admin, replicas):
        admin.create_app(
            "m", input_type="float64", input_shape=[WIDTH], slo_ms=slo_ms, default=0, models=["m"]
        )
        replicas.start("python", "m", "only", per_batch_ms=per_batch, per_item_ms=per_item)
        wait_replicas(admin, "m", {"only"})
        closed_loop(broker.frontend, "m", make_input, 32, 2.0)  # warm-up
        cap = 0.0
        for c in (16, 32, 48, 64, 96):
            cap = max(cap, goodput(closed_loop(broker.frontend, "m", make_input, c, 3.0), slo_ms))
        rate = 10 * cap
        before = admin.replicas("m")[0]
        session = _Refusals(broker.frontend, "m", None)
        n = int(rate * flood_s)
        with contextlib.closing(session), _measuring():
            drive(session, rate, n, 5)
            flood_end = time.perf_counter()
            session.drain(5.0)
        res = session.result
        during = admin.replicas("m")[0]
        batches = during["batches"] - before["batches"]
        mean_batch = (during["items"] - before["items"]) / max(1, batches)
        stats = admin.stats()
        print(
            f"  flood: {batches} batches of {mean_batch:.1f} on average; "
            f"dropped {stats['models']['m']['dropped']}; counters {stats['counters']}",
            flush=True,
        )
        good = goodput(res, slo_ms)
        refused = res.error_codes.get("OVERLOADED", 0)
        p99_refusal = float(np.percentile(session.refused_ms, 99)) if session.refused_ms else float("nan")
        # after the flood: half the capacity; every query sent from 1 s after the flood on
        after = _Timed(broker.frontend, "m", None)
        late_ok = late = 0
        with contextlib.closing(after), _measuring():
            rate_after, t1 = cap / 2, time.perf_counter()
            k = 0
            while time.perf_counter() - t1 < 3.0:
                now = time.perf_counter()
                if k < (now - t1) * rate_after:
                    after.send([make_input(k)], [now])
                    k += 1
                after.receive(0.5)
            after.drain(5.0)
        for r, t in after.sent_at.items():
            if t - flood_end >= 1.0:
                late += 1
                late_ok += int(
                    r in after.done_at and (after.done_at[r] - t) * 1000 <= slo_ms and r in after.answered
                )
        normal = late_ok / late if late else 0.0
        normal_ok = normal >= 0.999 and not after.result.defaults and not after.result.errors
        ratio = good / cap if cap else 0.0
        ok = ratio >= 0.9 and p99_refusal < 5.0 and normal_ok
        load = os.getloadavg()[0]
        rows.append(
            {
                "scenario": f"overload: 10x ({rate:.0f} q/s) for {flood_s:.0f} s, SLO {slo_ms:.0f} ms",
                "figure": f"goodput {good:.0f}/s of capacity {cap:.0f}/s; "
                f"refused {100 * refused / max(1, res.sent):.1f}% (p99 {p99_refusal:.2f} ms); "
                f"defaults {100 * res.defaults / max(1, res.sent):.1f}%; "
                f"lost {res.lost}; from 1 s after: {100 * normal:.1f}% within SLO; "
                f"machine load {load:.1f}",
                "ratio": f"{ratio:.3f}",
                "target": ">= 0.9, refusal p99 < 5 ms",
                "met": "yes" if ok else "NO",
            }
        )
        print(f"  {rows[-1]}", flush=True)
    return rows


# ------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="mixed,polyglot,kill,overload")
    parser.add_argument("--quick", action="store_true", help="shorter runs (overload: 10 s)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured load")
    parser.add_argument("--flood", type=float, default=60.0, help="seconds of 10x overload")
    parser.add_argument("--slo-ms", type=float, default=100.0, help="mixed pools' SLO")
    parser.add_argument("--concurrency", type=int, default=256, help="mixed pools' closed loop")
    args = parser.parse_args()
    duration = 3.0 if args.quick else args.duration
    flood = 10.0 if args.quick else args.flood
    print(machine(), flush=True)
    runs: dict[str, Callable[[], list[dict]]] = {
        "mixed": lambda: pool_run("mixed", MIXED, args.slo_ms, args.concurrency, duration),
        "polyglot": lambda: pool_run("polyglot", POLYGLOT, args.slo_ms, args.concurrency, duration),
        "kill": lambda: kill_run(max(4.0, duration)),
        "overload": lambda: overload_run(flood),
    }
    rows = []
    for name in args.scenario.split(","):
        if name == "polyglot" and not (shutil.which("java") and JAR.exists() and shutil.which("Rscript")):
            print("  polyglot: skipped (needs java, the SDK's jar and Rscript)")
            continue
        rows += runs[name]()
    print()
    print(table(rows, ["scenario", "figure", "ratio", "target", "met"]))
    return 0 if all(r["met"] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
