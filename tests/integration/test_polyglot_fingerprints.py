"""A redeploy of Java and R containers under the same model version (issue 15, item 7): the
broker sees each container's fingerprint, refuses other code while the old code is live (the
container waits and says Hello again, it does not end), lets it in once the old code is gone,
and never answers from the old code's cached predictions.

Real broker (a thread), real Java (the fat jar) and R (Rscript) containers as processes on
127.0.0.1. Skips without a JDK/jar or Rscript unless KETCH_REQUIRE_POLYGLOT=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import ketch
import pytest
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
JAR = ROOT / "sdk" / "java" / "target" / "ketch-sdk-0.1.0-all.jar"
R_SCRIPT = ROOT / "sdk" / "r" / "inst" / "serve_example.R"


def _command(sdk: str) -> list[str]:
    if sdk == "java":
        have, what = shutil.which("java") is not None and JAR.exists(), "java and the SDK's fat jar"
        cmd = ["java", "-cp", str(JAR), "io.ketch.examples.Serve"]
    else:
        have, what = shutil.which("Rscript") is not None, "Rscript"
        cmd = ["Rscript", str(R_SCRIPT)]
    if not have:
        if os.environ.get("KETCH_REQUIRE_POLYGLOT") == "1":
            pytest.fail(f"{what} is missing (KETCH_REQUIRE_POLYGLOT=1)")
        pytest.skip(f"{what} is missing")
    return cmd


@pytest.fixture
def start(tmp_path):
    procs: list[tuple[subprocess.Popen, Path]] = []

    def run(
        sdk: str, backend: str, kind: str, replica_id: str, build_id: str
    ) -> tuple[subprocess.Popen, Path]:
        cmd = [*_command(sdk), "--broker", backend, "--name", f"{sdk}-m", "--version", "1", "--kind", kind]
        log_path = tmp_path / f"{replica_id.replace('/', '_')}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [*cmd, "--replica-id", replica_id],
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env={**os.environ, "KETCH_BUILD_ID": build_id},
            )
        procs.append((proc, log_path))
        return proc, log_path

    yield run
    for proc, _ in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.parametrize("sdk", ["java", "r"])
def test_a_redeploy_of_other_code_under_a_live_version_waits_then_never_serves_old_answers(
    sdk, make_thread_broker, start
):
    # dead after 5 s: long enough for a container starting on a busy machine, short for the test
    tb = make_thread_broker(heartbeat_ms=200, dead_after_ms=5000)
    model = f"{sdk}-m"
    slo = 60_000
    with ketch.Admin(tb.admin) as admin, ketch.Client(tb.frontend) as client:
        admin.create_app("a", input_type="float64", input_shape=[-1], slo_ms=slo, models=[model])
        old, _ = start(sdk, tb.backend, "sum", f"{sdk}/old", "one")
        wait_for(lambda: admin.replicas(model), 90, f"the {sdk} container of build one")
        assert [r["fingerprint"] for r in admin.replicas(model)] == ["build:one"]
        assert float(client.predict("a", [1.0, 2.0], timeout_ms=slo).output) == 3.0  # now cached

        # other code (a model that always fails) under the same name and version
        new, new_log = start(sdk, tb.backend, "fail", f"{sdk}/new", "two")
        wait_for(lambda: "CONFLICT" in new_log.read_text("utf-8", "replace"), 90, "the new code refused")
        assert new.poll() is None, "a CONFLICT is not the end of the container"
        assert [r["replica_id"] for r in admin.replicas(model)] == [f"{sdk}/old"]
        assert float(client.predict("a", [1.0, 2.0], timeout_ms=slo).output) == 3.0  # one code answers

        old.send_signal(signal.SIGKILL)  # the old code goes without a word; the broker calls it dead
        old.wait(10)
        wait_for(
            lambda: [r["replica_id"] for r in admin.replicas(model)] == [f"{sdk}/new"],
            90,
            "the new code let in",
        )
        assert [r["fingerprint"] for r in admin.replicas(model)] == ["build:two"]
        with pytest.raises(ketch.ModelError, match="boom"):  # the new code computes: not the cached 3.0
            client.predict("a", [1.0, 2.0], timeout_ms=slo)
        figures = admin.show_model(model)["figures"]
        assert figures["fingerprints"] == {"1": "build:two"} and figures["fingerprint_changes"] == 1
