"""Replicas of every SDK: one killed with SIGKILL is seen gone when its connection closes;
a pool of a Java, a Python and a slow R replica serves by speed, in either join order.

The broker in the kill test would wait 60 s of silence before calling a replica dead; a killed one's
queries must come back (answered by another replica) long before that, because the
broker hears its TCP connection close. The victim is stopped (SIGSTOP) first, so that it
holds queries it will never answer, then killed. Its queries go back to the survivor
together, as the batch it held (``--requeue-alone-ms 0``), or each alone (a large
``--requeue-alone-ms``), as the broker is told.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
JAR = ROOT / "sdk" / "java" / "target" / "ketch-sdk-0.1.0-all.jar"
REQUIRED = os.environ.get("KETCH_REQUIRE_POLYGLOT") == "1"
BUILD_ID = "sum-of-the-input"


def victim_cmd(sdk: str, backend: str, model: str, rid: str = "victim", delay_ms: int = 0) -> list[str]:
    """The command of a replica of ``model`` (the sum of a vector) in ``sdk``; ``delay_ms``
    (R only) sleeps that long per batch."""
    if sdk == "python":
        return [sys.executable, "-m", "ketch.cli", "model", "run", "ketch.examples.basic:total",
                "--name", model, "--backend", backend, "--input-shape", "-1"]  # fmt: skip
    if sdk == "java":
        ok, what = shutil.which("java") is not None and JAR.exists(), "java and the SDK's jar"
        cmd = ["java", "-cp", str(JAR), "io.ketch.examples.Serve", "--broker", backend, "--name", model,
               "--version", "1", "--kind", "sum", "--replica-id", rid]  # fmt: skip
    else:
        ok, what = shutil.which("Rscript") is not None, "Rscript"
        cmd = ["Rscript", str(ROOT / "sdk" / "r" / "inst" / "serve_example.R"), "--broker", backend,
               "--name", model, "--version", "1", "--kind", "sum", "--replica-id", rid,
               "--delay-ms", str(delay_ms)]  # fmt: skip
    if not ok:
        if REQUIRED:
            pytest.fail(f"{what} is missing (KETCH_REQUIRE_POLYGLOT=1)")
        pytest.skip(f"{what} is missing")
    return cmd


def by_id(admin: ketch.Admin, model: str) -> dict[str, dict]:
    return {r["replica_id"].rsplit("/", 1)[-1]: r for r in admin.replicas(model)}


@pytest.mark.parametrize(
    "sdk,together", [("python", True), ("java", True), ("r", True), ("python", False)], ids=str
)
def test_a_killed_replica_is_seen_gone_at_once_and_its_queries_answered_elsewhere(
    sdk, together, make_thread_broker, replica_threads, tmp_path
):
    tb = make_thread_broker(heartbeat_ms=1000, dead_after_ms=60_000, requeue_alone_ms=0 if together else 1e9)
    model = f"{sdk}-sum"
    cmd = victim_cmd(sdk, tb.backend, model)
    log = open(tmp_path / "victim.log", "wb")  # noqa: SIM115 (the child holds it)
    victim = subprocess.Popen(
        cmd,
        stdout=log,
        stderr=log,
        cwd=ROOT,
        # one build id for both replicas: the same sum, in two SDKs (the broker refuses other
        # code under a live version, see docs/protocol.md)
        env={**os.environ, "KETCH_REPLICA_INDEX": "victim", "KETCH_BUILD_ID": BUILD_ID},
    )
    log.close()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(tb.frontend)
    try:
        with ketch.Admin(tb.admin) as admin:
            admin.create_app(
                "sum", input_type="float64", input_shape=[-1], slo_ms=30_000, models=[model], cache=False
            )
            # batches of six: the victim takes all six at once (a cold replica is sent one at a time)
            admin.configure_model(model, max_batch=6, batching="fixed", create=True)
            wait_for(lambda: "victim" in by_id(admin, model), 90, f"the {sdk} replica")
            os.kill(victim.pid, signal.SIGSTOP)  # alive to TCP, deaf to the broker
            rng = np.random.default_rng()
            xs = [rng.normal(size=3) for _ in range(6)]
            ids = list(range(1, 7))
            sock.send_multipart(
                [proto.build_query("sum", proto.FLOAT64, [3], ids), *[x.tobytes() for x in xs]]
            )
            wait_for(lambda: by_id(admin, model)["victim"]["items"] == 6, 10, "the victim to hold all six")
            sizes: list[int] = []

            def total(batch: list[np.ndarray]) -> list[float]:
                sizes.append(len(batch))
                return [float(x.sum()) for x in batch]

            replica_threads(
                total,
                backend=tb.backend,
                name=model,
                replica_id="survivor",
                build_id=BUILD_ID,
            )
            wait_for(lambda: "survivor" in by_id(admin, model), 10, "the survivor")
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)
            got: dict[int, tuple[dict, bytes]] = {}
            while len(got) < len(ids):
                # long before the 60 s of silence that heartbeats would wait
                assert sock.poll(20_000), f"answers missing: {sorted(set(ids) - set(got))}"
                frames = sock.recv_multipart()
                for item, payload in zip(proto.to_dict(frames[0])["body"]["items"], frames[1:], strict=True):
                    got[item["request_id"]] = (item, payload)
            assert all(got[rid][0]["status"] == "OK" for rid in ids), got
            for rid, x in zip(ids, xs, strict=True):
                assert float(np.frombuffer(got[rid][1], np.float64)[0]) == pytest.approx(x.sum())
            assert "victim" not in by_id(admin, model)
            assert admin.stats()["counters"]["replicas_disconnected"] == 1
            # back together, as the one batch the victim held; else one query at a time
            assert sizes == ([6] if together else [1] * 6), sizes
    finally:
        sock.close()
        if victim.poll() is None:
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait(10)


@pytest.mark.parametrize("r_joins", ["first", "last"])
def test_a_pool_of_every_sdk_serves_by_speed_and_the_slow_r_costs_no_avoidable_default(
    r_joins, make_thread_broker, replica_threads, tmp_path
):
    """Java and Python replicas that meet a 300 ms SLO and an R one that never can (400 ms a
    batch), joined R first or R last: the R one is sent nothing but a probe now and then
    (rather than batches whose queries would all get the default), every other query is
    answered by the fast ones, correctly."""
    tb = make_thread_broker(heartbeat_ms=200, dead_after_ms=10_000)
    model = "pool"
    procs: list[subprocess.Popen] = []

    def start(sdk: str) -> None:
        if sdk == "python":

            def predict(batch: list[np.ndarray]) -> list[float]:
                time.sleep(0.003)  # busy a while with each batch, as a real model is
                return [float(x.sum()) for x in batch]

            replica_threads(predict, backend=tb.backend, name=model, replica_id="py", build_id=BUILD_ID)
            return
        rid = {"java": "java", "r": "r-slow"}[sdk]
        cmd = victim_cmd(sdk, tb.backend, model, rid, delay_ms=400 if sdk == "r" else 0)
        log = open(tmp_path / f"{rid}.log", "wb")  # noqa: SIM115 (the child holds it)
        # one build for all three SDKs: the broker refuses other code under a live version
        env = {**os.environ, "KETCH_BUILD_ID": BUILD_ID}
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=log, cwd=ROOT, env=env))
        log.close()

    order = ["r", "java", "python"] if r_joins == "first" else ["java", "python", "r"]
    ids = {"r": "r-slow", "java": "java", "python": "py"}
    try:
        with ketch.Admin(tb.admin) as admin, ketch.Client(tb.frontend) as client:
            admin.create_app(
                "sum", input_type="float64", input_shape=[-1], slo_ms=300, default=-1.0, models=[model],
                cache=False,
            )  # fmt: skip
            for sdk in order:  # joined one after the other
                start(sdk)
                wait_for(lambda sdk=sdk: ids[sdk] in by_id(admin, model), 90, f"the {sdk} replica")
            rng = np.random.default_rng()
            # all measured; on a busy machine admission by capacity may refuse some meanwhile
            client.predict_many(
                "sum", [rng.normal(size=3) for _ in range(300)], window=16, return_exceptions=True
            )
            before = {k: v["items"] for k, v in by_id(admin, model).items()}
            xs = [rng.normal(size=3) for _ in range(600)]
            # the fast ones often busy, R idle; a refusal (OVERLOADED) is an answer too, never a default
            got = client.predict_many("sum", xs, window=64, return_exceptions=True)
            after = {k: v["items"] for k, v in by_id(admin, model).items()}
            taken = {k: after[k] - before.get(k, 0) for k in after}
            refused = [p for p in got if isinstance(p, ketch.errors.Overloaded)]
            assert all(isinstance(p, ketch.Prediction | ketch.errors.Overloaded) for p in got), got
            preds = [(x, p) for x, p in zip(xs, got, strict=True) if isinstance(p, ketch.Prediction)]
            defaults = [p for _, p in preds if p.default]
            assert taken["r-slow"] <= 4 and len(defaults) <= taken["r-slow"], (taken, defaults[:3])
            assert taken["java"] + taken["py"] >= len(preds) - taken["r-slow"], (taken, len(refused))
            answered = [(x, p) for x, p in preds if not p.default]
            assert [p.output for _, p in answered] == pytest.approx([float(x.sum()) for x, _ in answered])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT if proc.args[0] == "Rscript" else signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
