"""Every SDK against every other: golden vectors, encoders and real containers.

Java (sdk/java, fat jar built by ``mvn package``) and R (sdk/r, run from source with
Rscript) each have a ``vectors`` tool: ``encode JSON_DIR OUT_DIR`` writes their own
encoding of every golden twin, ``decode BIN_DIR OUT_DIR`` writes what they read. Here
each SDK's encodings are decoded by Python, Java and R and must equal the twins; then a
real broker serves queries through Java and R model containers.

Without a JDK/jar or Rscript these tests skip, unless KETCH_REQUIRE_POLYGLOT=1 (set by
scripts/test.sh and so by CI), where a missing toolchain is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ketch
import numpy as np
import pytest
from ketch import protocol as proto
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "schemas" / "vectors"
JAR = ROOT / "sdk" / "java" / "target" / "ketch-sdk-0.1.0-all.jar"
R_DIR = ROOT / "sdk" / "r"
REQUIRED = os.environ.get("KETCH_REQUIRE_POLYGLOT") == "1"


def _need(ok: bool, what: str) -> None:
    if not ok:
        if REQUIRED:
            pytest.fail(f"{what} is missing (KETCH_REQUIRE_POLYGLOT=1)")
        pytest.skip(f"{what} is missing")


def java_cmd(main: str, *args: str) -> list[str]:
    _need(shutil.which("java") is not None and JAR.exists(), f"java and {JAR.relative_to(ROOT)}")
    return ["java", "-cp", str(JAR), main, *args]


def r_cmd(script: str, *args: str) -> list[str]:
    _need(shutil.which("Rscript") is not None, "Rscript")
    return ["Rscript", str(R_DIR / "inst" / script), *args]


def python_vectors(mode: str, src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.json" if mode == "encode" else "*.bin")):
        if mode == "encode":
            (out / f"{path.stem}.bin").write_bytes(proto.from_dict(json.loads(path.read_text("utf-8"))))
        else:
            (out / f"{path.stem}.json").write_text(json.dumps(proto.to_dict(path.read_bytes())), "utf-8")


SDKS = {
    "python": None,
    "java": lambda mode, src, out: java_cmd("io.ketch.tools.Vectors", mode, str(src), str(out)),
    "r": lambda mode, src, out: r_cmd("vectors.R", mode, str(src), str(out)),
}


def run_vectors(sdk: str, mode: str, src: Path, out: Path) -> None:
    if sdk == "python":
        python_vectors(mode, src, out)
        return
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(SDKS[sdk](mode, src, out), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{sdk} vectors {mode}: {done.stdout}\n{done.stderr}"


def twins() -> dict[str, dict]:
    return {
        p.stem: {k: v for k, v in json.loads(p.read_text("utf-8")).items() if k != "payloads"}
        for p in VECTORS.glob("*.json")
    }


def normalise(doc: dict) -> dict:
    """JSON round trip so 0.75 and 0.75000 compare, ints stay ints."""
    return json.loads(json.dumps(doc, sort_keys=True))


@pytest.mark.parametrize("encoder", list(SDKS))
@pytest.mark.parametrize("decoder", list(SDKS))
def test_every_sdk_reads_every_sdks_encoding(encoder, decoder, tmp_path):
    encoded, decoded = tmp_path / "enc", tmp_path / "dec"
    run_vectors(encoder, "encode", VECTORS, encoded)
    run_vectors(decoder, "decode", encoded, decoded)
    expected = twins()
    got = {p.stem: json.loads(p.read_text("utf-8")) for p in decoded.glob("*.json")}
    assert sorted(got) == sorted(expected)
    for name, twin in expected.items():
        assert normalise(got[name]) == normalise(twin), f"{encoder} -> {decoder}: {name}"


def test_python_reads_golden_bytes_of_java_and_r_unchanged(tmp_path):
    """Golden .bin files decoded by Java and R give the twins (the reference direction)."""
    for sdk in ("java", "r"):
        out = tmp_path / sdk
        run_vectors(sdk, "decode", VECTORS, out)
        for name, twin in twins().items():
            got = json.loads((out / f"{name}.json").read_text("utf-8"))
            assert normalise(got) == normalise(twin), (sdk, name)


CONTAINERS = {
    "java": lambda backend, name, kind, rid: java_cmd(
        "io.ketch.examples.Serve",
        "--broker",
        backend,
        "--name",
        name,
        "--version",
        "1",
        "--kind",
        kind,
        "--replica-id",
        rid,
    ),
    "r": lambda backend, name, kind, rid: r_cmd(
        "serve_example.R",
        "--broker",
        backend,
        "--name",
        name,
        "--version",
        "1",
        "--kind",
        kind,
        "--replica-id",
        rid,
    ),
}


@pytest.fixture
def thread_broker(make_thread_broker):
    """The conftest broker, but one that waits 15 s (not 1 s) before it calls a silent container
    dead: a Java or R process just started on a busy machine can stall for longer than a
    second, and what this module tests is serving across languages, not failure detection."""
    return make_thread_broker(heartbeat_ms=200, dead_after_ms=15_000)


@pytest.fixture
def containers(thread_broker, tmp_path):
    procs: list[subprocess.Popen] = []

    def start(sdk: str, name: str, kind: str) -> subprocess.Popen:
        cmd = CONTAINERS[sdk](thread_broker.backend, name, kind, f"{sdk}-{name}-{len(procs)}")
        log = open(tmp_path / f"{sdk}-{name}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("sdk", ["java", "r"])
def test_containers_of_other_languages_serve_real_queries(sdk, thread_broker, containers, tmp_path):
    slo = 60_000  # a first batch of a container just started on a busy machine can take seconds
    with ketch.Admin(thread_broker.admin) as admin, ketch.Client(thread_broker.frontend) as client:
        admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=slo, models=[f"{sdk}-sum"])
        admin.create_app("echo", input_type="string", slo_ms=slo, models=[f"{sdk}-echo"])
        admin.create_app("bytes", input_type="bytes", slo_ms=slo, models=[f"{sdk}-echo"])
        admin.create_app("fail", input_type="float64", input_shape=[-1], slo_ms=slo, models=[f"{sdk}-fail"])
        for kind in ("sum", "echo", "fail"):
            containers(sdk, f"{sdk}-{kind}", kind)
        for kind in ("sum", "echo", "fail"):
            wait_for(lambda k=kind: admin.replicas(f"{sdk}-{k}"), 60, f"the {sdk} {kind} container")
        rng = np.random.default_rng()
        xs = [rng.normal(size=int(n)) for n in rng.integers(1, 20, size=100)]
        preds = client.predict_many("sum", xs, timeout_ms=slo)
        assert [float(p.output) for p in preds] == pytest.approx([float(x.sum()) for x in xs])
        assert all(p.model == f"{sdk}-sum" and not p.default for p in preds)
        assert client.predict("echo", "héllo ✓", timeout_ms=slo).output == "héllo ✓"
        assert client.predict("bytes", b"\x00\xffab", timeout_ms=slo).output == b"\x00\xffab"
        with pytest.raises(ketch.ModelError, match="boom"):
            client.predict("fail", [1.0], timeout_ms=slo)
        assert (
            float(client.predict("sum", [1.0, 2.0], timeout_ms=slo).output) == 3.0
        )  # still serving after a failure
        # traced queries: batches carry each item's trace context (docs/tracing.md), which a
        # container of this SDK reads past and answers as any other
        for i in range(1, 4):
            tp = f"00-{i:032x}-{i:016x}-01"
            pred = client.predict("sum", [1.0, float(i)], timeout_ms=slo, traceparent=tp, tracestate="k=v")
            assert float(pred.output) == 1.0 + i
            pred = client.predict("sum", [2.0, float(i)], timeout_ms=slo, traceparent=tp)  # from templates
            assert float(pred.output) == 2.0 + i
        replica = admin.replicas(f"{sdk}-sum")[0]
        assert replica["sdk"].startswith(f"{sdk}/")
        assert replica["protocol"] == 2  # the broker speaks 1 and 2, the container too


def _java_client(frontend: str, app: str, *args: str) -> tuple[int, list[dict]]:
    done = subprocess.run(
        java_cmd("io.ketch.examples.Predict", "--frontend", frontend, "--app", app, *args),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_the_java_client_against_a_real_broker(thread_broker, replica_threads):
    from ketch.examples.basic import total

    def fail(inputs):
        raise ValueError("this model always fails")

    replica_threads(total, backend=thread_broker.backend, name="py-sum")
    replica_threads(fail, backend=thread_broker.backend, name="py-fail")
    with ketch.Admin(thread_broker.admin) as admin:
        admin.create_app("sum", input_type="float64", input_shape=[-1], slo_ms=5000, models=["py-sum"])
        admin.create_app("fail", input_type="float64", input_shape=[-1], slo_ms=5000, models=["py-fail"])
        wait_for(lambda: admin.replicas("py-sum") and admin.replicas("py-fail"), 30, "the replicas")
    rng = np.random.default_rng()
    xs = [rng.normal(size=int(n)).round(6) for n in rng.integers(1, 9, size=70)]
    spec = ";".join(",".join(repr(float(v)) for v in x) for x in xs)
    for extra in ([], ["--async"], ["--timeout-ms", "3000"]):
        rc, lines = _java_client(thread_broker.frontend, "sum", "--doubles", spec, *extra)
        assert rc == 0, lines
        assert [line["output"][0] for line in lines] == pytest.approx([float(x.sum()) for x in xs])
        assert all(line["model"] == "py-sum" and not line["default"] for line in lines)
        assert len({line["request_id"] for line in lines}) == len(xs)
    rc, lines = _java_client(thread_broker.frontend, "sum", "--doubles", "1.5,2")
    assert (rc, lines[0]["output"]) == (0, [3.5])
    rc, lines = _java_client(thread_broker.frontend, "fail", "--doubles", "1")
    assert rc == 1
    assert lines[0]["error"] == "MODEL_ERROR" and lines[0]["class"] == "ModelError"
    assert "this model always fails" in lines[0]["message"]
    rc, lines = _java_client(thread_broker.frontend, "nope", "--doubles", "1")
    assert (rc, lines[0]["error"], lines[0]["class"]) == (1, "UNKNOWN_APP", "UnknownApp")
    rc, lines = _java_client(thread_broker.frontend, "sum", "--string", "not numbers")
    assert (rc, lines[0]["error"], lines[0]["class"]) == (1, "BAD_INPUT", "BadInput")
    # per-input outcomes: a good run with an app that fails in between
    rc, lines = _java_client(thread_broker.frontend, "fail", "--doubles", "1;2;3", "--async")
    assert rc == 1 and [line["class"] for line in lines] == ["ModelError"] * 3


class _FakeBackend:
    """The broker's backend played by the test: a ROUTER on a free port that sends the
    faults a real broker never sends."""

    def __init__(self) -> None:
        import zmq

        self._zmq = zmq
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.identity = b""

    def expect(self, name: str, timeout_s: float = 60) -> tuple[dict, list[bytes]]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000)), f"no {name}"
            identity, header, *payloads = self.sock.recv_multipart()
            msg = proto.to_dict(header)
            if msg["type"] == name:
                self.identity = identity
                return msg, payloads

    def send(self, name: str, body: dict, payloads: list[bytes] = (), version: int | None = None) -> None:
        header = proto.from_dict({"type": name, "version": version, "body": body})
        self.sock.send_multipart([self.identity, header, *payloads])

    def send_raw(self, frames: list[bytes]) -> None:
        self.sock.send_multipart([self.identity, *frames])

    def batch(self, batch_id: int, payloads: list[bytes], **body: object) -> dict:
        """Send a float64 PredictRequest (``body`` overrides its fields); its reply's body."""
        fields = {"batch_id": batch_id, "dtype": 11, "ndim": 1, "budgets_us": [10**7] * len(payloads), **body}
        self.send("PredictRequest", fields, payloads)
        while True:
            reply, _ = self.expect("PredictReply")
            if reply["body"]["batch_id"] == batch_id:
                return reply["body"]

    def close(self) -> None:
        self.sock.close()


def _float64(*xs: float) -> bytes:
    return np.asarray(xs, dtype="<f8").tobytes()


def _newer(name: str) -> list[bytes]:
    """The frames of schemas/vectors/newer/NAME: a message as a broker of version 3 sends it."""
    twin = json.loads((VECTORS / "newer" / f"{name}.json").read_text("utf-8"))
    payloads = [base64.b64decode(p) for p in twin["payloads"]]
    return [(VECTORS / "newer" / f"{name}.bin").read_bytes(), *payloads]


def _start_replica(sdk: str, backend: _FakeBackend, kind: str, log_dir: Path):
    """A ``sum`` or ``fail`` replica of ``sdk`` against ``backend``: (Python Replica, process)."""
    from ketch.runtime import Replica

    if sdk == "python":

        def total(inputs):
            return [float(x.sum()) for x in inputs]

        def fail(inputs):
            raise ValueError("boom")

        replica = Replica(total if kind == "sum" else fail, name=f"py-{kind}", broker=backend.endpoint)
        threading.Thread(target=replica.run, daemon=True).start()
        return replica, None
    log = open(log_dir / f"{sdk}-{kind}.log", "wb")  # noqa: SIM115
    cmd = CONTAINERS[sdk](backend.endpoint, f"{sdk}-{kind}", kind, f"{sdk}-{kind}-faults")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT)
    log.close()
    return None, proc


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sdk", ["python", "java", "r"])
def test_a_newer_broker_and_every_sdks_replica(sdk, tmp_path):
    """A broker of a version 3 (its Welcome chooses 2, its messages carry fields appended to
    their tables, it sends a message type this schema lacks): the replica offers [1, 2],
    reads what it knows, answers the unknown type UNKNOWN_MESSAGE and a version-3 message
    UNSUPPORTED_VERSION, keeps serving, and its drain ends on the broker's Paused."""
    backend = _FakeBackend()
    replica, proc = _start_replica(sdk, backend, "sum", tmp_path)
    try:
        hello, _ = backend.expect("Hello")
        assert (hello["version"], hello["body"]["versions"]) == (1, [1, 2])
        backend.send_raw(_newer("welcome"))
        backend.send_raw(_newer("predict_request"))
        reply, payloads = backend.expect("PredictReply")
        assert reply["body"]["batch_id"] == 42 and reply["body"]["error"] == "NONE"
        assert [np.frombuffer(p, "<f8")[0] for p in payloads] == [4.0, -4.0]
        backend.send_raw(_newer("unknown_body"))
        assert backend.expect("Error")[0]["body"]["code"] == "UNKNOWN_MESSAGE"
        backend.send("Heartbeat", {}, version=3)
        assert backend.expect("Error")[0]["body"]["code"] == "UNSUPPORTED_VERSION"
        assert backend.batch(43, [_float64(1.0, 2.0)], shapes=[2])["error"] == "NONE"
        # drain: Ready{0}; Goodbye only after the Paused, and after the batch sent before it
        if replica is not None:
            replica.stop()
        else:
            assert proc is not None
            proc.send_signal(signal.SIGTERM if sdk == "java" else signal.SIGINT)
        assert backend.expect("Ready")[0]["body"]["credits"] == 0
        backend.send("PredictRequest", {"batch_id": 44, "dtype": 11, "ndim": 1, "shapes": [1],
                                        "budgets_us": [10**7]}, [_float64(5.0)])  # fmt: skip
        reply, _ = backend.expect("PredictReply")
        assert reply["body"]["batch_id"] == 44
        early = backend.sock.poll(300)  # the quiet spell (50 ms) would have ended the drain by now
        if early:
            message = proto.to_dict(backend.sock.recv_multipart()[1])
            assert message["type"] == "Heartbeat", message
        backend.send_raw(_newer("paused"))
        assert backend.expect("Goodbye")[0]["body"]["reason"] in ("drained", "stopped")
        if proc is not None:
            assert proc.wait(30) == 0
    finally:
        if replica is not None:
            replica.stop()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        backend.close()


@pytest.mark.timeout(240)
def test_the_same_fault_gets_the_same_error_code_in_every_sdk(tmp_path):
    """A batch with an unknown dtype, one whose frames do not add up, one with an item whose
    payload does not fit, a model that raises, a message in another protocol version and one
    not valid on the backend, a newer one's message type, an undecodable header: each SDK's
    container answers each with the same code."""
    answers: dict[str, dict[str, object]] = {}
    for sdk in ("python", "java", "r"):
        got: dict[str, object] = {}
        for kind in ("sum", "fail"):
            backend = _FakeBackend()
            proc = replica = None
            try:
                replica, proc = _start_replica(sdk, backend, kind, tmp_path)
                backend.expect("Hello")
                backend.send("Welcome", {"heartbeat_ms": 1000, "dead_after_ms": 30000})

                if kind == "fail":
                    got["model raises"] = backend.batch(1, [_float64(1.0)], shapes=[1])["error"]
                    continue
                got["unknown dtype"] = backend.batch(2, [_float64(1.0)], dtype=99, shapes=[1])["error"]
                got["frames do not add up"] = backend.batch(
                    3, [_float64(1.0)], shapes=[1], budgets_us=[10**7] * 2
                )["error"]
                r = backend.batch(4, [_float64(1.0, 2.0), _float64(1.0)], shapes=[2, 2])
                items = [o["error"] for o in r["outputs"]]
                got["an item's payload does not fit"] = items if r["error"] == "NONE" else r["error"]
                backend.send("Shutdown", {"reason": "from the future"}, version=3)
                got["another protocol version"] = backend.expect("Error")[0]["body"]["code"]
                backend.send("Query", {"app": "x"})
                got["not a backend message"] = backend.expect("Error")[0]["body"]["code"]
                backend.send_raw(_newer("unknown_body"))
                got["a newer message type"] = backend.expect("Error")[0]["body"]["code"]
                backend.send_raw([b"not a flatbuffer"])
                got["an undecodable header"] = backend.expect("Error")[0]["body"]["code"]
            finally:
                if replica is not None:
                    replica.stop()
                if proc is not None:
                    proc.kill()
                    proc.wait(10)
                backend.close()
        answers[sdk] = got
    assert answers["java"] == answers["r"], answers
    assert answers["java"] == {
        "model raises": "MODEL_ERROR",
        "unknown dtype": "BAD_MESSAGE",
        "frames do not add up": "BAD_MESSAGE",
        "an item's payload does not fit": ["NONE", "BAD_INPUT"],
        "another protocol version": "UNSUPPORTED_VERSION",
        "not a backend message": "UNKNOWN_MESSAGE",
        "a newer message type": "UNKNOWN_MESSAGE",
        "an undecodable header": "BAD_MESSAGE",
    }
    python = answers["python"]
    for fault in answers["java"]:
        if fault != "an item's payload does not fit":
            assert python[fault] == answers["java"][fault], (fault, answers)
    # the Python runtime fails the whole batch where Java and R fail the item (it is left
    # to the Python runtime's owner; protocol.md section 5 asks for the item)
    assert python["an item's payload does not fit"] in ("BAD_MESSAGE", ["NONE", "BAD_INPUT"])


STOPS = 5  # stops of each SDK's replica under load


class _Load:
    """Queries to ``app`` from a thread until stopped; every answer is checked."""

    def __init__(self, frontend: str, app: str) -> None:
        self.frontend, self.app = frontend, app
        self.answered = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng()
        with ketch.Client(self.frontend) as client:
            while not self._stop.is_set():
                xs = [rng.normal(size=int(n)) for n in rng.integers(1, 6, size=16)]
                try:
                    preds = client.predict_many(self.app, xs, timeout_ms=20_000, return_exceptions=True)
                except ketch.KetchError as exc:
                    self.problems.append(f"{type(exc).__name__}: {exc}")
                    continue
                for x, p in zip(xs, preds, strict=True):
                    if isinstance(p, Exception) or p.default or abs(float(p.output) - float(x.sum())) > 1e-9:
                        self.problems.append(repr(p))
                self.answered += len(xs)

    def __enter__(self) -> _Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)


def _left(broker_log: str, replica_id: str) -> list[dict]:
    events = []
    for line in broker_log.splitlines():
        if '"replica left"' in line:
            event = json.loads(line)
            if event.get("replica") == replica_id:
                events.append(event)
    return events


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sdk", ["java", "r"])
# a stalled JVM or R process must leave by its Goodbye, not be declared dead with its batch
# re-queued: 15 s of silence before that, not 1.5 s
@pytest.mark.dead_after_ms(15_000)
def test_stopping_a_replica_under_load_hands_nothing_back(sdk, broker_process, replica_threads, tmp_path):
    """SIGTERM (Java; R through sigterm_to_sigint.sh) or SIGINT (R) while batches flow: the
    replica answers every batch the broker sent it, then says Goodbye; the broker re-queues
    nothing, and every query gets its prediction."""
    from ketch.examples.basic import total

    name = f"{sdk}-stop"
    # a Python replica of the same model keeps serving while the other comes and goes; all of
    # them announce one build (the broker refuses other code under a live version)
    build = {"KETCH_BUILD_ID": "sum-of-the-input"}
    replica_threads(total, backend=broker_process.backend, name=name, build_id=build["KETCH_BUILD_ID"])
    with ketch.Admin(broker_process.admin) as admin:
        admin.create_app(name, input_type="float64", input_shape=[-1], slo_ms=20_000, models=[name])
        wait_for(lambda: admin.replicas(name), 30, "the Python replica")
        with _Load(broker_process.frontend, name) as load:
            for i in range(STOPS):
                rid = f"{sdk}-stop-{i}"
                cmd = CONTAINERS[sdk](broker_process.backend, name, "sum", rid)
                stop_with = signal.SIGTERM
                if sdk == "r" and i % 2 == 0:
                    cmd = ["sh", str(R_DIR / "inst" / "sigterm_to_sigint.sh"), *cmd]
                elif sdk == "r":
                    stop_with = signal.SIGINT
                log_path = tmp_path / f"{rid}.log"
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(
                        cmd, stdout=log, stderr=log, cwd=ROOT, env={**os.environ, **build}
                    )
                try:
                    wait_for(lambda rid=rid: rid in {r["replica_id"] for r in admin.replicas(name)}, 60, rid)

                    def batches(rid: str = rid) -> int:
                        return sum(r["batches"] for r in admin.replicas(name) if r["replica_id"] == rid)

                    wait_for(lambda: batches() >= 20, 60, f"batches through {rid}")  # it is under load
                    proc.send_signal(stop_with)
                    assert proc.wait(60) == 0, log_path.read_text(errors="replace")
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
                wait_for(lambda rid=rid: _left(broker_process.log_text(), rid), 20, f"{rid} to leave")
                (event,) = _left(broker_process.log_text(), rid)
                assert event["reason"].startswith("goodbye"), event
                assert (event["requeued"], event["failed"]) == (0, 0), event
                text = log_path.read_text(errors="replace")
                if sdk == "java":
                    assert "draining: Ready{credits: 0} sent" in text and "drained: goodbye" in text, text
                else:
                    assert "draining (SIGINT)" in text and "drained, goodbye" in text, text
            before = load.answered
            wait_for(lambda: load.answered >= before + 50, 60, "load after the stops")
    assert load.problems == []
    assert load.answered > 0


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
