"""Fuzz a running broker's three sockets and the HTTP gateway for a bounded time; check that
the broker and the gateway live, stay bounded in memory, and serve legitimate clients right.

    python tests/fuzz/fuzz_broker.py [--seconds 20] [--seed 1] [--no-http] [--strict-http]

Starts its own broker process (``--max-message-mb 8``, a 16 MiB cache), replica processes on
free loopback ports and an HTTP gateway, then for ``--seconds`` sends:

- garbage: random, truncated and mutated messages (from the golden vectors) to the
  frontend, backend and admin sockets;
- valid but extreme messages: Queries of extreme ids (0, 2**64-1, duplicates, 1 to 1500 of
  them), timeouts (0, 1, 2**32-1), priorities, empty and 64 KiB app names and contexts,
  every dtype code and shapes of rank 0 to 40 with extreme dimensions, payloads empty,
  mismatched, up to the frame limit, NaN, invalid UTF-8, JSON nested 10 to 100,000 deep;
  Feedback naming 0, 2**64-1 and other clients' ids with extreme labels; admin requests
  with extreme and mistyped arguments;
- a backend of fake replicas: Hellos at and past every limit (names of 128 and 129
  characters, credits 0 to 1024 and 2**32-1, rank 32 shapes, 128-character fingerprints),
  replicas of their own models that answer their batches with extreme PredictReplies
  (wrong batch ids, counts, shapes of rank 100, compute_us 2**32-1, deep JSON), Ready and
  Goodbye extremes;
- HTTP requests: extreme JSON bodies (deep, long, numeric extremes), wrong content types,
  unknown routes, binary garbage, to the Clipper and V2 routes.

Meanwhile a legitimate client (ZeroMQ) and a legitimate HTTP user each ask one query at a
time and check every answer; a sampler follows the broker's RSS. Exit status 0 when the
broker and the gateway are alive, every legitimate answer was right and in time, no bug was
hit in the broker (``internal_errors``), and its RSS stayed bounded and came back near its
baseline; ``--strict-http`` also fails on any 5xx from the gateway.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import struct
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import ketch
import numpy as np
import psutil
import zmq
from ketch import protocol as proto
from ketch.gateway.local import LocalGateway
from ketch.local import LocalBroker, LocalModel, wait_for

VECTORS = [
    p.read_bytes()
    for p in sorted((Path(__file__).resolve().parents[2] / "schemas" / "vectors").glob("*.bin"))
]
MAX_MB = 8
U64, U32 = 2**64 - 1, 2**32 - 1
RSS_BACK = 64 * 2**20  # after the fuzz, the broker's RSS must come back this near its baseline
REAL_MODELS = ("total", "jecho", "techo", "ba", "bb")  # served by real replicas (not the fakes)


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


def deep_json(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


def text(rng: random.Random) -> str:
    return rng.choice(
        ["", "a", "sum", "x" * 129, "é" * 100, "y" * 65536, "'; DROP TABLE apps;--", "../../etc"]
    )


def extreme_payload(rng: random.Random, dtype: int, shape: tuple[int, ...]) -> bytes:
    want = proto.expected_nbytes(dtype, shape) if all(0 <= d < 1 << 20 for d in shape) else None
    kind = rng.randrange(8)
    if kind == 0:
        return b""
    if kind == 1 and want is not None and want <= MAX_MB * 2**20:
        return bytes(want)
    if kind == 2:
        return deep_json(rng.choice([10, 1000, 100_000]))
    if kind == 3:
        return b"\xff\xfe\xfd" * rng.randrange(1, 100)
    if kind == 4:
        return struct.pack("<d", float("nan")) * 4
    if kind == 5 and rng.random() < 0.3:
        return bytes(rng.randrange(MAX_MB * 2**20 // 2, MAX_MB * 2**20 - 4096))  # near the limit
    if kind == 6:
        return json.dumps({"k": "v" * 65536, "n": U64, "f": 1e308, "neg": -(2**63)}).encode()
    return rng.randbytes(rng.randrange(0, 64))


def extreme_query(rng: random.Random, own_ids: list[int]) -> list[bytes]:
    n = rng.choice([1, 1, 2, 64, 65, 1000, 1024, 1025, 1500])
    ids = rng.choice(
        [
            [rng.randrange(1, U64) for _ in range(n)],
            [U64] * n,
            [0] * n,
            list(range(1, n + 1)),
        ]
    )
    own_ids.extend(i for i in ids if i)
    app = rng.choice(["sum", "sum", "doc", "text", "bandit", "fzj", "nope", text(rng)])
    dtype = rng.choice([*range(0, 17), proto.FLOAT64, proto.FLOAT64, proto.JSON, proto.STRING])
    shape = rng.choice([(), (4,), (1,), (0,), (-1,), (2**62,), (1,) * 33, (2,) * 40, (U32,)])
    payload = extreme_payload(rng, dtype, shape)
    payloads = [payload] * n if len(payload) * n <= 2 * MAX_MB * 2**20 else [payload]
    if rng.random() < 0.1:
        payloads = payloads[:-1]  # a payload short
    kw = {
        "timeout_us": rng.choice([0, 1, 1000, U32]),
        "priority": rng.choice([0, -128, 127]),
        "context": rng.choice(["", "u1", "c" * 1024, "c" * 1025, "z" * 65536]),
    }
    try:
        header = proto.build_query(app, dtype if dtype < 256 else 0, shape, ids, **kw)
    except (ValueError, OverflowError, struct.error):
        header = proto.build_query(app, proto.FLOAT64, (4,), ids[:1])
    return [header, *payloads]


def fake_model_query(rng: random.Random) -> list[bytes]:
    """A valid Query to the app served by the fake replicas only: batches for them to answer badly."""
    n = rng.choice([1, 3, 64])
    ids = [rng.randrange(1, U64) for _ in range(n)]
    payload = rng.choice([b'{"a": 1}', b"[1, 2, 3]", b'"' + b"s" * 65536 + b'"', b"null"])
    return [proto.build_query("fzj", proto.JSON, (), ids, timeout_us=rng.choice([0, 50_000])), *[payload] * n]


def extreme_feedback(rng: random.Random, others: list[int]) -> list[bytes]:
    label = rng.choice([b"1", b'"x"', deep_json(rng.choice([10, 100_000])), b"\xff", bytes(70_000)])
    fields = {
        "app": rng.choice(["bandit", "sum", "nope", "b" * 65536]),
        "request_id": rng.choice([1, U64, rng.randrange(1, U64)]),
        "query_id": rng.choice([0, U64, *(others[-5:] or [1])]),
        "label": {"dtype": rng.choice([proto.JSON, proto.STRING, proto.FLOAT64, 99 % 15]), "shape": []},
        "context": rng.choice(["", "c" * 2000]),
    }
    frames = [proto.encode("Feedback", fields)]
    if rng.random() < 0.3:
        fields["input"] = {"dtype": proto.FLOAT64, "shape": [1]}
        frames = [proto.encode("Feedback", fields), np.ones(1).tobytes()]
    return [*frames, label]


def extreme_admin(rng: random.Random) -> list[bytes]:
    args = rng.choice(
        [
            {"name": "q" * 200, "input_type": "float64"},
            {"name": "fz", "input_type": "float64", "input_shape": [U64], "slo_ms": 1e308},
            {"name": "fz2", "input_type": "string", "input_shape": [1] * 40, "slo_ms": -1},
            {"name": 5, "input_type": [1]},
            {"name": "x", "models": ["m"] * 10_000},
            {"name": "", "default": json.loads(deep_json(200))},
        ]
    )
    op = rng.choice(["app.create", "app.show", "model.configure", "app.link", "nope", "stats"])
    return [json.dumps({"id": rng.choice([1, U64, None, "s"]), "op": op, "args": args}).encode()]


class FakeReplicas:
    """Containers that say extreme Hellos and answer their batches with extreme replies, each
    of a model of its own (the legitimate apps' models are never theirs)."""

    def __init__(self, backend: str, rng: random.Random) -> None:
        self.backend, self.rng = backend, rng
        self.socks: list[zmq.Socket] = []
        self.hellos: Counter[str] = Counter()
        self.sent = 0

    def hello(self) -> None:
        rng = self.rng
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.linger = 0
        s.connect(self.backend)
        i = len(self.socks)
        fields = {  # at the limits, every one valid
            "model": rng.choice(["fzj", "fzj", "fzj", f"fz-{i}", "m" * 128]),
            "model_version": rng.choice(["1", "1", "1", "v" * 64]),
            "input": rng.choice(
                [{"dtype": "JSON", "shape": []}] * 3 + [{"dtype": "FLOAT64", "shape": [-1] * 32}]
            ),
            "sdk": rng.choice(["fuzz", "s" * 64, ""]),
            "replica_id": rng.choice([f"fz/{i}", "r" * 256, ""]),
            "credits": rng.choice([1, 2, 1024, 0]),
            "max_batch": rng.choice([0, 1, 65536]),
            "fingerprint": "build:fz",
            "pid": rng.choice([0, U32]),
        }
        if rng.random() < 0.5:  # and one past its limit
            key, value = rng.choice(
                [
                    ("model", "m" * 129),
                    ("model", ""),
                    ("model_version", "v" * 65),
                    ("input", {"dtype": "FLOAT64", "shape": [-1] * 33}),
                    ("sdk", "s" * 65),
                    ("replica_id", "r" * 257),
                    ("credits", U32),
                    ("max_batch", U32),
                    ("fingerprint", "f" * 129),
                ]
            )
            fields[key] = value
        s.send(proto.encode("Hello", fields))
        self.socks.append(s)

    def serve(self) -> None:
        """Answer what has arrived, badly."""
        rng = self.rng
        for s in self.socks:
            while s.poll(0):
                frames = s.recv_multipart()
                try:
                    _version, name, body = proto.decode(frames[0])
                except proto.DecodeError:
                    continue
                if name == "Error":
                    self.hellos[proto.to_dict(frames[0])["body"]["code"]] += 1
                elif name == "Welcome":
                    self.hellos["WELCOME"] += 1
                if name != "PredictRequest":
                    continue
                request = proto.read_predict_request(body)
                n = len(request.budgets_us)
                batch_id = rng.choice([request.batch_id] * 4 + [0, U64, request.batch_id + 1])
                kind = rng.randrange(6)
                if kind == 0:  # no answer at all: the deadline answers
                    continue
                if kind == 1:
                    outs = [(proto.Status.OK, proto.JSON, (), 0, "")] * n
                    payloads = [deep_json(rng.choice([10, 100_000]))] * n
                elif kind == 2:
                    outs = [(proto.Status.OK, proto.FLOAT64, (2,) * 100, 0, "")] * n
                    payloads = [b"\x00" * 8] * n
                elif kind == 3:
                    outs = [(proto.Status.OK, proto.JSON, (), 0, "")] * (n + 1)
                    payloads = [b"1"] * (n + rng.choice([0, 1, 2]))
                elif kind == 4:
                    outs = [(proto.Status.ERROR, None, (), rng.randrange(0, 100), "e" * 70_000)] * n
                    payloads = [b""] * n
                else:
                    outs = [(proto.Status.OK, proto.JSON, (), 0, "")] * n
                    payloads = [b'{"ok": true}'] * n
                header = proto.build_predict_reply(batch_id, rng.choice([0, 1, U32]), outs)
                s.send_multipart([header, *payloads])
                self.sent += 1
            if rng.random() < 0.05:
                s.send(proto.encode("Ready", {"credits": rng.choice([0, 2, U32])}))
            if rng.random() < 0.02:
                s.send(proto.encode("Goodbye", {"reason": "g" * 65536}))

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)


class Legit:
    """One query at a time on an app of its own, each answer checked."""

    def __init__(self) -> None:
        self.ok = 0
        self.wrong: list[str] = []
        self.stop = threading.Event()

    def zmq_loop(self, frontend: str) -> None:
        rng = np.random.default_rng(1)
        with ketch.Client(frontend) as client:
            while not self.stop.is_set():
                x = rng.normal(size=4)
                try:
                    pred = client.predict("sum", x, timeout_ms=10_000)
                except ketch.KetchError as exc:
                    self.wrong.append(f"zmq: {type(exc).__name__}: {exc}")
                    continue
                if pred.default or abs(float(pred.output) - x.sum()) > 1e-9:
                    self.wrong.append(f"zmq: wrong answer {pred}")
                else:
                    self.ok += 1

    def http_loop(self, url: str) -> None:
        rng = np.random.default_rng(2)
        with httpx.Client(base_url=url, timeout=30) as http:
            while not self.stop.is_set():
                x = rng.normal(size=4)
                try:
                    r = http.post("/sum/predict", json={"input": x.tolist()})
                    doc = r.json()
                except (httpx.HTTPError, ValueError) as exc:
                    self.wrong.append(f"http: {type(exc).__name__}: {exc}")
                    continue
                if r.status_code != 200 or doc.get("default") or abs(doc["output"] - x.sum()) > 1e-9:
                    self.wrong.append(f"http: {r.status_code} {str(doc)[:200]}")
                else:
                    self.ok += 1


def http_fuzz(http: httpx.Client, rng: random.Random, statuses: Counter[int], fives: list[str]) -> None:
    path = rng.choice(
        ["/sum/predict", "/doc/predict", "/text/predict", "/bandit/update", "/nope/predict",
         "/v2/models/total/infer", "/v2/models/sum/infer", "/v2/models/x/ready", "/" + "p" * 5000]
    )  # fmt: skip
    kind = rng.randrange(7)
    headers = {"content-type": "application/json"}
    if kind == 0:
        body = deep_json(rng.choice([100, 10_000, 100_000]))
    elif kind == 1:
        body = json.dumps({"input": "s" * 65536}).encode()
    elif kind == 2:
        body = json.dumps({"input": [U64, -(2**63), 1e308, -0.0, 2**64]}).encode()
    elif kind == 3:
        body = json.dumps({"input_batch": [[1.0, 2.0, 3.0, 4.0]] * 2000}).encode()
    elif kind == 4:
        body = rng.randbytes(rng.randrange(0, 2000))
        headers = {"content-type": rng.choice(["application/octet-stream", "text/plain", "application/json"])}
    elif kind == 5:
        body = json.dumps(
            {"inputs": [{"name": "x", "datatype": "UINT64", "shape": [1, 3], "data": [1, 2, U64]}]}
        ).encode()
    else:
        body = json.dumps(
            {"label": json.loads(deep_json(50)), "query_id": rng.choice([0, U64, 2**64])}
        ).encode()
    try:
        r = http.post(path, content=body, headers=headers)
    except httpx.HTTPError as exc:
        statuses[0] += 1
        fives.append(f"{path[:40]}: {type(exc).__name__}")
        return
    statuses[r.status_code] += 1
    if r.status_code >= 500 and r.status_code not in (503, 504):
        fives.append(f"{path[:40]} kind {kind}: {r.status_code} {r.text[:120]}")


def settle(admin: ketch.Admin, proc: psutil.Process, rss_before: int, timeout_s: float = 30) -> None:
    """Wait (at most ``timeout_s``) until, for a second on end, the last bursts are answered
    (the real models' queues empty) and the broker's RSS is back near its baseline (its trimmer
    returns memory about once a second); what has not settled by then, the checks after the
    run report."""
    since: list[float] = []

    def settled() -> bool:
        models = admin.stats()["models"]
        quiet = not any(models.get(m, {}).get("queue_depth") for m in REAL_MODELS)
        if not (quiet and proc.memory_info().rss - rss_before <= RSS_BACK):
            since.clear()
            return False
        since[:] = since or [time.monotonic()]
        return time.monotonic() - since[0] >= 1.0

    with contextlib.suppress(TimeoutError, ketch.KetchError, psutil.Error):
        wait_for(settled, timeout_s, "the broker to settle", interval_s=0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-http", action="store_true")
    parser.add_argument("--strict-http", action="store_true", help="fail on any 5xx from the gateway")
    parser.add_argument("--broker-log", default=None, help="keep the broker's log in this file")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tried: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    fives: list[str] = []
    failures: list[str] = []
    extra = ["--max-message-mb", str(MAX_MB), "--cache-mb", "16"]  # replicas dead after 5 s of silence
    with LocalBroker(extra_args=extra, log_path=args.broker_log) as broker:
        models = [
            LocalModel("ketch.examples.basic:total", "total", backend=broker.backend, supervised=False),
            LocalModel(
                "ketch.examples.basic:echo",
                "jecho",
                backend=broker.backend,
                supervised=False,
                input_type="json",
            ),
            LocalModel(
                "ketch.examples.basic:echo",
                "techo",
                backend=broker.backend,
                supervised=False,
                input_type="string",
            ),
            LocalModel("ketch.examples.basic:total", "ba", backend=broker.backend, supervised=False),
            LocalModel("ketch.examples.basic:total", "bb", backend=broker.backend, supervised=False),
        ]
        admin = broker.admin_client()
        admin.create_app("sum", input_type="float64", input_shape=[4], slo_ms=10_000, models=["total"])
        admin.create_app("doc", input_type="json", slo_ms=500, default=None, models=["jecho"])
        admin.create_app("text", input_type="string", slo_ms=500, models=["techo"])
        admin.create_app("bandit", input_type="float64", input_shape=[-1], slo_ms=500, models=["ba", "bb"])
        admin.set_policy("bandit", "exp3")
        admin.create_app("fzj", input_type="json", slo_ms=300, default={"d": 1}, models=["fzj"])
        for m in models:
            m.start()
        for m in models:
            m.wait_ready(admin)
        gateway = None if args.no_http else LocalGateway(broker.frontend, broker.admin).start()
        proc = psutil.Process(broker.proc.pid)
        ctx = zmq.Context.instance()
        socks = {}
        for role, address in (
            ("frontend", broker.frontend),
            ("backend", broker.backend),
            ("admin", broker.admin),
        ):
            s = ctx.socket(zmq.DEALER)
            s.linger = 0
            s.sndhwm = s.rcvhwm = 100_000
            s.connect(address)
            socks[role] = s
        fakes = FakeReplicas(broker.backend, rng)
        legit = Legit()
        threads = [threading.Thread(target=legit.zmq_loop, args=(broker.frontend,))]
        if gateway is not None:
            threads.append(threading.Thread(target=legit.http_loop, args=(gateway.url,)))
        for t in threads:
            t.start()
        time.sleep(1.0)
        rss_before = proc.memory_info().rss
        rss_peak = rss_before
        own_ids: list[int] = []
        http = httpx.Client(base_url=gateway.url, timeout=30) if gateway is not None else None
        end = time.monotonic() + args.seconds
        try:
            while time.monotonic() < end:
                for _ in range(20):
                    choice = rng.randrange(10)
                    try:
                        if choice < 3:
                            role = rng.choice(list(socks))
                            socks[role].send_multipart(mutate(rng), zmq.NOBLOCK)
                            tried[f"garbage {role}"] += 1
                        elif choice < 5:
                            socks["frontend"].send_multipart(
                                extreme_query(rng, own_ids), zmq.NOBLOCK, copy=False
                            )
                            tried["extreme query"] += 1
                        elif choice == 5:
                            socks["frontend"].send_multipart(extreme_feedback(rng, own_ids), zmq.NOBLOCK)
                            tried["extreme feedback"] += 1
                        elif choice == 6:
                            if rng.random() < 0.5:
                                socks["admin"].send_multipart(extreme_admin(rng), zmq.NOBLOCK)
                                tried["extreme admin"] += 1
                            else:
                                socks["frontend"].send_multipart(fake_model_query(rng), zmq.NOBLOCK)
                                tried["query to fake replicas"] += 1
                        elif choice == 7 and len(fakes.socks) < 60:
                            fakes.hello()
                            tried["extreme hello"] += 1
                        elif http is not None:
                            http_fuzz(http, rng, statuses, fives)
                            tried["extreme http"] += 1
                    except zmq.Again:
                        tried["dropped (full queue)"] += 1
                fakes.serve()
                for role, s in socks.items():  # keep the answers from piling up
                    while s.poll(0):
                        frames = s.recv_multipart()
                        if role == "admin":
                            continue
                        try:
                            doc = proto.to_dict(frames[0])
                        except proto.DecodeError:
                            codes["undecodable answer"] += 1
                            continue
                        if doc["type"] == "Error":
                            codes[f"Error {doc['body']['code']}"] += 1
                        elif doc["type"] == "Reply":
                            for item in doc["body"]["items"]:
                                codes[item["error"] if item["status"] == "ERROR" else item["status"]] += 1
                rss_peak = max(rss_peak, proc.memory_info().rss)
                if broker.proc.poll() is not None:
                    failures.append(f"the broker died (exit {broker.proc.returncode})")
                    break
        finally:
            if broker.proc.poll() is None:
                settle(admin, proc, rss_before)
            legit.stop.set()
            for t in threads:
                t.join(30)
            fakes.close()
            for s in socks.values():
                s.close(linger=0)
            if http is not None:
                http.close()
        alive = broker.proc.poll() is None
        rss_after = proc.memory_info().rss if alive else 0
        stats = admin.stats() if alive else {}
        counters, memory = stats.get("counters", {}), stats.get("memory", {})
        gateway_alive = gateway is None or gateway.proc.poll() is None
        if gateway is not None:
            with httpx.Client(base_url=gateway.url, timeout=30) as h:
                r = h.post("/sum/predict", json={"input": [1.0, 2.0, 3.0, 4.0]})
                if r.status_code != 200 or r.json()["output"] != 10.0:
                    failures.append(f"the gateway's answer after the fuzz: {r.status_code} {r.text[:200]}")
            gateway.stop()
        with ketch.Client(broker.frontend) as client:
            if client.predict("sum", [1.0, 2.0, 3.0, 4.0]).output != 10.0:
                failures.append("the broker's answer after the fuzz is wrong")
        admin.close()
        for m in models:
            m.stop()
    mib = 2**20
    print(
        f"fuzzed {sum(tried.values())} inputs over {args.seconds:.0f} s: "
        + ", ".join(f"{k} {v}" for k, v in sorted(tried.items()))
    )
    print(f"answers to the fuzzer: {dict(sorted(codes.items()))}")
    print(f"fake replicas: hellos answered {dict(sorted(fakes.hellos.items()))}, {fakes.sent} batch replies")
    if statuses:
        print(f"HTTP statuses: {dict(sorted(statuses.items()))}; 5xx other than 503/504: {len(fives)}")
        for line in fives[:10]:
            print(f"  {line}")
    print(
        f"legitimate clients: {legit.ok} answers right, {len(legit.wrong)} wrong or missing"
        + (f" (first: {legit.wrong[0]})" if legit.wrong else "")
    )
    print(
        f"broker RSS before {rss_before / mib:.0f} MiB, peak {rss_peak / mib:.0f} MiB,"
        f" after {rss_after / mib:.0f} MiB; alive {alive}; gateway alive {gateway_alive}"
    )
    print(f"broker counters: {dict(sorted(counters.items()))}")
    print(f"broker memory: {memory}; cache {stats.get('cache', {}).get('bytes')} bytes" if alive else "")
    if not alive:
        failures.append("the broker is not alive")
    if not gateway_alive:
        failures.append("the gateway is not alive")
    if legit.wrong:
        failures.append(f"{len(legit.wrong)} legitimate queries wrong or missing")
    if legit.ok == 0:
        failures.append("no legitimate query was answered")
    if counters.get("internal_errors"):
        failures.append("internal errors: some input reached a broker bug")
    if rss_peak - rss_before > 1024 * mib:
        failures.append(f"RSS peak {rss_peak / mib:.0f} MiB is over 1 GiB past the baseline")
    if rss_after - rss_before > RSS_BACK:
        failures.append(f"RSS after {rss_after / mib:.0f} MiB did not come back near the baseline")
    if args.strict_http and fives:
        failures.append(f"{len(fives)} 5xx answers from the gateway")
    for f in failures:
        print(f"FAILED: {f}")
    if not failures:
        print("all answered right")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
