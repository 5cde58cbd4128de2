"""Bugs on the broker's loop (ketchd/faults.py): injected into a policy, a combiner, the cache,
the reply sender, the dispatcher and a handler of a broker running on a thread. Each must be
counted (``internal_errors``), logged with its traceback, cost only the queries it touched
(answered INTERNAL, exactly once), and leave the broker serving."""

from __future__ import annotations

import threading

import ketch
import numpy as np
import pytest
from ketch import protocol as proto
from ketch.local import wait_for
from structlog.testing import capture_logs

pytestmark = pytest.mark.timeout(60)
F64 = proto.FLOAT64


@pytest.fixture
def env(make_thread_broker, replica_threads):
    # dead only after 15 s: a replica thread stalled by a busy machine is not what is tested here
    tb = make_thread_broker(heartbeat_ms=100, dead_after_ms=15_000)
    admin = ketch.Admin(tb.admin)
    client = ketch.Client(tb.frontend)

    def serve(name: str, fn, **kw) -> ketch.Replica:
        r = replica_threads(fn, backend=tb.backend, name=name, replica_id=f"{name}-r", **kw)
        wait_for(lambda: admin.replicas(name), 10, f"replica of {name}")
        return r

    yield tb, admin, client, serve
    client.close()
    admin.close()


def label(text: str):
    return lambda xs: [text for _ in xs]


def one(x: float) -> bytes:
    return np.array([x]).tobytes()


def injected(*_, **__):
    raise RuntimeError("injected bug")


def internal_errors(admin) -> int:
    return admin.stats()["counters"].get("internal_errors", 0)


def exactly_once_internal(raw, ids, past_s: float) -> None:
    """Each of ``ids`` answered INTERNAL, and nothing more for them until ``past_s`` later
    (past their deadlines: no second answer at the deadline either)."""
    answers = raw.wait(ids)
    assert all(a["status"] == "ERROR" and a["error"] == "INTERNAL" for a in answers.values()), answers
    raw.take(past_s)
    assert all(len(raw.items[rid]) == 1 for rid in ids), {rid: len(raw.items[rid]) for rid in ids}


def test_a_combiner_that_raises_answers_internal_once_and_the_broker_goes_on(env, raw_client):
    tb, admin, client, serve = env
    admin.create_app("vote", input_type="float64", input_shape=[1], slo_ms=300, models=["a", "b"])
    admin.set_policy("vote", "ensemble")
    serve("a", label("cat"))
    serve("b", label("cat"))
    policy = tb.broker.apps["vote"].policy
    policy.combine = injected
    raw = raw_client(tb.frontend)
    with capture_logs() as logs:
        raw.query("vote", [one(1.0)], [11], F64, (1,))
        exactly_once_internal(raw, [11], 0.6)
    assert internal_errors(admin) == 1
    bugs = [e for e in logs if e["event"] == "internal error"]
    assert bugs and isinstance(bugs[0]["exc_info"], RuntimeError) and "combining" in bugs[0]["where"]
    del policy.combine  # the bug fixed: the same app answers again
    assert client.predict("vote", [2.0], timeout_ms=5000).output == "cat"


@pytest.mark.parametrize("kind", ["exp3", "single"])
def test_a_policy_that_raises_choosing_models_fails_only_its_queries(env, raw_client, kind):
    tb, admin, client, serve = env
    admin.create_app("p", input_type="float64", input_shape=[1], slo_ms=300, models=["a", "b"])
    if kind != "single":
        admin.set_policy("p", kind)
    admin.create_app("other", input_type="float64", input_shape=[1], slo_ms=2000, models=["a"])
    serve("a", label("cat"))
    serve("b", label("cat"))
    policy = tb.broker.apps["p"].policy
    policy.select = injected
    raw = raw_client(tb.frontend)
    raw.query("p", [one(1.0), one(2.0), one(3.0)], [21, 22, 23], F64, (1,))
    exactly_once_internal(raw, [21, 22, 23], 0.6)
    assert internal_errors(admin) >= 1
    assert client.predict("other", [1.0], timeout_ms=5000).output == "cat"  # the broker serves everyone else
    del policy.select
    assert client.predict("p", [1.0], timeout_ms=5000).output == "cat"


def test_a_policy_that_raises_learning_answers_the_feedback_internal(env):
    tb, admin, client, serve = env
    admin.create_app("bandit", input_type="float64", input_shape=[1], slo_ms=2000, models=["a", "b"])
    admin.set_policy("bandit", "exp3")
    serve("a", label("cat"))
    serve("b", label("cat"))
    pred = client.predict("bandit", [1.0], timeout_ms=5000)
    tb.broker.apps["bandit"].policy.feedback = injected
    with pytest.raises(ketch.errors.InternalError, match="learning from feedback"):
        client.feedback("bandit", "cat", query_id=pred.request_id)
    assert internal_errors(admin) == 1
    assert client.predict("bandit", [1.0], timeout_ms=5000).output == "cat"


@pytest.mark.parametrize("method", ["get", "put"])
def test_a_cache_that_raises_costs_caching_not_answers(env, method):
    tb, admin, client, serve = env
    # (an SLO of 30 s: each failure logs a traceback on the broker's loop, which a busy
    # machine makes slow)
    admin.create_app("c", input_type="float64", input_shape=[1], slo_ms=30_000, models=["a"])
    serve("a", lambda xs: [float(x[0]) * 2 for x in xs])
    setattr(tb.broker.cache, method, injected)
    preds = client.predict_many("c", [[float(i)] for i in range(5)])
    assert [p.output for p in preds] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert internal_errors(admin) >= 1


def test_a_reply_that_cannot_be_sent_goes_as_internal_errors(env, raw_client, monkeypatch):
    tb, admin, client, serve = env
    admin.create_app("s", input_type="float64", input_shape=[1], slo_ms=300, models=["a"], cache=False)
    serve("a", lambda xs: [1.0 for _ in xs])
    monkeypatch.setattr(proto.ReplySender, "send_plain", injected)  # the broker's sender only
    raw = raw_client(tb.frontend)
    raw.query("s", [one(1.0), one(2.0)], [31, 32], F64, (1,))
    exactly_once_internal(raw, [31, 32], 0.6)
    monkeypatch.undo()
    assert client.predict("s", [1.0], timeout_ms=5000).output == 1.0


def test_a_dispatcher_bug_fails_the_batch_it_held_and_nothing_else(env, raw_client):
    tb, admin, client, serve = env
    admin.create_app("d", input_type="float64", input_shape=[1], slo_ms=300, models=["a"], cache=False)
    serve("a", lambda xs: [1.0 for _ in xs])
    dispatcher = tb.broker.dispatcher
    dispatcher.send_batch = injected
    raw = raw_client(tb.frontend)
    raw.query("d", [one(1.0)], [41], F64, (1,))
    exactly_once_internal(raw, [41], 0.6)
    del dispatcher.send_batch
    assert client.predict("d", [1.0], timeout_ms=5000).output == 1.0


def test_a_handler_bug_answers_the_message_internal(env, raw_client):
    tb, admin, client, serve = env
    admin.create_app("h", input_type="float64", input_shape=[1], slo_ms=300, models=["a"])
    serve("a", lambda xs: [1.0 for _ in xs])
    admission = tb.broker.admission
    admission.admit = injected
    raw = raw_client(tb.frontend)
    raw.query("h", [one(1.0), one(2.0)], [51, 52], F64, (1,))
    exactly_once_internal(raw, [51, 52], 0.6)
    del admission.admit
    assert client.predict("h", [1.0], timeout_ms=5000).output == 1.0


@pytest.mark.parametrize("fails", [False, True])
def test_a_latency_past_uint32_saturates_instead_of_killing_the_broker(env, raw_client, fails):
    """A query held longer than uint32 microseconds (71.6 min; a long timeout answered late):
    its latency_us saturates, in a templated reply and in a built one."""
    tb, admin, _client, serve = env
    admin.create_app("l", input_type="float64", input_shape=[1], slo_ms=5000, models=["a"], cache=False)
    go = threading.Event()

    def held(xs):
        go.wait(10)
        if fails:
            raise ValueError("no")
        return [1.0 for _ in xs]

    serve("a", held)
    raw = raw_client(tb.frontend)
    raw.query("l", [one(1.0)], [61], F64, (1,), timeout_us=0xFFFFFFFF)
    held_query = wait_for(
        lambda: next((p for p in list(tb.broker.deadlines.items()) if p.request_id == 61), None), 5, "held"
    )
    held_query.arrived -= 5000.0  # as if it had been held 5000 s (> 4294.97 s)
    go.set()
    answer = raw.wait([61])[61]
    assert answer["latency_us"] == 0xFFFFFFFF
    assert answer["status"] == ("ERROR" if fails else "OK")
    raw.query("l", [one(2.0)], [62], F64, (1,))  # still serving
    assert raw.wait([62])[62]["status"] == ("ERROR" if fails else "OK")
