"""The first ten minutes of a new user, through the ``ketch`` command as they would type it:
real processes (``ketch serve``, ``ketch up``, brokers, replicas) on free loopback ports.

Each test stops what it started by pid (process groups for ``ketch serve``, the way Ctrl-C
reaches them from a terminal; ``ketch down`` for ``ketch up``)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from ketch import Client
from ketch.admin import Admin
from ketch.launch import pid_alive, probe
from ketch.local import LocalBroker, LocalModel, free_port, wait_for
from sklearn.linear_model import LinearRegression

pytestmark = pytest.mark.timeout(300)

PER_ITEM = """import numpy as np
W = np.ones(4)


def predict(x):  # a function of one input, written by mistake
    return float(x @ W)
"""


def addresses() -> dict[str, str]:
    return {
        "KETCH_ADMIN": f"tcp://127.0.0.1:{free_port()}",
        "KETCH_FRONTEND": f"tcp://127.0.0.1:{free_port()}",
        "KETCH_BACKEND": f"tcp://127.0.0.1:{free_port()}",
    }


def broker_env(broker: LocalBroker) -> dict[str, str]:
    return {"KETCH_ADMIN": broker.admin, "KETCH_FRONTEND": broker.frontend, "KETCH_BACKEND": broker.backend}


def ketch(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 120):
    """``ketch ARGS`` as a user runs it; the finished process (stdout, stderr, returncode)."""
    return subprocess.run(
        [sys.executable, "-m", "ketch.cli", *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Foreground:
    """A foreground ``ketch`` command (``serve``), in a process group of its own as a shell
    runs it, read line by line; ``interrupt()`` is Ctrl-C."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ketch.cli", *args],
            env={**os.environ, **env},
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.out) + "\n--- stderr\n" + "\n".join(self.err)

    def wait_for_line(self, needle: str, timeout_s: float = 150) -> str:
        def seen() -> str | None:
            if self.proc.poll() is not None and not any(needle in line for line in self.out):
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.text()}")
            return next((line for line in self.out if needle in line), None)

        try:
            return wait_for(seen, timeout_s, repr(needle), interval_s=0.1)
        except TimeoutError:
            raise AssertionError(f"no {needle!r} in time:\n{self.text()}") from None

    def interrupt(self, timeout_s: float = 60) -> int:
        """Ctrl-C: SIGINT to the process group, as a terminal sends it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        for t in self._readers:
            t.join(5)
        return code

    def finish(self, timeout_s: float = 120) -> int:
        """Wait for the command to end by itself; its exit status, once all its output is read."""
        code = self.proc.wait(timeout_s)
        for t in self._readers:
            t.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def foreground():
    started: list[Foreground] = []

    def start(args: list[str], env: dict[str, str], cwd: Path) -> Foreground:
        fg = Foreground(args, env, cwd)
        started.append(fg)
        return fg

    yield start
    for fg in started:
        fg.kill()


@pytest.fixture
def linear(tmp_path) -> LinearRegression:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 3))
    model = LinearRegression().fit(x, x @ np.array([1.0, -2.0, 0.5]) + 3)
    joblib.dump(model, tmp_path / "linear.joblib")
    with open(tmp_path / "linear.pkl", "wb") as fh:
        pickle.dump(model, fh)
    return model


def test_serve_a_joblib_file_with_its_own_broker(tmp_path, linear, foreground):
    """`ketch serve model.joblib`: a broker, two replicas, the app's shape from the model, the
    URLs and a curl line that works; bench and status on it; Ctrl-C stops everything."""
    env = addresses()
    http = f"127.0.0.1:{free_port()}"
    serve = foreground(
        ["serve", "linear.joblib", "--name", "lin", "--replicas", "2", "--http", http], env, tmp_path
    )
    serve.wait_for_line("Ctrl-C stops.")
    banner = "\n".join(serve.out)
    assert "as app 'lin' [created]: float64 inputs, shape 3" in banner, banner
    assert "started for this session" in banner
    assert f"http://{http}/v2/models/lin/infer" in banner and f"page     http://{http}/" in banner
    assert any("pickle" in line and "trust" in line for line in serve.err), serve.text()
    curl = next(line.strip() for line in serve.out if line.strip().startswith("curl "))
    body = json.loads(re.search(r"-d '(.*)'$", curl).group(1))
    assert body == {"input": [0.0, 0.0, 0.0]}
    test_line = next(line for line in serve.out if "test query" in line)
    assert float(re.search(r"-> (\S+) \(", test_line).group(1)) == pytest.approx(linear.intercept_)
    x = [0.5, -1.0, 2.0]
    answer = httpx.post(f"http://{http}/lin/predict", json={"input": x}, timeout=10).json()
    assert answer["output"] == pytest.approx(linear.predict(np.array([x]))[0]) and answer["default"] is False

    status = json.loads(ketch("status", "--json", env=env).stdout)
    app = next(a for a in status["apps"] if a["name"] == "lin")
    assert app["ready"] and app["input_shape"] == [3] and f"http://{http}" in status["gateways"]
    (version,) = next(m for m in status["models"] if m["name"] == "lin")["versions"]
    assert (version["version"], version["active"], version["ready"]) == ("1", True, 2)
    table = ketch("status", env=env).stdout
    assert re.search(r"^lin\s+yes\s+float64 \[3\]", table, re.M) and "REPLICAS" in table

    # bench: unique inputs by default (the cache answers none), the share printed either way
    # unique inputs: no level repeats another's, nor a second run the first's
    for _ in range(2):
        fresh = ketch("bench", "lin", "--input", "[1, 2, 3]", "--concurrency", "2,4", "--duration", "1",
                      env=env)  # fmt: skip
        rows = re.findall(r"^concurrency \d+ +\d+ .*$", fresh.stdout, re.M)  # the table's rows
        assert len(rows) == 2, fresh.stdout
        assert fresh.returncode == 0 and all(re.search(r"\s0\.0%$", r) for r in rows), fresh.stdout
        assert "unique" in fresh.stderr
    cached = ketch("bench", "lin", "--input", "[1, 2, 3]", "--concurrency", "4", "--duration", "1",
                   "--repeat-inputs", "--json", env=env)  # fmt: skip
    assert json.loads(cached.stdout)[0]["cache_hit_share"] > 0.5
    failing = ketch("bench", "lin", "--input", "[1, 2]", "--concurrency", "2", "--duration", "0.5", env=env)
    assert failing.returncode == 1 and "every query failed" in failing.stderr
    assert re.search(r"\d+ x BAD_INPUT: app 'lin' takes float64 inputs of shape \(3,\)", failing.stdout)

    pids = [r["pid"] for m in status["models"] for r in m["replicas"]]
    assert serve.interrupt() == 0, serve.text()
    assert "broker stopped" in "\n".join(serve.err)
    assert probe(env["KETCH_ADMIN"]) is False and not any(pid_alive(p) for p in pids)


def make_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.array([[1.0], [2.0]], dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_serve_pkl_onnx_code_and_a_folder_on_a_running_broker(tmp_path, linear, foreground):
    """`ketch serve` joins a broker: a pickle (with the trust warning), an ONNX file (its input
    type and shape from the model), FILE.py:ATTR, and a folder with model.toml settings."""
    make_onnx(tmp_path / "affine.onnx")
    (tmp_path / "summer.py").write_text("def predict(inputs):\n    return [float(x.sum()) for x in inputs]\n")
    folder = tmp_path / "flowers"
    folder.mkdir()
    joblib.dump(linear, folder / "model.joblib")
    (folder / "model.toml").write_text('name = "petals"\nversion = 7\nslo_ms = 500\n')
    with LocalBroker() as broker:
        env = {
            "KETCH_ADMIN": broker.admin,
            "KETCH_FRONTEND": broker.frontend,
            "KETCH_BACKEND": broker.backend,
        }
        runs = {
            name: foreground(["serve", *args, "--join"], env, tmp_path)
            for name, args in {
                "pkl": ["linear.pkl", "--name", "pkl"],
                "affine": ["affine.onnx"],
                "summer": ["summer.py:predict"],
                "petals": ["flowers"],
            }.items()
        }
        for run in runs.values():
            run.wait_for_line("Ctrl-C stops.")
        assert any("linear.pkl is a pickle" in line for line in runs["pkl"].err)
        assert "HTTP     none known" in "\n".join(runs["pkl"].out)
        with Admin(broker.admin) as admin:
            apps = {a["name"]: a for a in admin.list_apps()}
            petals = admin.show_model("petals")
        assert (apps["affine"]["input_type"], apps["affine"]["input_shape"]) == ("float32", [2])
        assert (apps["pkl"]["input_type"], apps["pkl"]["input_shape"]) == ("float64", [3])
        assert apps["summer"]["input_shape"] == [-1] and apps["petals"]["slo_ms"] == 500
        assert petals["active_version"] == "7"
        with Client(broker.frontend) as client:
            assert client.predict("affine", np.float32([1, 1])).output.tolist() == [3.0]
            # a float64 list into the float32 app, and float32 into a float64 app: converted
            assert client.predict("affine", [2.0, 1.0]).output.tolist() == [4.0]
            assert client.predict("summer", np.float32([1.5, 2])).output == 3.5
            assert client.predict("petals", [1, 2, 3]).output == pytest.approx(linear.predict([[1, 2, 3]])[0])
        for run in runs.values():
            assert run.interrupt() == 0, run.text()
        with Admin(broker.admin) as admin:
            wait_for(lambda: not admin.replicas(), 30, "every replica to leave")


def test_model_serve_takes_files_and_explains_bad_targets(tmp_path, linear):
    env = {**addresses(), "KETCH_BROKER_WAIT": "0"}
    bad = ketch("model", "serve", "linear.pkl:model", "--name", "d", env=env, cwd=tmp_path)
    assert (
        bad.returncode == 2
        and "linear.pkl is a model file, not Python code: name the file alone" in bad.stderr
    )
    assert "Traceback" not in bad.stderr
    missing = ketch("model", "serve", "diabetes:model", "--name", "d", env=env, cwd=tmp_path)
    assert "no Python module named 'diabetes'" in missing.stderr and "Traceback" not in missing.stderr
    nofile = ketch("serve", "nosuch.joblib", env=env, cwd=tmp_path)
    assert nofile.returncode == 2 and "nosuch.joblib: no such file" in nofile.stderr


DEPLOYMENT = """
[defaults]
replicas = 1
slo_ms = 2000

[[models]]
name = "iris"
source = "ketch.examples.iris:model"
input_shape = [4]

[[models]]
name = "linear"
source = "linear.joblib"
max_batch = 8

[[models]]
name = "summer"
source = "summer.py:predict"

[[apps]]
name = "flowers"
models = ["iris"]
default = -1
policy = "single"
"""


def up_pids(folder: Path) -> dict[str, int]:
    record = json.loads((folder / "up.json").read_text())
    return {key: g["pid"] for key, g in record["groups"].items()}


# summer's replicas load only once the file SUMMER_GATE names exists (when it names one): a
# replacement that cannot be live in time, however fast the machine
SUMMER = """import os, time

_gate, _until = os.environ.get("SUMMER_GATE"), time.monotonic() + 120
while _gate and not os.path.exists(_gate) and time.monotonic() < _until:
    time.sleep(0.05)


def predict(inputs):
    return [{factor}float(x.sum()) for x in inputs]
"""


def test_up_is_idempotent_and_down_stops_everything(tmp_path, linear):
    (tmp_path / "summer.py").write_text(SUMMER.format(factor=""))
    (tmp_path / "ketch.toml").write_text(DEPLOYMENT)
    env = addresses()
    http = f"127.0.0.1:{free_port()}"
    folder = tmp_path / "up"
    first = ketch(
        "up", "ketch.toml", "--dir", str(folder), "--http", http, env=env, cwd=tmp_path, timeout=240
    )
    try:
        assert first.returncode == 0, first.stdout + first.stderr
        for line in ("app flowers: created", "app linear: created", "app summer: created",
                     "model linear: queue policy max_batch=8",
                     "model iris v1: started 1 replica(s)"):  # fmt: skip
            assert line in first.stdout, first.stdout
        assert f"HTTP http://{http}" in first.stdout
        pids = up_pids(folder)
        with Client(env["KETCH_FRONTEND"]) as client:
            assert client.predict("flowers", [5.1, 3.5, 1.4, 0.2]).output == 0
            assert client.predict("summer", [1.0, 2.0]).output == 3.0
            assert client.predict("linear", [1, 2, 3]).output == pytest.approx(linear.predict([[1, 2, 3]])[0])
        again = ketch("up", "ketch.toml", "--dir", str(folder), env=env, cwd=tmp_path)
        assert again.returncode == 0 and "started" not in again.stdout, again.stdout
        assert "app flowers: unchanged" in again.stdout and up_pids(folder) == pids
        # two replicas of summer now: that model's group is replaced, the others untouched
        two = DEPLOYMENT.replace('source = "summer.py:predict"', 'source = "summer.py:predict"\nreplicas = 2')
        (tmp_path / "ketch.toml").write_text(two)
        changed = ketch("up", "ketch.toml", "--dir", str(folder), env=env, cwd=tmp_path, timeout=240)
        assert "model summer v1: started 2 replica(s)" in changed.stdout, changed.stdout + changed.stderr
        assert "model summer v1: replaced" in changed.stdout
        now = up_pids(folder)
        assert now["iris/1"] == pids["iris/1"] and now["summer/1"] != pids["summer/1"]
        assert not pid_alive(pids["summer/1"])
        status = json.loads(ketch("status", "--json", env=env).stdout)
        summer = next(m for m in status["models"] if m["name"] == "summer")
        assert summer["versions"][0]["ready"] == 2
        # summer's code changes under the same version: the broker takes one code per version,
        # so the old replicas drain first; the answers (and the cache) are the new code's
        (tmp_path / "summer.py").write_text(SUMMER.format(factor="2 * "))
        recoded = ketch("up", "ketch.toml", "--dir", str(folder), env=env, cwd=tmp_path, timeout=240)
        assert recoded.returncode == 0, recoded.stdout + recoded.stderr
        assert "model summer v1: code changed, the old replicas drained" in recoded.stdout, recoded.stdout
        assert (
            "model summer v1: started 2 replica(s)" in recoded.stdout
            and up_pids(folder)["iris/1"] == pids["iris/1"]
        )
        with Client(env["KETCH_FRONTEND"]) as client:
            assert client.predict("summer", [1.0, 2.0]).output == 6.0

        # a replacement that is not live in time (--wait 1; its replicas wait for the gate):
        # up fails, the old group serves on and stays on record, and the next up finishes the
        # replacement
        three = two.replace("replicas = 2", "replicas = 3")
        (tmp_path / "ketch.toml").write_text(three)
        before = up_pids(folder)["summer/1"]
        gate = tmp_path / "gate"
        late = ketch(
            "up",
            "ketch.toml",
            "--dir",
            str(folder),
            "--wait",
            "1",
            env={**env, "SUMMER_GATE": str(gate)},
            cwd=tmp_path,
        )
        assert late.returncode != 0 and "not live after 1 s" in late.stderr, late.stdout + late.stderr
        record = json.loads((folder / "up.json").read_text())["groups"]["summer/1"]
        assert record["replacing"] == before and pid_alive(before)
        with Client(env["KETCH_FRONTEND"]) as client:
            assert client.predict("summer", [1.0, 2.0]).output == 6.0
        gate.touch()
        done = ketch("up", "ketch.toml", "--dir", str(folder), env=env, cwd=tmp_path, timeout=240)
        assert "model summer v1: replaced" in done.stdout, done.stdout + done.stderr
        assert not pid_alive(before)
        assert "replacing" not in json.loads((folder / "up.json").read_text())["groups"]["summer/1"]

        # a model repository on the same broker: two versions, the highest answers
        repo = tmp_path / "repo"
        for version in ("1", "2"):
            (repo / "lin" / version).mkdir(parents=True)
            joblib.dump(linear, repo / "lin" / version / "model.joblib")
        repo_up = ketch("up", str(repo), "--dir", str(tmp_path / "up-repo"), "--join", env=env, timeout=240)
        assert repo_up.returncode == 0, repo_up.stdout + repo_up.stderr
        assert "model lin: active version 2" in repo_up.stdout or "app lin: created" in repo_up.stdout
        with Admin(env["KETCH_ADMIN"]) as admin:
            assert admin.show_model("lin")["active_version"] == "2"
            assert admin.show_app("lin")["input_shape"] == [3]
        down_repo = ketch("down", "--dir", str(tmp_path / "up-repo"), env=env)
        assert "model lin v2: stopped" in down_repo.stdout and "broker" not in down_repo.stdout
    finally:
        pids = up_pids(folder)
        down = ketch("down", "--dir", str(folder), env=env)
    assert down.returncode == 0 and "broker stopped" in down.stdout, down.stdout + down.stderr
    assert pids and not any(pid_alive(p) for p in pids.values())
    assert probe(env["KETCH_ADMIN"]) is False


# version 2 of m loads only once the file M2_GATE names exists: it cannot be live before the
# test lets it, however fast the machine
GATED_TOTAL = """import os, time

_gate, _until = os.environ.get("M2_GATE"), time.monotonic() + 120
while _gate and not os.path.exists(_gate) and time.monotonic() < _until:
    time.sleep(0.05)


def predict(inputs):
    return [float(x.sum()) for x in inputs]
"""


def test_set_version_waits_for_the_replica_and_models_can_be_deleted(tmp_path, foreground):
    (tmp_path / "gated.py").write_text(GATED_TOTAL)
    gate = tmp_path / "gate"
    with LocalBroker() as broker:
        env = {
            "KETCH_ADMIN": broker.admin,
            "KETCH_FRONTEND": broker.frontend,
            "KETCH_BACKEND": broker.backend,
        }
        one = LocalModel("ketch.examples.basic:total", "m", backend=broker.backend).start()
        two = None
        try:
            with Admin(broker.admin) as admin:
                one.wait_ready(admin, timeout_s=60)
            two = LocalModel(
                f"{tmp_path / 'gated.py'}:predict",
                "m",
                version="2",
                backend=broker.backend,
                env={"M2_GATE": str(gate)},
            ).start()
            switched = foreground(["model", "set-version", "m", "2"], env, tmp_path)
            # version 2 is not live until the gate opens: the command says it waits for it

            def waiting() -> bool:
                if any("waiting for a live replica of m version 2" in line for line in switched.err):
                    return True
                assert switched.proc.poll() is None, switched.text()  # it may not end before the gate
                return False

            wait_for(waiting, 60, "set-version to wait for version 2")
            gate.touch()
            assert switched.finish(120) == 0, switched.text()
            assert any("active version 2" in line for line in switched.out), switched.text()
            refused = ketch("model", "delete", "m", env=env)
            assert refused.returncode == 1 and "live replica" in refused.stderr
        finally:
            one.stop()
            if two is not None:
                two.stop()
        ketch("app", "create", "a", "--input-type", "float64", "--model", "m", env=env)
        with Admin(broker.admin) as admin:
            wait_for(lambda: not admin.replicas("m"), 30, "the replicas to leave")
        linked = ketch("model", "delete", "m", env=env)
        assert linked.returncode == 1 and "ketch app unlink APP m" in linked.stderr
        forced = ketch("model", "delete", "m", "--force", env=env)
        assert forced.stdout.strip() == "deleted model m (unlinked from a)"
        assert "no model named 'm'" in ketch("model", "show", "m", env=env).stderr


def test_errors_say_what_to_do(tmp_path):
    env = {**addresses(), "KETCH_BROKER_WAIT": "0"}
    # no broker: at once with a flag, or saying so while it waits
    started = time.monotonic()
    none = ketch("app", "list", env=env)
    assert none.returncode == 3 and "no broker at" in none.stderr and "ketch broker start" in none.stderr
    assert time.monotonic() - started < 20
    waited = ketch("--broker-wait", "1", "status", env=env)
    assert waited.returncode == 3 and f"waiting for the broker at {env['KETCH_ADMIN']}" in waited.stderr
    # a port in use: one line, no traceback
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ketch("broker", "start", "--no-http", "--admin", f"tcp://127.0.0.1:{port}", env=env)
        serve_busy = ketch("serve", "ketch.examples.iris:model", "--http", f"127.0.0.1:{port}", env=env)
    assert (
        serve_busy.returncode == 1
        and f"tcp://127.0.0.1:{port} in use by another program" in serve_busy.stderr
    )
    assert "pick free addresses" in serve_busy.stderr and "Traceback" not in serve_busy.stderr
    assert "broker stopped" not in serve_busy.stderr  # none was started
    assert busy.returncode == 1 and f"cannot listen on tcp://127.0.0.1:{port}: the address is in use" in (
        busy.stderr
    )
    assert "Traceback" not in busy.stderr
    # help: names and environment variables
    assert "KETCH_ADMIN" in ketch("--help", env=env).stdout
    serve_help = ketch("model", "serve", "--help", env=env).stdout
    assert "KETCH_BACKEND" in serve_help and "APP_NAME" not in ketch("predict", "--help", env=env).stdout

    (tmp_path / "bad.py").write_text(PER_ITEM)
    log = tmp_path / "bad.log"
    with LocalBroker() as broker:
        env = {
            "KETCH_ADMIN": broker.admin,
            "KETCH_FRONTEND": broker.frontend,
            "KETCH_BACKEND": broker.backend,
        }
        model = LocalModel(str(tmp_path / "bad.py") + ":predict", "bad", backend=broker.backend,
                           input_shape="4", log_path=str(log)).start()  # fmt: skip
        try:
            with Admin(broker.admin) as admin:
                model.wait_ready(admin, timeout_s=60)
            # an app whose shape the model cannot take is refused when linked
            wide = ketch("app", "create", "wide", "--input-type", "float64", "--input-shape", "10",
                         "--model", "bad", env=env)  # fmt: skip
            assert (
                wide.returncode == 1 and "model 'bad' (version 1) takes float64 of shape [4]" in wide.stderr
            )
            assert ketch("app", "create", "bad", "--input-type", "float64", "--input-shape", "4",
                         "--model", "bad", env=env).returncode == 0  # fmt: skip
            # wrong input from the CLI: plain words
            text = ketch("predict", "bad", "--input", '["a", 1, 2, 3]', env=env)
            assert text.returncode == 2 and "holds text; the app takes float64 numbers" in text.stderr
            assert "dtype" not in text.stderr and "<U" not in text.stderr
            # the model raises: type, message, place and the per-item hint to the client ...
            failed = ketch("predict", "bad", "--input", "[1, 2, 3, 4]", env=env)
            assert (
                failed.returncode == 1 and "MODEL_ERROR" in failed.stderr and "TypeError: " in failed.stderr
            )
            assert "(at bad.py:6 in predict)" in failed.stderr and "predict receives a list" in failed.stderr
            # ... and its traceback, with the model's file and line, to the replica's log
            wait_for(lambda: "Traceback" in log.read_text(), 10, "the traceback in the replica's log")
            assert 'bad.py\\", line 6, in predict' in log.read_text() or 'bad.py", line 6' in log.read_text()
            # one broker restart: one join per replica, not one per queued hello
            broker.stop()
            wait_for(lambda: "waiting for the broker" in log.read_text(), 30, "the replica to say it waits")
            broker.restart()
            with Admin(broker.admin) as admin:
                model.wait_ready(admin, timeout_s=60)
            after = broker.log_text().split("broker listening")[-1]
            assert after.count("replica joined") == 1 and "replica left" not in after, after
        finally:
            model.stop()
