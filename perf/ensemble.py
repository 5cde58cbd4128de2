"""Ensemble benchmark: straggler-tolerant deadlines against waiting for every member.

    python -m perf.ensemble [--sizes 4,8,16] [--queries 300]

An ensemble (policy ``ensemble``) of N models, one of which is a straggler that takes
100 ms; the others answer in well under a millisecond. SLO 20 ms: the reply comes when all
members answered or at the deadline with those that arrived. The baseline, in the same run
and on the same replicas, is the same ensemble with an SLO long enough to wait for every
member. One query at a time; p50/p99 latency, the share of members missing per reply and
the confidence.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

import ketch
import numpy as np
from ketch.local import LocalBroker, wait_for

from perf._harness import machine, quantiles_ms, table

STRAGGLER_S = 0.100


def _serve_members(
    backend: str, names: list[str], straggler: str, stop: threading.Event
) -> list[threading.Thread]:
    def fast(xs):
        return ["cat" for _ in xs]

    def slow(xs):
        time.sleep(STRAGGLER_S)
        return ["dog" for _ in xs]

    threads = []
    replicas = []
    for name in names:
        r = ketch.Replica(slow if name == straggler else fast, name=name, broker=backend, replica_id=name,
                          credits=4)  # fmt: skip
        t = threading.Thread(target=r.run, daemon=True)
        t.start()
        replicas.append(r)
        threads.append(t)

    def stopper() -> None:
        stop.wait()
        for r in replicas:
            r.stop()

    threading.Thread(target=stopper, daemon=True).start()
    return threads


def run(sizes: list[int], n: int) -> list[dict]:
    rows = []
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker, broker.admin_client() as admin:
        for size in sizes:
            names = [f"m{size}-{i}" for i in range(size)]
            stop = threading.Event()
            threads = _serve_members(broker.backend, names, names[-1], stop)
            wait_for(lambda names=names: all(admin.replicas(m) for m in names), 30, "ensemble members")
            for label, slo in (("deadline (SLO 20 ms)", 20.0), ("wait for all", 5000.0)):
                app = f"e{size}-{int(slo)}"
                admin.create_app(app, input_type="float64", input_shape=[4], slo_ms=slo, default="none",
                                 models=names, cache=False)  # fmt: skip
                admin.set_policy(app, "ensemble")
                with ketch.Client(broker.frontend) as client:
                    x = np.zeros(4)
                    for _ in range(20):
                        client.predict(app, x)
                    lat, missing, conf = [], [], []
                    count = n if slo < 1000 else max(30, n // 10)  # waiting costs 100 ms a query
                    for i in range(count):
                        p = client.predict(app, x + i)
                        lat.append(p.latency_ms / 1000)
                        missing.append(len(p.models_missing) / size)
                        conf.append(p.confidence)
                q = quantiles_ms(lat)
                rows.append({
                    "members": size, "mode": label, "queries": count, "p50 ms": q["p50"], "p99 ms": q["p99"],
                    "members missing %": 100 * float(np.mean(missing)), "confidence": float(np.mean(conf)),
                })  # fmt: skip
                print(f"  {rows[-1]}", flush=True)
            stop.set()
            for t in threads:
                t.join(10)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4,8,16")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    print(machine())
    rows = run([int(s) for s in args.sizes.split(",")], args.queries)
    print()
    print(table(rows, ["members", "mode", "queries", "p50 ms", "p99 ms", "members missing %", "confidence"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
