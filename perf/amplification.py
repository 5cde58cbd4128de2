"""Amplification: what one client's burst costs the broker, and what another client sees meanwhile.

    python -m perf.amplification [--cases frames,contexts,ids,feedback,held,many-frames] [--scale 1]

Each case starts its own broker process and replica processes on free loopback ports, lets a
legitimate client run one query at a time on an app of its own throughout, and samples the
broker's RSS every 20 ms: before the burst (after a warm-up), its peak during the burst, and
after it (the burst answered, 2 s later). The cases are those of issue 15, at full size by
default (``--scale`` shrinks them):

    frames        one Query of 40 frames of 48 MiB (each frame under the 64 MiB frame limit)
    contexts      150 Queries, each with its own 4 MB context string
    ids           one 16 MB Query naming 2,000,000 request ids, with one payload
    feedback      15,000 queries of 64 KiB to an exp3 app (kept for feedback)
    held          2,000 queries of 1 MiB to a model that takes 50 ms a batch
    many-frames   one message of 1,000,000 empty frames

Uses only the public API and raw sockets, so it measures another checkout too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ketch
import numpy as np
import psutil
import zmq
from ketch import protocol as proto
from ketch.local import LocalBroker, LocalModel

from perf._harness import machine, table

MIB = 2**20


@dataclass
class Legit:
    """A client of its own app, one query at a time, while the burst goes on."""

    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    def run(self, frontend: str, stop: threading.Event) -> None:
        with ketch.Client(frontend) as client:
            i = 0
            while not stop.is_set():
                x = np.full(4, float(i))
                t0 = time.perf_counter()
                try:
                    p = client.predict("legit", x, timeout_ms=1000)
                    if abs(float(p.output) - 4.0 * i) < 1e-9 and not p.default:
                        self.ok += 1
                        self.latencies_ms.append((time.perf_counter() - t0) * 1000)
                    else:
                        self.errors += 1
                except ketch.Timeout:
                    self.timeouts += 1
                except ketch.KetchError:
                    self.errors += 1
                i += 1


class Sampler:
    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.samples.append((time.monotonic(), self.proc.memory_info().rss))
            except psutil.Error:
                return

    def between(self, t0: float, t1: float) -> list[int]:
        return [rss for t, rss in self.samples if t0 <= t <= t1]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def dealer(address: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.linger = 0
    s.sndhwm = s.rcvhwm = 0
    s.connect(address)
    return s


def drain(sock: zmq.Socket, quiet_s: float, limit_s: float, want: int = 0) -> tuple[int, dict[str, int]]:
    """Read answers until ``quiet_s`` without one (0.5 s once ``want`` answers came), or
    ``limit_s``: (messages, codes of the items)."""
    end = time.monotonic() + limit_s
    n, codes = 0, {}
    while time.monotonic() < end and sock.poll(int((0.5 if want and n >= want else quiet_s) * 1000)):
        frames = sock.recv_multipart()
        n += 1
        doc = proto.to_dict(frames[0])
        if doc["type"] == "Error":
            codes[f"Error {doc['body']['code']}"] = codes.get(f"Error {doc['body']['code']}", 0) + 1
            continue
        for item in doc["body"]["items"]:
            key = item["status"] if item["status"] != "ERROR" else item["error"]
            codes[key] = codes.get(key, 0) + 1
    return n, codes


# ---------------------------------------------------------------- the bursts


def burst_frames(ends: dict[str, str], scale: float) -> str:
    sock = dealer(ends["frontend"])
    size = int(48 * MIB * scale)
    block = memoryview(bytearray(size))
    sock.send_multipart(
        [proto.build_query("bytes", proto.DType.UINT8, (size,), [1]), *[block] * 40], copy=False
    )
    _, codes = drain(sock, 60.0, 120, want=1)  # the answer comes once the whole message is in
    sock.close()
    return f"40 frames x {size / MIB:.0f} MiB: {codes}"


def burst_contexts(ends: dict[str, str], scale: float) -> str:
    sock = dealer(ends["frontend"])
    n, size = max(1, int(150 * scale)), int(4_000_000 * scale)
    payload = np.ones(4).tobytes()
    for i in range(n):
        context = f"{i:08d}" + "c" * (size - 8)
        sock.send_multipart(
            [proto.build_query("legit", proto.FLOAT64, (4,), [i + 1], context=context), payload]
        )
    _, codes = drain(sock, 3.0, 120)
    sock.close()
    return f"{n} queries with a {size / 1e6:.0f} MB context each: {codes}"


def burst_ids(ends: dict[str, str], scale: float) -> str:
    sock = dealer(ends["frontend"])
    n = int(2_000_000 * scale)
    header = proto.build_query("legit", proto.FLOAT64, (4,), np.arange(1, n + 1, dtype=np.uint64))
    t0 = time.monotonic()
    sock.send_multipart([header, np.ones(4).tobytes()])
    messages, codes = drain(sock, 3.0, 300)
    sock.close()
    took = time.monotonic() - t0 - 3
    return (
        f"one {len(header) / 1e6:.0f} MB query of {n} ids: {messages} answer message(s) {codes}, {took:.1f} s"
    )


def burst_feedback(ends: dict[str, str], scale: float) -> str:
    n = int(15_000 * scale)
    x = np.zeros(64 * 1024, np.uint8)
    with ketch.Client(ends["frontend"]) as client:
        answers = client.predict_many("bandit", [x + (i % 251) for i in range(n)], return_exceptions=True)
    ok = sum(1 for a in answers if isinstance(a, ketch.Prediction) and not a.default)
    return f"{n} queries of 64 KiB to an exp3 app: {ok} answered"


def burst_held(ends: dict[str, str], scale: float) -> str:
    sock = dealer(ends["frontend"])
    n = int(2000 * scale)
    x = bytes(MIB)
    for i in range(n):
        sock.send_multipart([proto.build_query("slow", proto.DType.UINT8, (MIB,), [i + 1]), x], copy=False)
    _, codes = drain(sock, 3.0, 300)
    sock.close()
    return f"{n} queries of 1 MiB to a 50 ms model: {codes}"


def burst_many_frames(ends: dict[str, str], scale: float) -> str:
    sock = dealer(ends["frontend"])
    n = int(1_000_000 * scale)
    t0 = time.monotonic()
    sock.send_multipart([proto.build_query("legit", proto.FLOAT64, (4,), [1]), *[b""] * n])
    _, codes = drain(sock, 60.0, 120, want=1)  # the answer comes once the whole message is in
    sock.close()
    return f"one message of {n} empty frames: {codes}, {time.monotonic() - t0 - 3:.1f} s"


CASES: dict[str, Callable[[dict[str, str], float], str]] = {
    "frames": burst_frames,
    "contexts": burst_contexts,
    "ids": burst_ids,
    "feedback": burst_feedback,
    "held": burst_held,
    "many-frames": burst_many_frames,
}


def run_case(name: str, scale: float) -> dict[str, str]:
    with LocalBroker() as broker:
        legit_model = LocalModel(
            "ketch.examples.basic:total", "total", backend=broker.backend, supervised=False
        )
        slow = LocalModel("ketch.examples.basic:slow", "slow", backend=broker.backend, supervised=False,
                          input_type="uint8", env={"KETCH_SLOW_MS": "50"})  # fmt: skip
        bandits = [
            LocalModel("ketch.examples.basic:total", m, backend=broker.backend, supervised=False)
            for m in ("a", "b")
        ]
        models = [legit_model, slow, *bandits]
        with broker.admin_client() as admin:
            admin.create_app(  # uncached: its own queries do not grow the broker
                "legit", input_type="float64", input_shape=[4], slo_ms=1000, models=["total"], cache=False
            )
            admin.create_app("bytes", input_type="uint8", input_shape=[-1], slo_ms=2000, models=["a"])
            admin.create_app(
                "slow", input_type="uint8", input_shape=[-1], slo_ms=30000, models=["slow"], cache=False
            )
            admin.create_app("bandit", input_type="uint8", input_shape=[-1], slo_ms=5000, models=["a", "b"],
                             cache=False)  # fmt: skip
            admin.set_policy("bandit", "exp3")
            for m in models:
                m.start()
            for m in models:
                m.wait_ready(admin)
            ends = {"frontend": broker.frontend}
            sampler = Sampler(broker.proc.pid)
            stop = threading.Event()
            legit = Legit()
            runner = threading.Thread(target=legit.run, args=(broker.frontend, stop))
            runner.start()
            time.sleep(2.0)  # warm-up: templates learnt, the legit client at speed
            t_before = time.monotonic()
            time.sleep(0.5)
            before = statistics.median(sampler.between(t_before, time.monotonic()))
            t0 = time.monotonic()
            legit_before = (legit.ok, legit.errors, legit.timeouts, len(legit.latencies_ms))
            what = CASES[name](ends, scale)
            t1 = time.monotonic()
            time.sleep(2.0)  # settle
            after = statistics.median(sampler.between(time.monotonic() - 0.5, time.monotonic()))
            peak = max(sampler.between(t0, t1 + 2.0) or [before])
            stop.set()
            runner.join(10)
            sampler.stop()
            alive = broker.proc.poll() is None
            for m in models:
                m.stop()
    ok = legit.ok - legit_before[0]
    errors = legit.errors - legit_before[1]
    timeouts = legit.timeouts - legit_before[2]
    lat = legit.latencies_ms[legit_before[3] :]
    p99 = float(np.percentile(lat, 99)) if lat else float("nan")
    return {
        "case": name,
        "RSS before MiB": f"{before / MIB:.0f}",
        "peak MiB": f"{peak / MIB:.0f}",
        "after MiB": f"{after / MIB:.0f}",
        "legit client during the burst": f"{ok} ok, {errors} err, {timeouts} timeouts",
        "its p99 ms": f"{p99:.1f}",
        "broker alive": "yes" if alive else "NO",
        "the burst and its answers": what,
    }


COLUMNS = [
    "case",
    "RSS before MiB",
    "peak MiB",
    "after MiB",
    "legit client during the burst",
    "its p99 ms",
    "broker alive",
    "the burst and its answers",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    print(machine())
    rows = []
    for name in args.cases.split(","):
        rows.append(run_case(name.strip(), args.scale))
        print(" | ".join(rows[-1].values()), flush=True)
    print()
    print(table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
