"""The entry points of the model images, run as plain processes against a real broker.

``python -m ketch.container`` (Python images), ``io.ketch.tools.Launch`` (Java image) and
``sdk/r/inst/container.R`` under ``sigterm_to_sigint.sh`` (R image) each serve a model named
by the environment, keep the status file that ``docker/ketch-probe`` reads ("ready" once
welcomed), answer right, and on SIGTERM drain, remove the file and exit 0. The probe script
itself is checked on status files of every age and state.

Java and R parts skip without a JDK/jar or Rscript unless KETCH_REQUIRE_POLYGLOT=1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from ketch import Client
from ketch.examples.iris import estimator
from ketch.local import LocalBroker, wait_for

ROOT = Path(__file__).resolve().parents[2]
JAR = ROOT / "sdk" / "java" / "target" / "ketch-sdk-0.1.0-all.jar"
PROBE = ROOT / "docker" / "ketch-probe"
REQUIRED = os.environ.get("KETCH_REQUIRE_POLYGLOT") == "1"


def _need(ok: bool, what: str) -> None:
    if not ok:
        if REQUIRED:
            pytest.fail(f"{what} is missing (KETCH_REQUIRE_POLYGLOT=1)")
        pytest.skip(f"{what} is missing")


def probe(status: Path, mode: str, **env: str) -> int:
    full = {**os.environ, "KETCH_STATUS_FILE": str(status), **env}
    return subprocess.run(["sh", str(PROBE), mode], env=full, capture_output=True).returncode


@pytest.fixture
def broker():
    # a replica is dead after 5 s of silence: an R or Java process starved by a busy machine
    # is not taken for dead in the middle of a test
    with LocalBroker(extra_args=["--heartbeat-ms", "100", "--dead-after-ms", "5000"]) as b:
        yield b


def serve_and_check(broker, tmp_path, argv, env, app, inputs, want, *, cwd=None):
    """Start the container process, wait for 'ready', check answers, SIGTERM, check drain."""
    status = tmp_path / "status"
    log = open(tmp_path / "container.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        argv,
        env={**os.environ, **env, "KETCH_BACKEND": broker.backend, "KETCH_STATUS_FILE": str(status)},
        stdout=log,
        stderr=log,
        cwd=cwd,
    )
    try:
        wait_for(
            lambda: proc.poll() is not None or probe(status, "ready") == 0, 90, "the container to be ready"
        )
        assert proc.poll() is None, (tmp_path / "container.log").read_text()
        assert status.read_text().strip() == "ready"
        assert probe(status, "live") == 0
        with broker.admin_client() as admin:
            wait_for(lambda: len(admin.replicas(env["KETCH_MODEL_NAME"])) == 1, 10, "one replica")
        with Client(broker.frontend) as client:
            got = client.predict_many(app, inputs, timeout_ms=10_000)
        assert [p.default for p in got] == [False] * len(inputs)
        assert [np.asarray(p.output).tolist() for p in got] == want
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "container.log").read_text()
        assert not status.exists(), "the status file outlives the container"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_probe_reads_state_and_age(tmp_path):
    status = tmp_path / "status"
    assert probe(status, "ready") == 1 and probe(status, "live") == 1  # not started
    status.write_text("connecting\n")
    assert probe(status, "ready") == 1 and probe(status, "live") == 0
    status.write_text("ready\n")
    assert probe(status, "ready") == 0 and probe(status, "live") == 0
    old = time.time() - 30
    os.utime(status, (old, old))  # the runtime stopped writing 30 s ago
    assert probe(status, "ready") == 1
    assert probe(status, "live") == 0
    assert probe(status, "live", KETCH_LIVE_MAX_AGE_S="20") == 1
    status.write_text("draining\n")
    assert probe(status, "ready") == 1 and probe(status, "live") == 0
    assert probe(status, "bogus") == 2


def test_python_container_serves_a_joblib_file(broker, tmp_path):
    import joblib

    joblib.dump(estimator(), tmp_path / "iris.joblib")
    with broker.admin_client() as admin:
        admin.create_app("iris", input_type="float64", input_shape=[4], slo_ms=10_000, models=["iris"])
    x = np.random.default_rng(0).normal(estimator()[0].mean_, 1.0, size=(40, 4))
    serve_and_check(
        broker,
        tmp_path,
        [sys.executable, "-m", "ketch.container"],
        {"KETCH_MODEL": str(tmp_path / "iris.joblib"), "KETCH_MODEL_NAME": "iris"},
        "iris",
        list(x),
        [int(v) for v in estimator().predict(x)],
    )


def test_python_container_serves_module_attr(broker, tmp_path):
    (tmp_path / "doubler.py").write_text(
        "def predict(inputs):\n    return [2.0 * float(x.sum()) for x in inputs]\n"
    )
    with broker.admin_client() as admin:
        admin.create_app("dbl", input_type="float64", input_shape=[-1], slo_ms=10_000, models=["dbl"])
    x = [np.arange(n, dtype=np.float64) for n in (1, 3, 5)]
    serve_and_check(
        broker,
        tmp_path,
        [sys.executable, "-m", "ketch.container"],
        {"KETCH_MODEL": "doubler:predict", "KETCH_MODEL_NAME": "dbl", "PYTHONPATH": str(tmp_path)},
        "dbl",
        x,
        [2.0 * float(v.sum()) for v in x],
        cwd=tmp_path,
    )


def test_java_launch_serves_linear(broker, tmp_path):
    _need(shutil.which("java") is not None and JAR.exists(), f"java and {JAR.relative_to(ROOT)}")
    weights = {"intercept": 0.25, "coef": [0.5, -1.25, 2.0, 0.75]}
    (tmp_path / "linear.json").write_text(json.dumps(weights))
    with broker.admin_client() as admin:
        admin.create_app("lin", input_type="float64", input_shape=[4], slo_ms=10_000, models=["linear"])
    x = np.random.default_rng(1).normal(0, 3, size=(30, 4))

    def direct(row):
        y = weights["intercept"]
        for c, v in zip(weights["coef"], row.tolist(), strict=True):
            y += c * v
        return y

    serve_and_check(
        broker,
        tmp_path,
        ["java", "-cp", str(JAR), "io.ketch.tools.Launch"],
        {
            "KETCH_MODEL_CLASS": "io.ketch.examples.Linear",
            "KETCH_MODEL": str(tmp_path / "linear.json"),
            "KETCH_MODEL_NAME": "linear",
            "KETCH_INPUT_SHAPE": "4",
        },
        "lin",
        list(x),
        [direct(r) for r in x],
    )


def test_r_container_serves_a_script(broker, tmp_path):
    _need(shutil.which("Rscript") is not None, "Rscript")
    (tmp_path / "model.R").write_text(
        "scale <- as.numeric(readLines('scale.txt'))\n"
        "predict_fn <- function(inputs) lapply(inputs, function(x) scale * sum(x))\n"
    )
    (tmp_path / "scale.txt").write_text("3\n")
    with broker.admin_client() as admin:
        admin.create_app("rsum", input_type="float64", input_shape=[-1], slo_ms=10_000, models=["r3"])
    x = [np.array([1.0, 2.0]), np.array([0.5]), np.array([-1.0, 4.0, 2.5])]
    serve_and_check(
        broker,
        tmp_path,
        [
            "sh",
            str(ROOT / "sdk/r/inst/sigterm_to_sigint.sh"),
            "Rscript",
            str(ROOT / "sdk/r/inst/container.R"),
        ],
        {"KETCH_MODEL": str(tmp_path / "model.R"), "KETCH_MODEL_NAME": "r3"},
        "rsum",
        x,
        [3.0 * float(v.sum()) for v in x],
    )
