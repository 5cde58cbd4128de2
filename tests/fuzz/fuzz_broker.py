"""Fuzz a running broker's three sockets for a bounded time; then check it still serves.

    python tests/fuzz/fuzz_broker.py [--seconds 20] [--seed 1]

Starts its own broker process and a replica on free loopback ports, sends random,
truncated and mutated messages (from the golden vectors) to the frontend, backend and
admin sockets, interleaved with real queries, and at the end checks that the broker is
alive, answers a real query correctly and that no real query was lost. Prints how many
inputs it tried. Exit status 0 on success.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import ketch
import numpy as np
import zmq
from ketch.local import LocalBroker, LocalModel

VECTORS = [
    p.read_bytes()
    for p in sorted((Path(__file__).resolve().parents[2] / "schemas" / "vectors").glob("*.bin"))
]


def mutate(rng: random.Random) -> list[bytes]:
    kind = rng.randrange(5)
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 300))]
    frame = bytearray(rng.choice(VECTORS))
    if kind == 1:
        frame = frame[: rng.randrange(0, len(frame))]
    elif kind == 2:
        for _ in range(rng.randrange(1, 8)):
            frame[rng.randrange(len(frame))] = rng.randrange(256)
    elif kind == 3:
        return [bytes(frame), *(rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(0, 4)))]
    return [bytes(frame)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tried = 0
    with LocalBroker() as broker:
        model = LocalModel("ketch.examples.basic:total", "total", backend=broker.backend, supervised=False)
        with model, broker.admin_client() as admin, ketch.Client(broker.frontend) as client:
            admin.create_app("sum", input_type="float64", input_shape=[4], slo_ms=2000, models=["total"])
            model.wait_ready(admin)
            ctx = zmq.Context.instance()
            socks = []
            for address in (broker.frontend, broker.backend, broker.admin):
                s = ctx.socket(zmq.DEALER)
                s.linger = 0
                s.sndhwm = 100_000
                s.connect(address)
                socks.append(s)
            real = 0
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                for _ in range(200):
                    try:
                        rng.choice(socks).send_multipart(mutate(rng), zmq.NOBLOCK)
                        tried += 1
                    except zmq.Again:
                        pass
                for s in socks:  # keep the answers from piling up
                    while s.poll(0):
                        s.recv_multipart()
                x = np.random.default_rng(real).normal(size=4)
                pred = client.predict("sum", x)
                assert abs(float(pred.output) - x.sum()) < 1e-9, "wrong answer under fuzzing"
                real += 1
            for s in socks:
                s.close()
            status = admin.status()
            counters = admin.stats()["counters"]
    print(
        f"fuzzed {tried} messages over {args.seconds:.0f} s at 3 sockets;"
        f" {real} real queries all answered right"
    )
    print(f"broker alive (pid {status['pid']}); error counters: {dict(sorted(counters.items()))}")
    if counters.get("internal_errors"):
        print("internal errors: some bad input was not answered with a clear error")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
