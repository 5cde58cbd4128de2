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

import json
import os
import shutil
import subprocess
import sys
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
        replica = admin.replicas(f"{sdk}-sum")[0]
        assert replica["sdk"].startswith(f"{sdk}/")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
