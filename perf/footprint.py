"""Memory of a small deployment: broker + HTTP gateway + one scikit-learn replica.

    python -m perf.footprint [--queries 20000] [--target-mib 190]

Starts what a user runs, each process by its pid, on free loopback ports: the broker
(``python -m ketchd``), the HTTP gateway (``ketch gateway``), and ``ketch model serve
ketch.examples.iris:model --replicas 1`` (its supervisor and one replica). Measures each
process's PSS (proportional set size, psutil's ``memory_full_info().pss``: shared pages
split among the processes that map them, so the sum is what the deployment costs) when
idle, then after QUERIES queries (half through the native client, half through the
gateway's Clipper route, 50 to a request), and prints the table with the total against
the target. Run it with the interpreter of the install to measure (the test tools bring
``rich``, which structlog loads when present: a few MiB in every process); it says which
it used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import urllib.request

import numpy as np
import psutil
from ketch import Client
from ketch.examples.iris import features
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, LocalModel

from perf._harness import machine, table


def pss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_full_info().pss / 2**20


def processes(broker: LocalBroker, gateway: LocalGateway, model: LocalModel) -> dict[str, int]:
    assert broker.proc and gateway.proc and model.proc
    replicas = psutil.Process(model.proc.pid).children()
    assert len(replicas) == 1, replicas
    return {
        "broker (python -m ketchd)": broker.proc.pid,
        "gateway (ketch gateway)": gateway.proc.pid,
        "supervisor (ketch model serve)": model.proc.pid,
        "replica (iris, scikit-learn)": replicas[0].pid,
    }


def http_batch(url: str, rows: np.ndarray) -> list:
    """POST rows to the Clipper route as one request; the answers."""
    body = json.dumps({"input_batch": rows.tolist()}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        out = json.loads(resp.read())
    return out["batch_predictions"] if len(rows) > 1 else [out]  # one comes back bare, as in Clipper


def run(queries: int) -> tuple[list[dict], float, float]:
    rows = features()
    with (
        LocalBroker(extra_args=["--state", ":memory:"]) as broker,
        broker.admin_client() as admin,
        LocalGateway(broker.frontend, broker.admin) as gateway,
        LocalModel("ketch.examples.iris:model", "iris", backend=broker.backend, input_shape="4") as model,
    ):
        admin.create_app(
            "iris", input_type="float64", input_shape=[4], slo_ms=1000, models=["iris"], cache=False
        )
        model.wait_ready(admin, timeout_s=120)
        with Client(broker.frontend) as client:
            client.predict("iris", rows[0])
        time.sleep(2.0)  # settle
        pids = processes(broker, gateway, model)
        idle = {name: pss_mib(pid) for name, pid in pids.items()}
        native = queries // 2
        rng = np.random.default_rng(0)
        xs = rows[rng.integers(0, len(rows), size=queries)] + rng.normal(0, 0.01, size=(queries, 4))
        with Client(broker.frontend) as client:
            got = client.predict_many("iris", list(xs[:native]), window=256)
            assert len(got) == native and not any(p.default for p in got)
        url = f"{gateway.url}/iris/predict"
        for at in range(native, queries, 50):
            answers = http_batch(url, xs[at : at + 50])
            assert len(answers) == min(50, queries - at)
        time.sleep(1.0)
        after = {name: pss_mib(pid) for name, pid in pids.items()}
    out = [{"process": n, "idle MiB": idle[n], f"after {queries} MiB": after[n]} for n in pids]
    return out, sum(idle.values()), sum(after.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--target-mib", type=float, default=190.0)
    args = parser.parse_args()
    print(machine())
    rich = importlib.util.find_spec("rich") is not None
    print(f"interpreter {sys.executable}; rich {'present' if rich else 'absent'}", flush=True)
    rows, idle, after = run(args.queries)
    rows.append({"process": "total", "idle MiB": idle, f"after {args.queries} MiB": after})
    print(table(rows, ["process", "idle MiB", f"after {args.queries} MiB"]))
    ok = idle <= args.target_mib and after <= args.target_mib
    print(f"target <= {args.target_mib:.0f} MiB idle and after: {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
