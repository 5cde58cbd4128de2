"""What each process loads: the supervisor of ``ketch model serve`` holds none of what its
replicas load, and the package and the CLI import their parts when they are used."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
from ketch.local import LocalModel, wait_for

pytestmark = pytest.mark.timeout(120)

HEAVY = ("numpy", "zmq", "sklearn", "scipy", "ketch.client", "ketch.protocol", "ketchd.broker")


def loaded(code: str) -> list[str]:
    """The HEAVY modules a fresh interpreter has loaded after running ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return [m for m in out.stdout.strip().split(",") if m]


def mapped(pid: int) -> str:
    return "\n".join(m.path for m in psutil.Process(pid).memory_maps())


def test_the_package_and_the_cli_import_their_parts_when_used():
    assert loaded("import ketch, ketch.cli, ketch.supervisor") == []
    assert "numpy" in loaded("import ketch; ketch.Client")
    assert loaded("import ketchd.__main__") == []


def test_the_supervisor_loads_nothing_its_replica_loads(broker_process, start_model):
    with broker_process.admin_client() as admin:
        model = start_model("ketch.examples.iris:model", "iris", input_shape="4")
        model.wait_ready(admin, timeout_s=90)
        supervisor = psutil.Process(model.proc.pid)
        assert supervisor.cmdline()[1:3] == ["-m", "ketch.supervisor"]  # the CLI replaced itself
        replica = wait_for(lambda: supervisor.children(), 10, "the replica process")[0]
        assert "sklearn" in mapped(replica.pid) and "numpy" in mapped(replica.pid)
        for lib in ("sklearn", "scipy", "numpy", "zmq"):
            assert lib not in mapped(supervisor.pid), lib


def test_a_target_that_does_not_load_stops_model_serve_at_once(broker_process, tmp_path):
    log = tmp_path / "serve.log"
    model = LocalModel(
        "ketch.examples.no_such_module:model",
        "nothing",
        backend=broker_process.backend,
        replicas=2,
        log_path=str(log),
    ).start()
    assert model.proc is not None
    started = time.monotonic()
    assert model.proc.wait(60) == 4  # EXIT_TARGET, not a restart loop
    assert time.monotonic() - started < 30
    text = log.read_text()
    assert "does not load" in text and "no Python module named 'ketch.examples.no_such_module'" in text
    assert text.count("replica started") <= 2  # one start each, no restarts
