"""Batching and scheduling through a real broker loop: pull-based load balance,
bounded queues, expired queries never computed."""

from __future__ import annotations

import threading
import time

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(60)


def recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no message in time"
    return sock.recv_multipart()


@pytest.fixture
def env(thread_broker, replica_threads):
    admin = ketch.Admin(thread_broker.admin)
    client = ketch.Client(thread_broker.frontend)
    count = [0]

    def serve(model, **kw):
        replica_threads(model, backend=thread_broker.backend, **kw)
        count[0] += 1
        wait_for(lambda: len(admin.replicas("m")) >= count[0], 10, "replica")

    yield thread_broker, admin, client, serve
    client.close()
    admin.close()


def sleeper(per_batch_s: float):
    def predict(xs):
        time.sleep(per_batch_s)
        return [float(x.sum()) for x in xs]

    return predict


def test_a_slow_replica_takes_less_work_than_a_fast_one(env):
    _, admin, client, serve = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=10000, models=["m"])
    admin.configure_model("m", max_batch=4, batching="fixed")
    serve(sleeper(0.030), replica_id="slow")
    serve(sleeper(0.002), replica_id="fast")
    xs = [np.array([float(i)]) for i in range(300)]
    assert [p.output for p in client.predict_many("a", xs)] == [float(i) for i in range(300)]
    items = {r["replica_id"]: r["items"] for r in admin.replicas("m")}
    assert items["fast"] > 2 * items["slow"] > 0, items


def test_a_full_queue_refuses_at_once_with_retry_after(env):
    tb, admin, _, _ = env
    # the queued ten wait for their 3 s deadline: the refusals must come before (in order), not fast
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=3000, default=0, models=["m"])
    admin.configure_model("m", max_queue=10)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(tb.frontend)
    try:
        ids = list(range(1, 11))
        sock.send_multipart(
            [proto.build_query("a", proto.FLOAT64, [1], ids), *([np.float64(1).tobytes()] * 10)]
        )
        more = list(range(11, 31))
        sock.send_multipart(
            [proto.build_query("a", proto.FLOAT64, [1], more), *([np.float64(1).tobytes()] * 20)]
        )
        first = proto.to_dict(recv(sock)[0])["body"]["items"]  # before the queued ones' deadline
        assert {i["request_id"] for i in first} == set(more)
        assert all(i["error"] == "OVERLOADED" and i["retry_after_ms"] > 0 for i in first)
        rest = proto.to_dict(recv(sock, 30_000)[0])["body"][
            "items"
        ]  # the queued ten: defaults at the deadline
        assert {i["request_id"] for i in rest} == set(ids) and all(i["status"] == "DEFAULT" for i in rest)
    finally:
        sock.close()
    assert admin.stats()["models"]["m"]["refused"] == 20


def test_expired_queries_are_never_sent_to_a_model(env):
    tb, admin, client, _ = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=150, default=-1, models=["m"])
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.linger = 0
    raw.connect(tb.backend)
    try:
        raw.send(
            proto.encode(
                "Hello",
                {
                    "model": "m",
                    "model_version": "1",
                    "input": {"dtype": "FLOAT64"},
                    "sdk": "test",
                    "replica_id": "hold",
                    "credits": 1,
                },
            )
        )
        assert proto.to_dict(recv(raw)[0])["type"] == "Welcome"
        wait_for(lambda: admin.replicas("m"), 5, "replica")
        results = {}
        t = threading.Thread(
            target=lambda: results.setdefault(
                "p", client.predict_many("a", [[float(i)] for i in range(6)], chunk=1)
            )
        )
        t.start()
        while True:  # the replica takes its first batch and holds it past every deadline
            _, name, body = proto.decode(recv(raw)[0])
            if name != "Heartbeat":  # on a busy machine the broker's heartbeat may come first
                break
        assert name == "PredictRequest"
        held = body.BudgetsUsLength()
        t.join(30)
        assert sum(p.default for p in results["p"]) == 6  # every query got the default in time
        answer = proto.build_predict_reply(body.BatchId(), 10, [(0, proto.FLOAT64, (), 0, "")] * held)
        raw.send_multipart([answer, *([np.float64(0).tobytes()] * held)])
        # nothing else may reach the replica: the rest expired in the queue
        while raw.poll(300):
            _, name, _ = proto.decode(raw.recv_multipart()[0])
            assert name != "PredictRequest", "an expired query was sent to the model"
        assert admin.stats()["models"]["m"]["dropped"] == 6 - held
    finally:
        raw.close()


def test_a_slow_first_batch_does_not_condemn_an_idle_replica(env):
    """A cold first batch slower than the SLO (imports, caches warming) once made the broker
    give up on every later query before sending it, so no faster batch ever corrected the
    estimate: an idle replica now gets the query with the most time left."""
    _, admin, client, serve = env
    calls = [0]

    def cold_then_fast(xs):
        calls[0] += 1
        if calls[0] == 1:
            time.sleep(2.0)
        return [float(x.sum()) for x in xs]

    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=1000, default=-1, models=["m"])
    serve(cold_then_fast)
    first = client.predict("a", [1.0])
    assert first.default  # the cold batch missed its SLO
    wait_for(lambda: admin.replicas("m")[0]["inflight"] == 0, 10, "the cold batch's reply")
    answers = [client.predict("a", [float(i)]) for i in range(20)]  # one at a time: the replica idles
    assert sum(not p.default for p in answers) >= 18, [p.default_explanation for p in answers]
    assert all(p.output == float(i) for i, p in enumerate(answers) if not p.default)


def test_under_a_burst_batches_grow_and_figures_are_reported(env):
    _, admin, client, serve = env
    # (an SLO of 10 s: the burst is about the figures, and a machine loaded enough to stall
    # the replica thread for seconds must not turn it into refusals or missed deadlines)
    admin.create_app("a", input_type="float64", input_shape=[4], slo_ms=10_000, models=["m"])
    serve(sleeper(0.003), replica_id="r")
    rng = np.random.default_rng()
    xs = list(rng.normal(size=(800, 4)))
    client.predict_many("a", xs, window=800)
    stats = admin.stats()["models"]["m"]
    assert stats["mean_batch"] > 4 and stats["batching"] == "model"
    replica = admin.replicas("m")[0]
    assert replica["batch_size"] > 1
    assert sum(replica["batch_sizes"].values()) == replica["batches"]
    assert replica["compute_ms"]["p50_ms"] >= 3.0
    assert stats["queue_wait_ms"]["p99_ms"] > 0
