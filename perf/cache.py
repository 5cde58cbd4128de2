"""Cache benchmark: the hit path against the miss path on the same model, in one run.

    python -m perf.cache [--queries 3000]

One broker process and one replica process of ``ketch.examples.basic:total`` on free
loopback ports. The miss path sends a distinct random input every time (each reaches the
replica); the hit path repeats inputs already answered (each is served by the broker's
cache). Both are measured one query at a time (latency) and pipelined (throughput).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from ketch import Client
from ketch.local import LocalBroker, LocalModel

from perf._harness import closed_loop_one, machine, quantiles_ms, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3000)
    args = parser.parse_args()
    n = args.queries
    rng = np.random.default_rng(0)
    fresh = rng.normal(size=(4 * n + 1000, 16))
    hot = fresh[:64]
    print(machine())
    with LocalBroker() as broker:
        model = LocalModel("ketch.examples.basic:total", "total", backend=broker.backend, supervised=False)
        with model, broker.admin_client() as admin, Client(broker.frontend) as client:
            admin.create_app("bench", input_type="float64", input_shape=[16], slo_ms=1000, models=["total"])
            model.wait_ready(admin)
            client.predict_many("bench", list(hot))  # fill the cache with the hot set
            rows = []
            cursor = [64]

            def miss(_: int) -> None:
                cursor[0] += 1
                client.predict("bench", fresh[cursor[0]])

            def hit(i: int) -> None:
                client.predict("bench", hot[i % len(hot)])

            for name, call, inputs in (
                ("miss (computed by the replica)", miss, None),
                ("hit (served from the cache)", hit, hot),
            ):
                qps1, lat = closed_loop_one(call, n)
                q = quantiles_ms(lat)
                if inputs is None:
                    batch = list(fresh[cursor[0] + 1 : cursor[0] + 1 + 2 * n])
                    cursor[0] += 2 * n
                else:
                    batch = [inputs[i % len(inputs)] for i in range(2 * n)]
                t0 = time.perf_counter()
                client.predict_many("bench", batch, window=256)
                qps = len(batch) / (time.perf_counter() - t0)
                rows.append(
                    {
                        "path": name,
                        "1-in-flight q/s": qps1,
                        "p50 ms": q["p50"],
                        "p99 ms": q["p99"],
                        "pipelined q/s": qps,
                    }
                )
            stats = admin.stats()
    print(table(rows, ["path", "1-in-flight q/s", "p50 ms", "p99 ms", "pipelined q/s"]))
    miss_row, hit_row = rows
    print(
        f"\nhit/miss: p50 latency x{miss_row['p50 ms'] / hit_row['p50 ms']:.2f} lower, "
        f"pipelined throughput x{hit_row['pipelined q/s'] / miss_row['pipelined q/s']:.2f}; "
        f"cache {stats['cache']['hits']} hits, {stats['cache']['misses']} misses, "
        f"{stats['cache']['entries']} entries"
    )


if __name__ == "__main__":
    main()
