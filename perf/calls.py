"""Python calls per query on the hot path, counted: a figure that a busy machine cannot blur.

    python -m perf.calls [--queries 2000]

A broker (in a thread, its cache off), a replica of a no-op model (in a thread) and a
client (this thread) in one process, on loopback sockets; a profile hook counts the Python function calls each
thread makes. After a warm-up (templates learnt and prebuilt), one query at a time: every
batch holds one query, so the counts per query are the same from run to run. Then 100 in
flight (the closed loop of ``ketch bench``, a query per message), where batch sizes vary with
timing: those counts are indicative only. Uses only the public API (``ketch.Client``,
``ketch.Admin``, ``ketch.runtime.Replica``, ``ketchd.broker.Broker``), so the same file
measures another checkout: run it with that checkout's interpreter, from that checkout.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

_counts: Counter[str] = Counter()
_counting = False


def _hook(frame: Any, event: str, arg: Any) -> None:
    if _counting and event == "call":
        _counts[threading.current_thread().name] += 1


def _noop(xs: list[Any]) -> list[Any]:
    return [0.0 for _ in xs]


def main() -> int:
    global _counting
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000)
    args = parser.parse_args()
    threading.setprofile(_hook)
    sys.setprofile(_hook)
    import ketch
    from ketch.bench import closed_loop
    from ketch.runtime import Replica
    from ketchd.broker import Broker
    from ketchd.config import BrokerConfig

    any_port = "tcp://127.0.0.1:*"
    cfg = BrokerConfig(
        frontend=any_port, backend=any_port, admin=any_port, state_path=":memory:", metrics=None
    )
    cfg.cache_bytes = 0  # as perf.roundtrip: every query reaches the replica
    broker = Broker(cfg)
    ends = broker.bind()
    threading.Thread(target=broker.run, name="broker", daemon=True).start()
    replica = Replica(_noop, name="noop", input_type="float64", input_shape=(4,), broker=ends["backend"])
    threading.Thread(target=replica.run, name="replica", daemon=True).start()
    x = np.zeros(4)
    try:
        with ketch.Admin(ends["admin"]) as admin, ketch.Client(ends["frontend"]) as client:
            admin.create_app("noop", input_type="float64", input_shape=[4], slo_ms=1000, models=["noop"])
            deadline = time.monotonic() + 30
            while not admin.replicas("noop") and time.monotonic() < deadline:
                time.sleep(0.05)
            for _ in range(500):
                client.predict("noop", x)
            time.sleep(1.0)  # prebuilt templates done while idle
            _counts.clear()
            _counting = True
            for _ in range(args.queries):
                client.predict("noop", x)
            _counting = False
            one = {k: v / args.queries for k, v in _counts.items()}
            _counts.clear()
            _counting = True
            res = closed_loop(ends["frontend"], "noop", lambda _: x, 100, 3.0, one_per_message=True)
            _counting = False
            answered = max(1, res.ok)
            many = {k: v / answered for k, v in _counts.items()}
    finally:
        replica.stop()
        broker.request_stop("done")
        time.sleep(0.5)
    print(f"Python calls per query ({args.queries} one at a time; {res.ok} with 100 in flight)")
    print("| thread | one at a time | 100 in flight |\n|---|---|---|")
    for name in ("broker", "replica", "MainThread"):
        label = "client" if name == "MainThread" else name
        print(f"| {label} | {one.get(name, 0):.1f} | {many.get(name, 0):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
