"""Round trips: Ketch against the raw relay, one query at a time and 100 in flight.

    python -m perf.roundtrip [--queries 1000]

Ketch: a broker process and one replica process of the no-op model
(``ketch.examples.basic:noop``), cache off. Baseline, in the same run: the raw pyzmq
relay of perf/relay.py (same two hops, no decoding). Prints p50/p99 of single round trips
(median of ``--queries``) and the throughput with 100 in flight, with Ketch's ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zmq
from ketch import Client
from ketch.bench import closed_loop
from ketch.local import LocalBroker, LocalModel

from perf._harness import closed_loop_one, machine, quantiles_ms, table
from perf.relay import RawRelay


def relay_figures(address: str, n: int, duration: float) -> dict[str, float]:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    payload = np.zeros(4).tobytes()
    try:

        def one(_: int) -> None:
            sock.send_multipart([b"header", payload])
            sock.recv_multipart()

        _, lat = closed_loop_one(one, n)
        # 100 in flight
        inflight, done = 0, 0
        t0 = time.perf_counter()
        end = t0 + duration
        while time.perf_counter() < end:
            while inflight < 100:
                sock.send_multipart([b"header", payload])
                inflight += 1
            sock.recv_multipart()
            inflight -= 1
            done += 1
        while inflight:
            sock.recv_multipart()
            inflight -= 1
            done += 1
        qps = done / (time.perf_counter() - t0)
    finally:
        sock.close()
    q = quantiles_ms(lat)
    return {"system": "raw pyzmq relay", "p50 ms": q["p50"], "p99 ms": q["p99"], "100 in flight q/s": qps}


def ketch_figures(n: int, duration: float) -> dict[str, float]:
    with LocalBroker(extra_args=["--cache-mb", "0"]) as broker:
        model = LocalModel("ketch.examples.basic:noop", "noop", backend=broker.backend, supervised=False)
        with model, broker.admin_client() as admin, Client(broker.frontend) as client:
            admin.create_app("noop", input_type="float64", input_shape=[4], slo_ms=1000, models=["noop"])
            model.wait_ready(admin)
            x = np.zeros(4)
            _, lat = closed_loop_one(lambda _: client.predict("noop", x), n)
            res = closed_loop(broker.frontend, "noop", lambda _: x, 100, duration)
            mean_batch = admin.stats()["models"]["noop"]["mean_batch"]
    q = quantiles_ms(lat)
    return {
        "system": "ketch (broker + replica)",
        "p50 ms": q["p50"],
        "p99 ms": q["p99"],
        "100 in flight q/s": res.throughput,
        "mean batch": mean_batch,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    print(machine())
    with RawRelay() as relay:
        base = relay_figures(relay.address, args.queries, args.duration)
    ours = ketch_figures(args.queries, args.duration)
    print(table([base, ours], ["system", "p50 ms", "p99 ms", "100 in flight q/s", "mean batch"]))
    print(
        f"\nketch/relay: p50 x{ours['p50 ms'] / base['p50 ms']:.2f}, "
        f"throughput with 100 in flight x{ours['100 in flight q/s'] / base['100 in flight q/s']:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
