"""HTTP through the gateway next to the native ZeroMQ client, in one run.

Starts a broker, a small model (``ketch.examples.basic:total``: the sum of 4 floats) with
its replicas and ``ketch gateway``, all on free loopback ports; then, for each concurrency
level, drives the same app in closed loop (each of C workers sends its next query when the
last is answered) for a fixed time through:

    zmq            ketch.AsyncClient.predict, the native client (the baseline)
    zmq-sync       ketch.Client.predict, the blocking native client, one per thread
    clipper        POST /{app}/predict, one keep-alive connection per worker
    kserve         POST /v2/models/{app}/infer with a JSON tensor [1, 4], likewise
    clipper-httpx  POST /{app}/predict with httpx.AsyncClient (C pooled connections)
    grpc           KServe V2 over gRPC: ModelInfer with raw FP64 [1, 4], through grpc.aio and
                   the stubs generated from the proto, one channel (connection) per worker
    grpc-triton    the same through tritonclient.grpc.aio (one client per worker)

``clipper`` and ``kserve`` use a minimal HTTP/1.1 client written on asyncio streams, and
``grpc`` the bare generated stub, so the figures are the gateway's rather than the client
library's; ``clipper-httpx`` and ``grpc-triton`` show what a typical Python client adds. It
prints throughput and p50/p99 latency per mode, with each as a share of zmq's throughput.
Every query carries a distinct random input and every answer is checked. The load generator
runs in this process on the same machine: its CPU use counts against every mode.

    python -m perf.http                          # C = 1, 8, 32; 3 s each (or: python perf/http.py)
    python -m perf.http --concurrency 1,4 --duration 5 --workers 2 --replicas 2
    python -m perf.http --modes zmq,kserve,grpc      # HTTP against gRPC, same queries
    python -m perf.http --access-log-ab --modes clipper,kserve   # access log on vs off

``--access-log-ab`` runs a second gateway with ``--no-access-log`` beside the first (whose
access lines go to its log file) and runs each HTTP mode against both, alternating
(on, off, off, on: half the measured time each), so the two figures share the same machine
state; the ``vs zmq`` column is then the share of the same mode without the access log.
"""

from __future__ import annotations

import os
import sys

# this file is perf/http.py: keep its folder from shadowing the standard library's ``http``
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
# gRPC clients here, and processes started (fork, then exec): not gRPC's fork handlers
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

import argparse
import asyncio
import json
import platform
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
import httpx
import numpy as np
import psutil
import tritonclient.grpc.aio as triton_aio
from ketch import AsyncClient, Client
from ketch.gateway._oip import grpc_predict_v2_pb2 as pb
from ketch.gateway._oip import grpc_predict_v2_pb2_grpc as pb_grpc
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, LocalModel

APP = "bench"


async def closed_loop(
    call: Callable[[np.ndarray], Awaitable[float]], concurrency: int, duration_s: float, warmup_s: float
) -> tuple[int, list[float], int]:
    """(answered, latencies in ms, errors) over ``duration_s`` after ``warmup_s``."""
    rng = np.random.default_rng(concurrency)
    latencies: list[float] = []
    counted = [0, 0]  # answered, errors
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s

    async def worker() -> None:
        while True:
            x = rng.normal(size=4)
            t0 = time.perf_counter()
            if t0 >= end:
                return
            try:
                got = await call(x)
                ok = abs(got - x.sum()) < 1e-9
            except Exception:
                ok = False
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= end:
                if ok:
                    counted[0] += 1
                    latencies.append((t1 - t0) * 1000)
                else:
                    counted[1] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return counted[0], latencies, counted[1]


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: one request at a time;
    replies with Content-Length or chunked."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rpartition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, doc: object) -> object:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        body = json.dumps(doc).encode()
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = dict(
            (k.strip().lower(), v.strip())
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        )
        if b"content-length" in headers:
            payload = await self.reader.readexactly(int(headers[b"content-length"]))
        else:  # Transfer-Encoding: chunked (Ray Serve's proxy answers so)
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            payload = b"".join(parts)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        return json.loads(payload)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


def _kserve_doc(x: np.ndarray) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP64", "shape": [1, 4], "data": x.tolist()}]}


def _infer_request(x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=APP)
    req.inputs.add(name="input", datatype="FP64", shape=[1, 4])
    req.raw_input_contents.append(x.astype("<f8").tobytes())
    return req


async def run_grpc(mode: str, target: str, concurrency: int, duration_s: float, warmup_s: float):
    """``grpc`` (the generated stub on grpc.aio) or ``grpc-triton``: one channel per worker."""
    if mode == "grpc":
        channels = [grpc.aio.insecure_channel(target) for _ in range(concurrency)]
        idle = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]

        async def ask(stub, x: np.ndarray) -> float:
            res = await stub.ModelInfer(_infer_request(x), timeout=10)
            return float(np.frombuffer(res.raw_output_contents[0], "<f8")[0])

        async def close() -> None:
            for c in channels:
                await c.close()
    else:
        clients = [triton_aio.InferenceServerClient(target) for _ in range(concurrency)]
        idle = list(clients)

        async def ask(client, x: np.ndarray) -> float:
            inp = triton_aio.InferInput("input", [1, 4], "FP64")
            inp.set_data_from_numpy(x.reshape(1, 4))
            return float((await client.infer(APP, [inp], client_timeout=10)).as_numpy("output")[0])

        async def close() -> None:
            for c in clients:
                await c.close()

    async def call(x: np.ndarray) -> float:
        conn = idle.pop()
        try:
            return await ask(conn, x)
        finally:
            idle.append(conn)

    try:
        return await closed_loop(call, concurrency, duration_s, warmup_s)
    finally:
        await close()


async def run_mode(mode: str, frontend: str, url: str, concurrency: int, duration_s: float, warmup_s: float):
    if mode in ("clipper", "kserve"):
        pool = [RawHTTP(url) for _ in range(concurrency)]
        idle = list(pool)

        async def call(x: np.ndarray) -> float:
            conn = idle.pop()
            try:
                if mode == "clipper":
                    return (await conn.post(f"/{APP}/predict", {"input": x.tolist()}))["output"]
                return (await conn.post(f"/v2/models/{APP}/infer", _kserve_doc(x)))["outputs"][0]["data"][0]
            finally:
                idle.append(conn)

        try:
            return await closed_loop(call, concurrency, duration_s, warmup_s)
        finally:
            for conn in pool:
                await conn.close()
    if mode == "zmq":
        client = AsyncClient(frontend)

        async def call(x: np.ndarray) -> float:
            return float((await client.predict(APP, x)).output)

        try:
            return await closed_loop(call, concurrency, duration_s, warmup_s)
        finally:
            await client.close()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as http:

        async def call(x: np.ndarray) -> float:
            r = await http.post(f"/{APP}/predict", json={"input": x.tolist()})
            r.raise_for_status()
            return r.json()["output"]

        return await closed_loop(call, concurrency, duration_s, warmup_s)


def run_sync(
    frontend: str, concurrency: int, duration_s: float, warmup_s: float
) -> tuple[int, list[float], int]:
    """The blocking client, one per thread, in closed loop (same accounting as ``closed_loop``)."""
    latencies: list[float] = []
    counted = [0, 0]
    lock = threading.Lock()
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with Client(frontend) as client:
            while True:
                x = rng.normal(size=4)
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                try:
                    ok = abs(float(client.predict(APP, x).output) - x.sum()) < 1e-9
                except Exception:
                    ok = False
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= end:
                    with lock:
                        counted[0 if ok else 1] += 1
                        if ok:
                            latencies.append((t1 - t0) * 1000)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counted[0], latencies, counted[1]


def access_log_ab(
    mode: str, frontend: str, on_url: str, off_url: str, c: int, args: argparse.Namespace
) -> list:
    """``mode`` against a gateway with the access log on and one with it off, alternating
    (on, off, off, on), each side half the measured time; rows for both."""
    got: dict[str, tuple[int, list[float], int]] = {"on": (0, [], 0), "off": (0, [], 0)}
    for which in ("on", "off", "off", "on"):
        url = on_url if which == "on" else off_url
        n, lat, errs = asyncio.run(run_mode(mode, frontend, url, c, args.duration / 4, args.warmup))
        before = got[which]
        got[which] = (before[0] + n, before[1] + lat, before[2] + errs)
    rows, off_qps = [], 0.0
    for which in ("off", "on"):
        n, lat, errs = got[which]
        qps = n / (args.duration / 2)
        p50, p99 = np.percentile(lat, [50, 99]) if lat else (float("nan"),) * 2
        off_qps = qps if which == "off" else off_qps
        label = f"{mode}, access log {which}"
        share = f"{qps / off_qps:.0%}" if off_qps else "-"
        rows.append((c, label, f"{qps:,.0f}", f"{p50:.2f}", f"{p99:.2f}", share, errs))
        print(f"  c={c:<3} {label:24} {qps:9,.0f} q/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,8,32", help="Comma-separated concurrency levels.")
    parser.add_argument("--duration", type=float, default=3.0, help="Measured seconds per mode and level.")
    parser.add_argument("--warmup", type=float, default=0.5, help="Unmeasured seconds before each run.")
    parser.add_argument("--workers", type=int, default=1, help="Gateway worker processes.")
    parser.add_argument("--replicas", type=int, default=1, help="Model replica processes.")
    parser.add_argument("--modes", default="zmq,zmq-sync,clipper,kserve,clipper-httpx,grpc,grpc-triton")
    parser.add_argument(
        "--access-log-ab", action="store_true", help="HTTP modes with the access log on and off, alternating."
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = args.modes.split(",")

    with LocalBroker() as broker:
        model = LocalModel(
            "ketch.examples.basic:total",
            "total",
            backend=broker.backend,
            replicas=args.replicas,
            input_shape="4",
        )
        with model, broker.admin_client() as admin:
            admin.create_app(APP, input_type="float64", input_shape=[4], slo_ms=5000, models=["total"])
            model.wait_ready(admin, timeout_s=60)
            quiet_args = ["--no-access-log"]
            with (
                LocalGateway(broker.frontend, broker.admin, workers=args.workers) as gw,
                LocalGateway(
                    broker.frontend, broker.admin, workers=args.workers, extra_args=quiet_args
                ) as quiet,
            ):
                print(
                    f"{platform.node()}: {psutil.cpu_count()} cpus, Python {platform.python_version()}, "
                    f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC"
                )
                print(
                    f"model: sum of 4 floats, {args.replicas} replica(s); gateway: {args.workers} worker(s); "
                    f"{args.duration:g} s per run after {args.warmup:g} s warm-up; closed loop"
                )
                rows = []
                for c in levels:
                    base = None
                    for mode in modes:
                        if mode == "zmq-sync":
                            n, lat, errs = run_sync(broker.frontend, c, args.duration, args.warmup)
                        elif mode.startswith("grpc"):
                            n, lat, errs = asyncio.run(run_grpc(mode, gw.grpc, c, args.duration, args.warmup))
                        elif args.access_log_ab and mode != "zmq":
                            rows += access_log_ab(mode, broker.frontend, gw.url, quiet.url, c, args)
                            continue
                        else:
                            n, lat, errs = asyncio.run(
                                run_mode(mode, broker.frontend, gw.url, c, args.duration, args.warmup)
                            )
                        qps = n / args.duration
                        p50, p99 = np.percentile(lat, [50, 99]) if lat else (float("nan"),) * 2
                        base = qps if mode == "zmq" else base
                        share = f"{qps / base:.0%}" if base else "-"
                        rows.append((c, mode, f"{qps:,.0f}", f"{p50:.2f}", f"{p99:.2f}", share, errs))
                        print(
                            f"  c={c:<3} {mode:11} {qps:9,.0f} q/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms",
                            flush=True,
                        )
    share = "vs zmq (log off)" if args.access_log_ab else "vs zmq"
    header = ("concurrency", "client", "queries/s", "p50 ms", "p99 ms", share, "errors")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---:" if i in (0, 2, 3, 4, 5, 6) else "---" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
