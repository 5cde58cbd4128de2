"""The benchmark suite: ``python -m perf [--quick]``.

One table for Ketch against the raw pyzmq relay (perf/relay.py) measured in the same run:
a no-op model and a scikit-learn logistic regression on 20 features, closed loop at 1, 8,
64 and 256 queries in flight and open loop (Poisson) at several rates; throughput
(predictions per second), p50/p90/p99/p99.9, mean batch size, broker CPU per query and
broker RSS. The relay is measured closed-loop at the same in-flight levels; Ketch's ratio
to it is printed per level. Every process is local, on free loopback ports; the cache is
off so every query reaches a replica.

The other benchmarks run on their own: perf.batching, perf.cache, perf.ensemble, perf.sdks,
perf.roundtrip (see perf/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import psutil
import zmq
from ketch.bench import closed_loop, open_loop
from ketch.local import LocalBroker, LocalModel

from perf._harness import machine, table
from perf.relay import RawRelay

MODELS = {"noop": ("ketch.examples.basic:noop", 20), "sklearn-lr20": ("ketch.examples.linear:model20", 20)}


def relay_closed_loop(address: str, inflight: int, duration: float) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    payload = np.zeros(20).tobytes()
    lat = []
    sent_at: dict[bytes, float] = {}
    try:
        t0 = time.perf_counter()
        end = t0 + duration
        k = 0
        while time.perf_counter() < end:
            while len(sent_at) < inflight:
                key = k.to_bytes(8, "little")
                sent_at[key] = time.perf_counter()
                sock.send_multipart([key, payload])
                k += 1
            key = sock.recv_multipart()[0]
            lat.append(time.perf_counter() - sent_at.pop(key))
        while sent_at:
            key = sock.recv_multipart()[0]
            lat.append(time.perf_counter() - sent_at.pop(key))
        elapsed = time.perf_counter() - t0
    finally:
        sock.close()
    ms = np.asarray(lat) * 1000
    return {
        "throughput": len(lat) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def run(duration: float, levels: list[int], rates: dict[str, list[float]]) -> tuple[list[dict], dict]:
    baseline = {}
    with RawRelay() as relay:
        for n in levels:
            baseline[n] = relay_closed_loop(relay.address, n, duration)
            print(f"  relay {n} in flight: {baseline[n]}", flush=True)
    rows = []
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker, broker.admin_client() as admin:
        proc = psutil.Process(broker.proc.pid)
        for name, (target, width) in MODELS.items():
            admin.create_app(name, input_type="float64", input_shape=[width], slo_ms=1000, models=[name])
            model = LocalModel(target, name, backend=broker.backend, supervised=False, input_shape=str(width))
            with model:
                model.wait_ready(admin, timeout_s=60)
                inputs = np.random.default_rng(0).normal(size=(4096, width))

                def make(k: int, inputs: np.ndarray = inputs) -> np.ndarray:
                    return inputs[k % len(inputs)]

                closed_loop(broker.frontend, name, make, 8, 1.0)  # warm-up
                loads = [("closed", n) for n in levels] + [("open", r) for r in rates[name]]
                for kind, level in loads:
                    before = admin.stats()["models"][name]
                    cpu0 = sum(proc.cpu_times()[:2])
                    if kind == "closed":
                        res = closed_loop(broker.frontend, name, make, level, duration)
                    else:
                        res = open_loop(broker.frontend, name, make, level, duration)
                    cpu = sum(proc.cpu_times()[:2]) - cpu0
                    after = admin.stats()["models"][name]
                    batches = after["batches"] - before["batches"]
                    items = after["mean_batch"] * after["batches"] - before["mean_batch"] * before["batches"]
                    row = {
                        "model": name,
                        "load": f"{kind} {level:g}" + (" in flight" if kind == "closed" else "/s"),
                        "pred/s": res.throughput,
                        "p50 ms": res.quantile(50),
                        "p90 ms": res.quantile(90),
                        "p99 ms": res.quantile(99),
                        "p99.9 ms": res.quantile(99.9),
                        "mean batch": items / batches if batches else 0.0,
                        "broker us/query": 1e6 * cpu / max(1, res.ok + res.defaults + res.errors),
                        "broker RSS MiB": proc.memory_info().rss / 2**20,
                        "lost": res.lost + res.errors,
                    }
                    if kind == "closed" and level in baseline:
                        row["x relay q/s"] = f"x{res.throughput / baseline[level]['throughput']:.2f}"
                        row["x relay p50"] = f"x{row['p50 ms'] / baseline[level]['p50_ms']:.2f}"
                    rows.append(row)
                    print(f"  {row}", flush=True)
    return rows, baseline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per load level")
    parser.add_argument("--quick", action="store_true", help="1 s per level, fewer levels")
    args = parser.parse_args()
    duration = 1.0 if args.quick else args.duration
    levels = [1, 64] if args.quick else [1, 8, 64, 256]
    rates = {
        "noop": [2000] if args.quick else [1000, 4000, 8000],
        "sklearn-lr20": [2000] if args.quick else [1000, 4000],
    }
    print(machine())
    rows, baseline = run(duration, levels, rates)
    print()
    relay_rows = [
        {
            "load": f"closed {n} in flight",
            "pred/s": b["throughput"],
            "p50 ms": b["p50_ms"],
            "p99 ms": b["p99_ms"],
        }
        for n, b in baseline.items()
    ]
    print(table(relay_rows, ["load", "pred/s", "p50 ms", "p99 ms"]))
    print("(raw pyzmq relay, no decoding)\n")
    columns = ["model", "load", "pred/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "mean batch",
               "broker us/query", "broker RSS MiB", "lost", "x relay q/s", "x relay p50"]  # fmt: skip
    print(table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
