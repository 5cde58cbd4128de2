"""Soak: broker memory over a long run at steady load.

    python -m perf.soak [--minutes 5] [--rate 2000]

One broker and one replica of the no-op model, open-loop Poisson load at ``--rate`` with
distinct inputs (cache on, so its bound is exercised too), for ``--minutes``. Every 10 s
it prints the broker's RSS; at the end, the RSS after the first minute (warm) against the
end, and the growth per million queries. The target is flat: within 10%.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import psutil
from ketch.bench import open_loop
from ketch.local import LocalBroker, LocalModel

from perf._harness import machine


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=2000.0)
    parser.add_argument("--cache-mb", type=int, default=16)
    args = parser.parse_args()
    print(machine())
    samples: list[tuple[float, float, int]] = []
    total = {"sent": 0, "ok": 0, "lost": 0, "errors": 0}
    with LocalBroker(extra_args=["--cache-mb", str(args.cache_mb)]) as broker:
        model = LocalModel("ketch.examples.basic:noop", "noop", backend=broker.backend, supervised=False)
        with model, broker.admin_client() as admin:
            admin.create_app("soak", input_type="float64", input_shape=[8], slo_ms=100, models=["noop"])
            model.wait_ready(admin)
            proc = psutil.Process(broker.proc.pid)
            rng = np.random.default_rng(0)
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            k = 0
            while time.monotonic() < end:
                res = open_loop(
                    broker.frontend, "soak", lambda i: rng.normal(size=8), args.rate, 10.0, seed=k
                )
                k += 1
                for key in total:
                    total[key] += getattr(res, key)
                rss = proc.memory_info().rss / 2**20
                samples.append((time.monotonic() - t0, rss, total["sent"]))
                print(f"  {samples[-1][0]:6.0f} s  RSS {rss:7.1f} MiB  queries {total['sent']:>9}  "
                      f"p99 {res.quantile(99):.2f} ms", flush=True)  # fmt: skip
    warm = next((s for s in samples if s[0] >= 60), samples[0])
    last = samples[-1]
    growth = (last[1] - warm[1]) / warm[1] * 100
    per_million = (last[1] - warm[1]) / max(1, (last[2] - warm[2]) / 1e6)
    print(
        f"\n{total['sent']} queries ({total['ok']} predictions, {total['errors']} errors,"
        f" {total['lost']} lost);"
        f" broker RSS {warm[1]:.1f} MiB after {warm[0]:.0f} s, {last[1]:.1f} MiB at the end:"
        f" {growth:+.1f}% ({per_million:+.2f} MiB per million queries)"
    )
    return 0 if abs(growth) <= 10 and total["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
