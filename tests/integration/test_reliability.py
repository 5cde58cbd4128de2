"""Never lose a query: real processes, real signals, floods, bad peers and Curve keys."""

from __future__ import annotations

import os
import signal
import threading

import ketch
import numpy as np
import psutil
import pytest
import zmq
from ketch import curve
from ketch import protocol as proto
from ketch.bench import closed_loop, open_loop
from ketch.local import LocalBroker, LocalModel, wait_for

pytestmark = pytest.mark.timeout(180)


# a replica process on a busy machine can stall past 1.5 s, and a healthy replica declared
# dead has its batch re-queued; a killed one is seen at once anyway (its connection closes)
@pytest.mark.dead_after_ms(15_000)
def test_chaos_every_query_gets_exactly_one_answer(broker_process, tmp_path, request, capsys):
    """3 replicas under load: one killed with SIGKILL mid-batch, one stopped with SIGTERM;
    the supervisor restarts both. Every query sent gets exactly one answer."""
    with broker_process.admin_client() as admin:
        admin.create_app(
            "chaos", input_type="float64", input_shape=[4], slo_ms=3000, default=-1, models=["slow"]
        )
        model = LocalModel(
            "ketch.examples.basic:slow",
            "slow",
            backend=broker_process.backend,
            admin=broker_process.admin,
            replicas=3,
            env={"KETCH_SLOW_MS": "30"},
            extra_args=["--max-batch", "8"],
            log_path=str(tmp_path / "model-slow.log"),
        ).start()
        request.addfinalizer(model.stop)
        model.wait_ready(admin)
        rng = np.random.default_rng()
        inputs = rng.normal(size=(512, 4))
        result = {}

        def load() -> None:
            result["r"] = closed_loop(broker_process.frontend, "chaos", lambda k: inputs[k % 512], 32, 8.0)

        t = threading.Thread(target=load)
        t.start()

        def busy_pids() -> list[int]:
            return [r["pid"] for r in admin.replicas("slow") if r["inflight"] > 0]

        victims = wait_for(lambda: busy_pids() if len(busy_pids()) >= 2 else None, 20, "two busy replicas")
        os.kill(victims[0], signal.SIGKILL)  # mid-batch
        os.kill(victims[1], signal.SIGTERM)  # drains
        wait_for(lambda: len(admin.replicas("slow")) == 3 and victims[0] not in {
            r["pid"] for r in admin.replicas("slow")}, 30, "the supervisor to restart them")  # fmt: skip
        t.join(60)
        r = result["r"]
    with capsys.disabled():
        print(f"\nchaos: {r.summary()} errors by code {r.error_codes}")
    assert r.lost == 0 and r.duplicates == 0
    assert r.sent == r.ok + r.defaults + r.errors
    assert r.ok >= 0.9 * r.sent  # at least one replica lived throughout


def test_broker_killed_and_restarted_under_load(broker_process, start_model):
    with broker_process.admin_client() as admin:
        admin.create_app(
            "sum", input_type="float64", input_shape=[3], slo_ms=500, default=0, models=["total"]
        )
        start_model("ketch.examples.basic:total", "total", replicas=2).wait_ready(admin)
    outcomes = {"ok": 0, "default": 0, "failed": 0}
    stop = threading.Event()

    def load() -> None:
        with ketch.Client(broker_process.frontend, retries=3) as client:
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    p = client.predict("sum", [1.0, 2.0, float(i)], timeout_ms=3000)
                    outcomes["default" if p.default else "ok"] += 1
                except ketch.KetchError:
                    outcomes["failed"] += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        wait_for(lambda: outcomes["ok"] > 50, 20, "load to flow")
        broker_process.kill()
        broker_process.restart()
        before = outcomes["ok"]
        wait_for(lambda: outcomes["ok"] > before + 50, 30, "clients to recover after the restart")
    finally:
        stop.set()
        t.join(20)
    with broker_process.admin_client() as admin:
        assert admin.show_app("sum")["models"] == ["total"]
        assert len(admin.replicas("total")) == 2
    assert outcomes["failed"] == 0, outcomes


def test_flood_gets_overloaded_with_bounded_memory(tmp_path, capsys):

    broker = LocalBroker(
        state_path=str(tmp_path / "s.db"),
        extra_args=["--max-queue", "500", "--max-client-outstanding", "2000"],
    ).start()
    try:
        with broker.admin_client() as admin:
            admin.create_app(
                "f", input_type="float64", input_shape=[64], slo_ms=200, default=0, models=["slow"]
            )
            model = LocalModel("ketch.examples.basic:slow", "slow", backend=broker.backend, supervised=False,
                               env={"KETCH_SLOW_MS": "20"}, admin=broker.admin).start()  # fmt: skip
            try:
                model.wait_ready(admin)
                proc = psutil.Process(broker.proc.pid)
                x = np.ones(64)
                with ketch.Client(broker.frontend) as client:
                    for _ in range(200):
                        client.predict("f", x)
                before = proc.memory_info().rss
                peak = [before]
                sampling = threading.Event()

                def sample() -> None:
                    while not sampling.is_set():
                        peak[0] = max(peak[0], proc.memory_info().rss)
                        sampling.wait(0.05)

                sampler = threading.Thread(target=sample)
                sampler.start()
                flood = open_loop(
                    broker.frontend, "f", lambda k: x * k, 15000, 3.0, grace_s=10
                )  # distinct inputs
                sampling.set()
                sampler.join()
                after = proc.memory_info().rss
                with ketch.Client(broker.frontend) as client:  # a deadline a busy machine meets
                    normal = [client.predict("f", x + i, timeout_ms=10_000) for i in range(50)]
                stats = admin.stats()
            finally:
                model.stop()
    finally:
        broker.stop()
        broker._tmp.cleanup()
    mib = 2**20
    with capsys.disabled():
        print(
            f"\nflood: {flood.summary()} codes {flood.error_codes}; broker RSS before {before / mib:.1f} MiB,"
            f" peak {peak[0] / mib:.1f} MiB, after {after / mib:.1f} MiB;"
            f" refused {stats['models']['slow']['refused']}"
        )
    assert flood.lost == 0 and flood.duplicates == 0
    assert flood.error_codes.get("OVERLOADED", 0) > flood.sent // 4
    assert peak[0] - before < 200 * mib
    assert not any(p.default for p in normal)


def test_nan_is_refused_where_the_app_forbids_it(thread_broker):
    with ketch.Admin(thread_broker.admin) as admin, ketch.Client(thread_broker.frontend) as client:
        admin.create_app(
            "strict", input_type="float32", input_shape=[3], slo_ms=50, default=0, finite_only=True
        )
        admin.create_app("lax", input_type="float32", input_shape=[3], slo_ms=50, default=0)
        with pytest.raises(ketch.BadInput, match="NaN or infinity"):
            client.predict("strict", np.array([1, np.nan, 2], dtype=np.float32))
        with pytest.raises(ketch.BadInput, match="NaN or infinity"):
            client.predict("strict", np.array([1, np.inf, 2], dtype=np.float32))
        assert client.predict("lax", np.array([1, np.nan, 2], dtype=np.float32)).default


def test_a_model_output_that_does_not_fit_its_type_is_a_model_error(thread_broker):
    with ketch.Admin(thread_broker.admin) as admin, ketch.Client(thread_broker.frontend) as client:
        admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=3000, models=["bad"])
        raw = zmq.Context.instance().socket(zmq.DEALER)
        raw.linger = 0
        raw.connect(thread_broker.backend)
        try:
            hello = {"model": "bad", "model_version": "1", "input": {"dtype": "FLOAT64"}, "replica_id": "bad"}
            raw.send(proto.encode("Hello", hello))
            assert raw.poll(5000)
            raw.recv_multipart()
            result = {}
            t = threading.Thread(target=lambda: result.setdefault("e", _expect_error(client)))
            t.start()
            while True:  # on a busy machine the broker's heartbeats may come before the batch
                assert raw.poll(30_000)
                _, name, req = proto.decode(raw.recv_multipart()[0])
                if name == "PredictRequest":
                    break
                raw.send(proto.encode("Heartbeat", {}))  # and this replica stays alive meanwhile
            # claims float64[4] (32 bytes) but sends 3 bytes
            reply = proto.build_predict_reply(req.BatchId(), 5, [(0, proto.FLOAT64, (4,), 0, "")])
            raw.send_multipart([reply, b"abc"])
            t.join(30)
            assert "do not fit float64" in str(result["e"])
        finally:
            raw.close()


def _expect_error(client: ketch.Client) -> Exception:
    try:
        client.predict("a", [1.0])
    except ketch.ModelError as exc:
        return exc
    raise AssertionError("no error")


def test_a_client_with_too_many_outstanding_queries_is_refused(make_thread_broker):
    tb = make_thread_broker(max_client_outstanding=5)
    with ketch.Admin(tb.admin) as admin, ketch.Client(tb.frontend) as client:
        admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=200, default=0, models=["none"])
        answers = client.predict_many("a", [[float(i)] for i in range(8)], chunk=8, return_exceptions=True)
        assert all(isinstance(a, ketch.Overloaded) and "outstanding" in str(a) for a in answers)
        answers = client.predict_many("a", [[float(i)] for i in range(5)], chunk=5, return_exceptions=True)
        assert all(a.default for a in answers)  # within the limit: queued, then the default


def test_drain_stops_new_work_and_loses_nothing(broker_process, start_model):
    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        # batches of 1 s: work is in flight for seconds, long enough to be seen whatever the
        # machine's stalls; the 20 queries take a handful of batches, well within the deadline
        # (which the client waits for too)
        admin.create_app("slow", input_type="float64", input_shape=[1], slo_ms=30_000, models=["slow"])
        start_model(
            "ketch.examples.basic:slow", "slow", replicas=2, env={"KETCH_SLOW_MS": "1000"}
        ).wait_ready(admin)
        result = {}
        t = threading.Thread(
            target=lambda: result.setdefault(
                "p", client.predict_many("slow", [[float(i)] for i in range(20)], timeout_ms=30_000)
            )
        )
        t.start()
        wait_for(lambda: any(r["inflight"] for r in admin.replicas("slow")), 10, "work in flight")
        victim = admin.replicas("slow")[0]["replica_id"]
        assert admin.drain("slow", victim)["draining"] == [victim]
        t.join(60)
        assert [p.output for p in result["p"]] == [float(i) for i in range(20)]
        with pytest.raises(ketch.NotFound):
            admin.drain("slow", "no-such-replica")


def test_curve_lets_in_known_keys_only(tmp_path, make_thread_broker):
    keys = tmp_path / "keys"
    allowed = {role: tmp_path / role for role in ("clients", "containers", "admins")}
    _, broker_secret = curve.generate(str(keys), "broker")
    peers = {}
    for name, role in (("client", "clients"), ("container", "containers"), ("admin", "admins")):
        public, secret = curve.generate(str(keys), name)
        allowed[role].mkdir()
        (allowed[role] / public.name).write_bytes(public.read_bytes())
        peers[name] = curve.PeerKeys.load(str(keys / "broker.key"), str(secret))
    _, stranger_secret = curve.generate(str(keys), "stranger")
    stranger = curve.PeerKeys.load(str(keys / "broker.key"), str(stranger_secret))
    tb = make_thread_broker(
        curve_secret=str(broker_secret),
        curve_clients=str(allowed["clients"]),
        curve_containers=str(allowed["containers"]),
        curve_admins=str(allowed["admins"]),
    )
    replicas = []
    try:
        with ketch.Admin(tb.admin, curve=peers["admin"]) as admin:
            admin.create_app("a", input_type="float64", input_shape=[2], slo_ms=2000, models=["m"])
            good = ketch.Replica(lambda xs: [float(x.sum()) for x in xs], name="m", broker=tb.backend,
                                 curve=peers["container"], replica_id="good")  # fmt: skip
            bad = ketch.Replica(lambda xs: [666.0 for _ in xs], name="m", broker=tb.backend, curve=stranger,
                                replica_id="stranger")  # fmt: skip
            for r in (good, bad):
                th = threading.Thread(target=r.run, daemon=True)
                th.start()
                replicas.append((r, th))
            wait_for(lambda: admin.replicas("m"), 10, "the allowed container")
            with ketch.Client(tb.frontend, curve=peers["client"]) as client:
                assert client.predict("a", [1.0, 2.0]).output == 3.0
            with ketch.Client(tb.frontend, curve=stranger) as client, pytest.raises(ketch.Timeout):
                client.predict("a", [1.0, 2.0], timeout_ms=200)
            with ketch.Client(tb.frontend) as client, pytest.raises(ketch.Timeout):  # no Curve at all
                client.predict("a", [1.0, 2.0], timeout_ms=200)
            with pytest.raises(ketch.Unavailable):
                ketch.Admin(tb.admin, curve=stranger, timeout_ms=300).ping()
            assert [r["replica_id"] for r in admin.replicas("m")] == ["good"]
    finally:
        for r, th in replicas:
            r.stop()
            th.join(5)


@pytest.mark.timeout(300)
def test_bounded_fuzz_run_leaves_the_broker_serving(capsys):
    """The three sockets and the HTTP gateway fuzzed with garbage and valid-but-extreme
    messages; the broker and gateway alive, RSS bounded and back near its baseline, and the
    legitimate ZeroMQ and HTTP clients' every answer right (tests/fuzz/fuzz_broker.py)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_broker.py"
    done = subprocess.run(
        [sys.executable, str(script), "--seconds", "6"], capture_output=True, text=True, timeout=240
    )
    with capsys.disabled():
        print("\n" + "\n".join(line for line in done.stdout.splitlines() if not line.startswith("  ")))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all answered right" in done.stdout


def test_an_oversize_message_is_dropped_and_the_broker_keeps_serving(make_thread_broker):
    tb = make_thread_broker(max_message_bytes=1024 * 1024)
    with ketch.Admin(tb.admin) as admin:
        admin.create_app("big", input_type="uint8", input_shape=[-1], slo_ms=100, default=0)
        with ketch.Client(tb.frontend) as client, pytest.raises(ketch.Timeout):
            client.predict("big", np.zeros(2 * 1024 * 1024, dtype=np.uint8), timeout_ms=200)
        with ketch.Client(tb.frontend) as client:
            assert client.predict("big", np.zeros(1000, dtype=np.uint8)).default  # small ones still served
        assert admin.ping()["version"] == 1
