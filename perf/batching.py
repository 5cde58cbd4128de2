"""Batching benchmark: no batching, fixed size, AIMD and the latency model, in one run.

    python -m perf.batching [--duration 4] [--rate-overhead 4000] [--rate-sklearn 6000]

Two models, each offered open-loop Poisson load well above what batch size 1 can carry,
SLO 20 ms, one replica process:
- ``overhead``: 2 ms fixed cost per call + 0.02 ms per item (ketch.examples.basic:overhead);
- ``sklearn``: logistic regression on 100 features (ketch.examples.linear:model).
For each batching setting it prints throughput (predictions per second, defaults not
counted), p50/p99 latency of every query (defaults come at the SLO), the share of queries
answered with a prediction within the SLO, the mean batch size and the speedup over size 1.
"""

from __future__ import annotations

import argparse

import numpy as np
from ketch.bench import open_loop
from ketch.local import LocalBroker, LocalModel

from perf._harness import machine, table

SLO_MS = 20.0
SETTINGS = [
    ("size 1", {"batching": "fixed", "max_batch": 1}),
    ("fixed 32", {"batching": "fixed", "max_batch": 32}),
    ("aimd", {"batching": "aimd", "max_batch": 512}),
    ("latency model", {"batching": "model", "max_batch": 512}),
]
MODELS = {
    "overhead": ("ketch.examples.basic:overhead", 16),
    "sklearn": ("ketch.examples.linear:model", 100),
}


def run(duration: float, rates: dict[str, float]) -> list[dict]:
    rows = []
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker, broker.admin_client() as admin:
        for model_name, (target, width) in MODELS.items():
            inputs = np.random.default_rng(1).normal(size=(4096, width))

            def make(k: int, inputs: np.ndarray = inputs) -> np.ndarray:
                return inputs[k % len(inputs)]

            base = None
            for label, setting in SETTINGS:
                name = f"{model_name}-{label.replace(' ', '-')}"
                admin.create_app(
                    name, input_type="float64", input_shape=[width], slo_ms=SLO_MS, models=[name]
                )
                admin.configure_model(name, create=True, **setting)
                model = LocalModel(
                    target, name, backend=broker.backend, supervised=False, input_shape=str(width)
                )
                with model:
                    model.wait_ready(admin, timeout_s=60)
                    # warm-up: let the controller see some batches
                    open_loop(broker.frontend, name, make, rates[model_name] / 2, 1.0, seed=9)
                    res = open_loop(broker.frontend, name, make, rates[model_name], duration)
                    stats = admin.stats()["models"][name]
                row = {
                    "model": model_name,
                    "batching": label,
                    "offered q/s": rates[model_name],
                    "throughput": res.throughput,
                    "p50 ms": res.quantile(50),
                    "p99 ms": res.quantile(99),
                    "within SLO %": 100 * res.within(SLO_MS),
                    "mean batch": stats["mean_batch"],
                    "lost": res.lost,
                }
                base = base or row["throughput"]
                row["speedup"] = f"x{row['throughput'] / base:.1f}" if base else "-"
                rows.append(row)
                print(f"  {model_name:8} {label:14} {res.summary()}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--rate-overhead", type=float, default=6000)
    parser.add_argument("--rate-sklearn", type=float, default=6000)
    args = parser.parse_args()
    print(machine())
    rows = run(args.duration, {"overhead": args.rate_overhead, "sklearn": args.rate_sklearn})
    print()
    print(
        table(
            rows,
            [
                "model",
                "batching",
                "offered q/s",
                "throughput",
                "p50 ms",
                "p99 ms",
                "within SLO %",
                "mean batch",
                "speedup",
                "lost",
            ],
        )
    )


if __name__ == "__main__":
    main()
