"""Round trips: Ketch against the raw relay, one query at a time and 100 in flight.

    python -m perf.roundtrip [--queries 2000] [--rounds 10] [--duration 3]

Ketch: a broker process and one replica process of the no-op model
(``ketch.examples.basic:noop``), cache off. Baseline, in the same run: the raw pyzmq
relay of perf/relay.py (same two hops, no decoding). Both run side by side and are
measured in alternating rounds, so that a noisy moment on a shared machine falls on both
alike. Prints p50/p99 of single round trips; the throughput with 100 in flight, each query
in a message of its own (as independent callers send them; the relay's way) and, for Ketch,
with the queries that refill the level in one message (as a client with many users sends
them); and p50/p99 under open-loop Poisson load (Ketch, and the relay under the same
arrivals, for scale) at half the rate one client reaches one query at a time (1/p50), at
half of Ketch's peak with one query per message, and at a quarter and half of its peak
with refills in one message; with Ketch's ratios.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import zmq
from ketch import Client
from ketch import protocol as proto
from ketch.bench import _Session, closed_loop, open_loop
from ketch.local import LocalBroker, LocalModel

from perf._harness import closed_loop_one, machine, quantiles_ms, table
from perf.relay import RawRelay


class _RelayClient:
    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.payload = np.zeros(4).tobytes()

    def one(self, _: int) -> None:
        self.sock.send_multipart([b"header", self.payload])
        self.sock.recv_multipart()

    def inflight(self, duration: float, depth: int = 100) -> float:
        sock, payload = self.sock, self.payload
        inflight = done = 0
        t0 = time.perf_counter()
        end = t0 + duration
        while time.perf_counter() < end:
            while inflight < depth:
                sock.send_multipart([b"header", payload])
                inflight += 1
            sock.recv_multipart()
            inflight -= 1
            done += 1
        while inflight:
            sock.recv_multipart()
            inflight -= 1
            done += 1
        return done / (time.perf_counter() - t0)

    def close(self) -> None:
        self.sock.close()


class _RelaySession(_Session):
    """The open-loop generator against the raw relay, whose echo worker sends each Query
    back as it came: the answered ids are read from the echoed headers."""

    def _take(self, header: bytes, now: float) -> int:
        _, name, body = proto.decode(header)
        if name != "Query":
            self.result.errors += 1
            return 0
        query, ids = proto.read_query(body)
        if not self._plain.full:  # then read as Ketch's replies are: by template
            template = proto.query_template(
                self.app, query.dtype, query.shape, self.timeout_us, 0, "", len(ids)
            )
            self._plain.learn(header, template, 1)  # ids only
        return self._answered_ok(ids, now)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000, help="single round trips per system")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds with 100 in flight, per system")
    args = parser.parse_args()
    print(machine())
    per_round = max(1, args.queries // args.rounds)
    x = np.zeros(4)
    lat: dict[str, list[float]] = {"relay": [], "ketch": []}
    qps: dict[str, list[float]] = {"relay": [], "ketch": [], "ketch-single": []}
    with RawRelay() as relay, LocalBroker(extra_args=["--cache-mb", "0"]) as broker:
        model = LocalModel("ketch.examples.basic:noop", "noop", backend=broker.backend, supervised=False)
        with model, broker.admin_client() as admin, Client(broker.frontend) as client:
            admin.create_app("noop", input_type="float64", input_shape=[4], slo_ms=1000, models=["noop"])
            model.wait_ready(admin)
            raw = _RelayClient(relay.address)
            try:
                for r in range(args.rounds):
                    _, got = closed_loop_one(raw.one, per_round, warmup=50 if r else 500)
                    lat["relay"] += got
                    _, got = closed_loop_one(
                        lambda _: client.predict("noop", x), per_round, warmup=50 if r else 500
                    )
                    lat["ketch"] += got
                for _ in range(2):
                    qps["relay"].append(raw.inflight(args.duration / 2))
                    res = closed_loop(broker.frontend, "noop", lambda _: x, 100, args.duration / 2)
                    qps["ketch"].append(res.throughput)
                    res = closed_loop(
                        broker.frontend, "noop", lambda _: x, 100, args.duration / 2, one_per_message=True
                    )
                    qps["ketch-single"].append(res.throughput)
            finally:
                raw.close()
            mean_batch = admin.stats()["models"]["noop"]["mean_batch"]
            peak = float(np.mean(qps["ketch"]))
            single_peak = float(np.mean(qps["ketch-single"]))
            # one at a time, a client's peak is 1/p50; half of it, as independent arrivals
            one_peak = 1000 / float(np.percentile(lat["ketch"], 50) * 1000)
            loads = {
                f"half of one-at-a-time peak (1/p50 = {one_peak:.0f} q/s)": one_peak / 2,
                "50% of ketch's peak (100 in flight, one query per message)": single_peak / 2,
                "25% of ketch's peak (100 in flight, refills in one message)": peak / 4,
                "50% of ketch's peak (100 in flight, refills in one message)": peak / 2,
            }
            opened = {}
            for label, rate in loads.items():  # the relay under the same arrivals, for scale
                opened[label] = (
                    rate,
                    {
                        "relay": open_loop(
                            relay.address,
                            "noop",
                            lambda _: x,
                            rate,
                            args.duration,
                            session_type=_RelaySession,
                        ),
                        "ketch": open_loop(broker.frontend, "noop", lambda _: x, rate, args.duration),
                    },
                )
    single, many = "100 in flight q/s, one per message", "100 in flight q/s, refills in one"
    rows = []
    for name, label in (("relay", "raw pyzmq relay"), ("ketch", "ketch (broker + replica)")):
        q = quantiles_ms(lat[name])
        rows.append({"system": label, "p50 ms": q["p50"], "p99 ms": q["p99"]})
    base, ours = rows
    base[single] = float(np.mean(qps["relay"]))
    ours[single] = float(np.mean(qps["ketch-single"]))
    ours[many] = float(np.mean(qps["ketch"]))
    ours["mean batch"] = mean_batch
    print(table(rows, ["system", "p50 ms", "p99 ms", single, many, "mean batch"]))
    print(
        f"\nketch/relay: p50 x{ours['p50 ms'] / base['p50 ms']:.2f}; throughput with 100 in flight "
        f"x{ours[single] / base[single]:.2f} (one query per message), "
        f"x{ours[many] / base[single]:.2f} (refills in one message)"
    )
    lost = 0
    for label, (rate, both) in opened.items():
        print(f"open loop (Poisson), {label}: {rate:.0f} q/s for {args.duration:.0f} s:")
        for name, res in both.items():
            lost += res.lost
            print(
                f"  {name:5s} p50 {res.quantile(50):.3f} ms, p99 {res.quantile(99):.3f} ms, "
                f"p99.9 {res.quantile(99.9):.3f} ms, {res.ok}/{res.sent} answered, {res.lost} lost"
            )
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
