"""Ketch against Ray Serve and Seldon MLServer: same model, same load generator, same run.

Run ``perf/peers/setup.sh`` once (it makes perf/peers/.venv-ray and .venv-mlserver), then,
from the repository root with the main project's Python::

    python -m perf.peers.compare                       # C = 1, 4, 8, 16, 32, 64; 3 s each
    python -m perf.peers.compare --concurrency 1,16 --duration 5 --peers mlserver

The model is the logistic regression on 20 features of ``ketch.examples.linear:model20``;
each peer rebuilds it in its own virtual environment from the same five lines (no ketch
there). Each peer server runs alone, started as a subprocess in its own session on free
127.0.0.1 ports and stopped by its pid (then every process left in that session is killed):

    ray-serve   perf/peers/ray_serve_app.py: one deployment, ``@serve.batch``, POST / JSON
    mlserver    ``mlserver start`` on settings written to a temp dir at run time, with
                adaptive batching (``max_batch_size``, ``max_batch_time``) and the model
                saved there with joblib; POST /v2/models/lr20/infer (V2 / Open Inference)

then Ketch on the same machine: a broker, one replica process of the model, cache off,
through the native client (``ketch.bench.closed_loop``: one ZeroMQ socket, C queries in
flight) and through the HTTP gateway (Clipper route, ``ketch.gateway.local.LocalGateway``).
The HTTP load is closed loop: C workers on asyncio, one keep-alive connection each, the
minimal HTTP/1.1 client of perf/http.py (which also reads chunked replies, which Ray
Serve's proxy sends). Every HTTP answer is checked against the label computed here. It
prints one table (throughput, p50, p99, share answered with a prediction within 20 ms) and
Ketch's ratio to the best peer among the levels where p99 <= 20 ms. A peer that is not
installed or does not start is reported as such and the others are still measured.
"""

from __future__ import annotations

import os
import sys

# perf/http.py is imported below as perf.http; keep this folder off the front of sys.path
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import psutil
from ketch import Client
from ketch.bench import closed_loop
from ketch.examples.linear import estimator
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, LocalModel

from perf._harness import machine
from perf.http import RawHTTP

HERE = Path(__file__).resolve().parent
APP = "lr20"
SLO_MS = 20.0
POOL = 4096

# the model, rebuilt inside each peer's venv without ketch (same as ketch.examples.linear:model20)
MODEL_SRC = """
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
x, y = make_classification(n_samples=2000, n_features=20, n_informative=10, random_state=0)
model = LogisticRegression(max_iter=1000).fit(x, y)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_closed_loop(
    url: str,
    call: Callable[[RawHTTP, int], Awaitable[bool]],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> dict:
    """C workers, one connection each, each sending its next query when the last is answered."""
    latencies: list[float] = []
    counted = [0, 0]  # answered correctly, errors
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s

    async def worker(w: int) -> None:
        conn = RawHTTP(url)
        k = w * 7919
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    ok = await call(conn, k)
                except Exception:
                    ok = False
                    await conn.close()
                    conn = RawHTTP(url)
                k += 1
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= end:
                    counted[0 if ok else 1] += 1
                    if ok:
                        latencies.append((t1 - t0) * 1000)
        finally:
            await conn.close()

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return row_stats(counted[0], counted[1], latencies, duration_s)


def row_stats(ok: int, errors: int, latencies: list[float], elapsed_s: float, defaults: int = 0) -> dict:
    lat = np.asarray(latencies)
    sent = ok + errors + defaults
    return {
        "qps": ok / elapsed_s,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "within": float((lat <= SLO_MS).sum() / sent) if sent else 0.0,
        "errors": errors,
        "defaults": defaults,
    }


class Peer:
    """A peer server in its own venv and session; ``start`` returns its settings or raises."""

    name = ""
    venv = ""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.python = HERE / self.venv / "bin" / "python"
        self.proc: subprocess.Popen | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix=f"ketch-peer-{self.name}-")
        self.log_path = Path(self.tmp.name) / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def versions(self, packages: list[str]) -> dict[str, str]:
        code = (
            "import importlib.metadata as m, json, sys; "
            f"print(json.dumps({{p: m.version(p) for p in {packages!r}}}"
            " | {'python': sys.version.split()[0]}))"
        )
        out = subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, timeout=60)
        return json.loads(out.stdout)

    def spawn(self, argv: list[str], cwd: str | None = None) -> None:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
        env.pop("VIRTUAL_ENV", None)
        env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it)
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        log.close()

    def wait(self, ready: Callable[[], bool], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not ready after {timeout_s:g} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def stop(self, grace_s: float = 30) -> int:
        """SIGTERM to the server, then SIGKILL to every process still in its session; returns
        how many had to be killed."""
        if self.proc is None:
            return 0
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        killed = 0
        for _ in range(10):
            left = []
            for p in psutil.process_iter():
                try:
                    if os.getsid(p.pid) == sid:
                        left.append(p)
                except (ProcessLookupError, PermissionError, psutil.Error):
                    pass
            if not left:
                break
            for p in left:
                try:
                    p.kill()
                    killed += 1
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=5)
        self.tmp.cleanup()
        return killed


class RayServe(Peer):
    name = "ray-serve"
    venv = ".venv-ray"
    path = "/"

    def start(self) -> dict:
        a = self.args
        self.spawn(
            [
                str(self.python),
                str(HERE / "ray_serve_app.py"),
                "--port",
                str(self.port),
                "--max-batch-size",
                str(a.ray_max_batch),
                "--batch-wait-timeout-s",
                str(a.ray_wait_s),
                "--replicas",
                str(a.ray_replicas),
                "--num-cpus",
                str(os.cpu_count() or 2),
            ]
        )
        self.wait(lambda: "READY " in self.log_tail(100_000), 240)
        line = next(x for x in self.log_tail(100_000).splitlines() if x.startswith("READY "))
        settings = json.loads(line.removeprefix("READY "))
        settings.pop("ray", None)
        return settings

    def versions_of(self) -> dict[str, str]:
        return self.versions(["ray", "scikit-learn", "numpy"])

    @staticmethod
    def doc(x: np.ndarray) -> dict:
        return {"input": x.tolist()}

    @staticmethod
    def label(reply: dict) -> int:
        return int(reply["output"])


class MLServer(Peer):
    name = "mlserver"
    venv = ".venv-mlserver"
    path = f"/v2/models/{APP}/infer"

    def start(self) -> dict:
        a = self.args
        root = Path(self.tmp.name)
        model_dir = root / "models" / APP
        model_dir.mkdir(parents=True)
        save = MODEL_SRC + f"import joblib\njoblib.dump(model, {str(model_dir / 'model.joblib')!r})\n"
        subprocess.run([str(self.python), "-c", save], check=True, timeout=120)
        settings = {
            "host": "127.0.0.1",
            "http_port": self.port,
            "grpc_port": free_port(),
            "metrics_port": free_port(),
            "metrics_endpoint": "/metrics" if a.mls_metrics else None,
            "metrics_dir": str(root / "metrics"),
            "parallel_workers": a.mls_workers,
            "debug": False,
        }
        model_settings = {
            "name": APP,
            "implementation": "mlserver_sklearn.SKLearnModel",
            "max_batch_size": a.mls_max_batch,
            "max_batch_time": a.mls_max_time,
            "parameters": {"uri": "./model.joblib", "version": "v1"},
        }
        (root / "models" / "settings.json").write_text(json.dumps(settings))
        (model_dir / "model-settings.json").write_text(json.dumps(model_settings))
        self.spawn([str(self.python.parent / "mlserver"), "start", str(root / "models")], cwd=str(root))

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.url}/v2/models/{APP}/ready", timeout=2) as r:
                return r.status == 200

        self.wait(ready, 240)
        return {
            "parallel_workers": a.mls_workers,
            "max_batch_size": a.mls_max_batch,
            "max_batch_time": a.mls_max_time,
            "metrics": a.mls_metrics,
        }

    def versions_of(self) -> dict[str, str]:
        return self.versions(["mlserver", "mlserver-sklearn", "scikit-learn", "numpy"])

    @staticmethod
    def doc(x: np.ndarray) -> dict:
        return {"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 20], "data": x.tolist()}]}

    @staticmethod
    def label(reply: dict) -> int:
        return int(reply["outputs"][0]["data"][0])


def measure_peer(peer: Peer, pool: np.ndarray, expected: np.ndarray, args, levels) -> list[tuple]:
    rows = []

    async def call(conn: RawHTTP, k: int) -> bool:
        i = k % POOL
        return peer.label(await conn.post(peer.path, peer.doc(pool[i]))) == expected[i]

    for c in levels:
        r = asyncio.run(http_closed_loop(peer.url, call, c, args.duration, args.warmup))
        rows.append((peer.name, c, r))
        print_row(peer.name, c, r)
    return rows


def print_row(system: str, c: int, r: dict) -> None:
    print(
        f"  {system:12} c={c:<3} {r['qps']:8,.0f} q/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  "
        f"within {SLO_MS:g} ms {r['within']:6.1%}  errors {r['errors']}  defaults {r['defaults']}"
        + (f" {r['codes']}" if r.get("codes") else ""),
        flush=True,
    )


def measure_ketch(pool: np.ndarray, expected: np.ndarray, args, levels) -> list[tuple]:
    rows = []
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker:
        model = LocalModel(
            "ketch.examples.linear:model20", APP, backend=broker.backend, replicas=1, input_shape="20"
        )
        with model, broker.admin_client() as admin:
            admin.create_app(
                APP,
                input_type="float64",
                input_shape=[20],
                slo_ms=args.ketch_slo_ms,
                models=[APP],
                cache=False,
            )
            model.wait_ready(admin, timeout_s=60)
            with Client(broker.frontend) as client:
                got = [int(client.predict(APP, pool[i]).output) for i in range(64)]
            if got != [int(v) for v in expected[:64]]:
                raise RuntimeError("Ketch's answers differ from the model's labels")
            for c in levels:
                closed_loop(broker.frontend, APP, lambda k: pool[k % POOL], c, args.warmup)
                res = closed_loop(broker.frontend, APP, lambda k: pool[k % POOL], c, args.duration)
                r = row_stats(res.ok, res.errors + res.lost, [], res.elapsed_s, res.defaults)
                lat = np.asarray(res.latencies_ms)
                r["qps"] = res.throughput
                r["p50"], r["p99"] = (float(v) for v in np.percentile(lat, [50, 99]))
                r["within"] = res.within(SLO_MS)
                r["codes"] = dict(res.error_codes, **({"lost": res.lost} if res.lost else {}))
                rows.append(("ketch-native", c, r))
                print_row("ketch-native", c, r)

            with LocalGateway(broker.frontend, broker.admin, workers=args.gateway_workers) as gw:

                async def call(conn: RawHTTP, k: int) -> bool:
                    i = k % POOL
                    reply = await conn.post(f"/{APP}/predict", {"input": pool[i].tolist()})
                    return not reply.get("default") and int(reply["output"]) == expected[i]

                for c in levels:
                    r = asyncio.run(http_closed_loop(gw.url, call, c, args.duration, args.warmup))
                    rows.append(("ketch-http", c, r))
                    print_row("ketch-http", c, r)
    return rows


def best_at_slo(rows: list[tuple], system: str) -> tuple[float, int | None]:
    ok = [(r["qps"], c) for s, c, r in rows if s == system and r["p99"] <= SLO_MS]
    return max(ok) if ok else (0.0, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--concurrency", default="1,4,8,16,32,64,128", help="Comma-separated concurrency levels."
    )
    parser.add_argument("--duration", type=float, default=3.0, help="Measured seconds per level.")
    parser.add_argument("--warmup", type=float, default=0.5, help="Unmeasured seconds before each level.")
    parser.add_argument("--settle", type=float, default=5.0, help="Idle seconds after a peer is ready.")
    parser.add_argument("--peers", default="ray,mlserver", help="Which peers: ray, mlserver (or none).")
    parser.add_argument("--ray-max-batch", type=int, default=32, help="@serve.batch max_batch_size.")
    parser.add_argument("--ray-wait-s", type=float, default=0.001, help="@serve.batch batch_wait_timeout_s.")
    parser.add_argument("--ray-replicas", type=int, default=1)
    parser.add_argument("--mls-max-batch", type=int, default=32, help="MLServer max_batch_size.")
    parser.add_argument("--mls-max-time", type=float, default=0.002, help="MLServer max_batch_time (s).")
    parser.add_argument(
        "--mls-workers", type=int, default=0, help="MLServer parallel_workers (0: in the server process)."
    )
    parser.add_argument("--mls-metrics", action="store_true", help="MLServer with its metrics server.")
    parser.add_argument("--gateway-workers", type=int, default=1)
    parser.add_argument("--ketch-slo-ms", type=float, default=SLO_MS, help="The Ketch app's SLO.")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    peers = {"ray": RayServe, "mlserver": MLServer}
    wanted = [p for p in args.peers.split(",") if p in peers]

    print(machine())
    print(
        f"model: logistic regression on 20 features (ketch.examples.linear:model20); closed loop, "
        f"{args.duration:g} s per level after {args.warmup:g} s warm-up; load generator in this process"
    )
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(POOL, 20))
    expected = estimator(20).predict(pool)

    rows: list[tuple] = []
    notes: list[str] = []
    for key in wanted:
        cls = peers[key]
        if not (HERE / cls.venv / "bin" / "python").exists():
            notes.append(f"{cls.name}: not installed ({cls.venv} missing; run perf/peers/setup.sh)")
            print(notes[-1], flush=True)
            continue
        peer = cls(args)
        try:
            versions = peer.versions_of()
            t0 = time.monotonic()
            settings = peer.start()
            print(
                f"{peer.name}: versions {json.dumps(versions)}; settings {json.dumps(settings)}; "
                f"ready in {time.monotonic() - t0:.0f} s",
                flush=True,
            )
            time.sleep(args.settle)  # let start-up work (imports, actors, workers) finish
            rows += measure_peer(peer, pool, expected, args, levels)
        except Exception as e:
            notes.append(f"{peer.name}: could not be measured: {type(e).__name__}: {str(e)[:2000]}")
            print(notes[-1], flush=True)
        finally:
            killed = peer.stop()
            if killed:
                print(f"{peer.name}: killed {killed} process(es) left in its session", flush=True)

    print(
        f"ketch: one replica process, cache off, app SLO {args.ketch_slo_ms:g} ms, "
        f"{args.gateway_workers} gateway worker(s)",
        flush=True,
    )
    rows += measure_ketch(pool, expected, args, levels)

    header = ("system", "concurrency", "req/s", "p50 ms", "p99 ms", f"within {SLO_MS:g} ms", "errors")
    print()
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for system, c, r in rows:
        err = r["errors"] + r["defaults"]
        cells = (system, c, f"{r['qps']:,.0f}", f"{r['p50']:.2f}", f"{r['p99']:.2f}")
        cells += (f"{r['within']:.1%}", err)
        print("| " + " | ".join(str(v) for v in cells) + " |")
    print()
    best_peer = (0.0, None, None)
    for system in dict.fromkeys(s for s, _, _ in rows):
        qps, c = best_at_slo(rows, system)
        where = f"at c={c}" if c is not None else "(no level with p99 <= 20 ms)"
        print(f"best with p99 <= {SLO_MS:g} ms: {system} {qps:,.0f} req/s {where}")
        if not system.startswith("ketch") and qps > best_peer[0]:
            best_peer = (qps, system, c)
    if best_peer[1] is None:
        print("no peer measured at p99 <= 20 ms: no ratio")
    else:
        for system, target in (("ketch-native", 10), ("ketch-http", 2)):
            qps, _ = best_at_slo(rows, system)
            ratio = qps / best_peer[0]
            verdict = "met" if ratio >= target else "not met"
            print(f"{system} / best peer ({best_peer[1]}): x{ratio:.2f} (target x{target}: {verdict})")
    for note in notes:
        print("note: " + note)


if __name__ == "__main__":
    main()
