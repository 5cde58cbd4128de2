"""End to end with real processes: ``ketchd``, ``ketch model serve`` and real signals."""

from __future__ import annotations

import os
import signal
import threading

import ketch
import numpy as np
import pytest
from ketch.local import LocalModel, wait_for

pytestmark = pytest.mark.timeout(120)


def test_iris_replicas_answer_like_the_model(broker_process, start_model):
    from ketch.examples import iris

    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        admin.create_app(
            "iris", input_type="float64", input_shape=[4], slo_ms=30_000, default=-1, models=["iris"]
        )
        model = start_model("ketch.examples.iris:model", "iris", replicas=2, input_shape="4")
        model.wait_ready(admin, timeout_s=60)
        rows = iris.features()
        preds = client.predict_many("iris", list(rows))
        assert [int(p.output) for p in preds] == iris.estimator().predict(rows).tolist()
        assert not any(p.default for p in preds)
        replicas = admin.replicas("iris")
        assert len(replicas) == 2 and len({r["pid"] for r in replicas}) == 2
        # host/model/PID.INDEX: the supervisor's pid, the replica's index under it
        assert {r["replica_id"].rsplit("/", 1)[1].rsplit(".", 1)[1] for r in replicas} == {"0", "1"}


def test_broker_restart_keeps_configuration_and_replicas_come_back(broker_process, start_model):
    with broker_process.admin_client() as admin:
        admin.create_app(
            "sum", input_type="float64", input_shape=[-1], slo_ms=2000, default=0, models=["total"]
        )
        start_model("ketch.examples.basic:total", "total", version="1").wait_ready(admin)
        start_model("ketch.examples.basic:total", "total", version="2").wait_ready(admin)
        admin.set_version("total", "2")
    broker_process.kill()
    broker_process.restart()
    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        app = admin.show_app("sum")
        assert (app["input_shape"], app["slo_ms"], app["default"], app["models"]) == (
            [-1],
            2000.0,
            0,
            ["total"],
        )
        assert admin.show_model("total")["active_version"] == "2"
        wait_for(lambda: len(admin.replicas("total")) == 2, 30, "replicas to reconnect")
        pred = client.predict("sum", np.arange(5.0))
        assert (pred.output, pred.version, pred.default) == (10.0, "2", False)


def test_killed_replica_mid_batch_loses_no_query(broker_process, start_model):
    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        admin.create_app("slow", input_type="float64", input_shape=[1], slo_ms=15000, models=["slow"])
        model = start_model(
            "ketch.examples.basic:slow",
            "slow",
            replicas=2,
            env={"KETCH_SLOW_MS": "400"},
            extra_args=["--max-batch", "4"],
        )
        model.wait_ready(admin)
        xs = [np.array([float(i)]) for i in range(40)]
        rng = np.random.default_rng()
        for x in xs:
            x += rng.integers(0, 1000)
        ids_sent = len(xs)

        victim = {}

        def busy_replica():
            for r in admin.replicas("slow"):
                if r["inflight"] > 0:
                    victim["pid"] = r["pid"]
                    return True
            return False

        result = {}
        t = threading.Thread(target=lambda: result.setdefault("preds", client.predict_many("slow", xs)))
        t.start()
        wait_for(busy_replica, 20, "a replica with work in flight")
        os.kill(victim["pid"], signal.SIGKILL)
        t.join(60)
        preds = result["preds"]
        assert len(preds) == ids_sent
        assert [p.output for p in preds] == [float(x[0]) for x in xs]
        assert not any(p.default for p in preds)


def test_sigterm_drains_a_replica_without_losing_its_batch(broker_process, tmp_path):
    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        # a batch takes 2 s: in flight long enough to be seen, whatever the machine's stalls; the
        # deadline is 10x that
        admin.create_app("slow", input_type="float64", input_shape=[1], slo_ms=20_000, models=["slow"])
        model = LocalModel(
            "ketch.examples.basic:slow",
            "slow",
            backend=broker_process.backend,
            supervised=False,
            env={"KETCH_SLOW_MS": "2000"},
            log_path=str(tmp_path / "replica.log"),
        ).start()
        try:
            model.wait_ready(admin)
            result = {}
            t = threading.Thread(
                target=lambda: result.setdefault("p", client.predict("slow", [3.0], timeout_ms=20_000))
            )
            t.start()
            wait_for(
                lambda: any(r["inflight"] for r in admin.replicas("slow")), 10, "the batch to be in flight"
            )
            model.proc.send_signal(signal.SIGTERM)
            assert model.proc.wait(30) == 0
            t.join(30)
            assert result["p"].output == 3.0 and not result["p"].default
            wait_for(lambda: admin.replicas("slow") == [], 5, "the replica to say goodbye")
        finally:
            model.stop()
