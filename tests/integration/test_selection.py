"""Selection policies through a real broker loop: ensembles at the deadline, bandits that
learn from feedback, canaries, shadows, version switches under load, persisted state.

Assertions are about what is answered, never how fast: a straggler is held on an event
(so an answer that waited for it could not come at all), and waits are generous bounds.
"""

from __future__ import annotations

import threading

import ketch
import numpy as np
import pytest
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def env(make_thread_broker, replica_threads, tmp_path):
    state = str(tmp_path / "state.db")
    tb = make_thread_broker(state_path=state, heartbeat_ms=100, dead_after_ms=10_000)
    admin = ketch.Admin(tb.admin)
    client = ketch.Client(tb.frontend)
    count = [0]

    def serve(name: str, fn, **kw) -> ketch.Replica:
        r = replica_threads(fn, backend=tb.backend, name=name, replica_id=f"{name}-{count[0]}", **kw)
        count[0] += 1
        wait_for(lambda: admin.replicas(name), 30, f"replica of {name}")
        return r

    yield tb, admin, client, serve, state
    client.close()
    admin.close()


def labeller(label: str, hold: threading.Event | None = None):
    def predict(xs):
        if hold is not None:
            hold.wait(60)  # a straggler: it answers only once the test lets it
        return [label for _ in xs]

    return predict


def test_ensemble_answers_at_the_deadline_without_the_straggler(env):
    _, admin, client, serve, _ = env
    # a deadline a busy machine still meets for a and b; the straggler never answers in it
    admin.create_app("vote", input_type="float64", input_shape=[2], slo_ms=3000, default="none",
                     models=["a", "b", "slow"])  # fmt: skip
    admin.set_policy("vote", "ensemble")
    serve("a", labeller("cat"))
    serve("b", labeller("cat"))
    release = threading.Event()
    serve("slow", labeller("dog", hold=release))
    try:
        for i in range(3):
            # the straggler holds every batch it gets until the end of the test: an ensemble
            # that waited for it would not answer at all (the client gives up after 10 s)
            # and the answer comes at the deadline, from a and b
            p = client.predict("vote", [float(i), 1.0])
            assert p.output == "cat" and not p.default
            assert set(p.models_answered) == {"a", "b"} and p.models_missing == ("slow",)
            assert p.confidence == pytest.approx(2 / 3)
        shown = admin.show_app("vote")
        assert shown["selection"]["policy"] == "ensemble"
    finally:
        release.set()


def test_ensemble_with_all_models_dead_answers_the_default_in_time(env):
    _, admin, client, _, _ = env
    admin.create_app("vote", input_type="float64", input_shape=[1], slo_ms=80, default="unknown",
                     models=["x", "y"])  # fmt: skip
    admin.set_policy("vote", "exp4")
    p = client.predict("vote", [1.0])
    assert p.default and p.output == "unknown" and "no model answered" in p.default_explanation
    # answered by the broker at its deadline, not lost (the client would wait 10 s); the bound
    # is generous because this process may stall on a busy machine
    assert p.latency_ms < 80 + 5000


def test_ensemble_of_numbers_is_a_weighted_mean(env):
    _, admin, client, serve, _ = env
    admin.create_app("mean", input_type="float64", input_shape=[1], slo_ms=10_000, models=["m1", "m2"])
    admin.set_policy("mean", "ensemble")
    serve("m1", lambda xs: [float(x[0]) + 1.0 for x in xs])
    serve("m2", lambda xs: [float(x[0]) + 3.0 for x in xs])
    p = client.predict("mean", [10.0])
    assert float(p.output) == pytest.approx(12.0) and 0 < p.confidence < 1


def test_exp3_feedback_moves_traffic_to_the_accurate_model(env):
    _, admin, client, serve, _ = env
    admin.create_app("bandit", input_type="float64", input_shape=[1], slo_ms=10_000, models=["good", "bad"],
                     cache=False)  # fmt: skip
    admin.set_policy("bandit", "exp3", gamma=0.1, seed=3)
    serve("good", lambda xs: [int(x[0]) % 2 for x in xs])
    serve("bad", lambda xs: [1 - int(x[0]) % 2 for x in xs])
    chosen = []
    for i in range(400):
        p = client.predict("bandit", [float(i)])
        chosen.append(p.model)
        client.feedback("bandit", i % 2, query_id=p.request_id)
    assert chosen[-100:].count("good") > 70, chosen[-100:].count("good")
    selection = admin.show_app("bandit")["selection"]
    assert selection["policy"] == "exp3"
    assert selection["models"]["good"]["weight"] > 0.7 > selection["models"]["bad"]["weight"]


def test_feedback_by_input_and_errors(env):
    _, admin, client, serve, _ = env
    admin.create_app("e", input_type="float64", input_shape=[1], slo_ms=10_000, models=["a", "b"])
    admin.create_app("plain", input_type="float64", input_shape=[1], slo_ms=10_000, models=["a"])
    admin.set_policy("e", "exp4")
    serve("a", labeller("yes"))
    serve("b", labeller("no"))
    client.predict("e", [5.0])
    client.feedback("e", "yes", x=[5.0])
    with pytest.raises(ketch.NotFound):
        client.feedback("e", "yes", x=[6.0])
    with pytest.raises(ketch.NotFound):
        client.feedback("e", "yes", query_id=123456789)
    with pytest.raises(ketch.Invalid, match="single policy"):
        client.feedback("plain", "yes", query_id=1)


def test_weighted_split_holds_its_ratio_and_is_stable_per_user(env):
    _, admin, client, serve, _ = env
    models = ["stable", "canary"]
    # a deadline no busy machine misses: the split is under test, not admission by capacity
    admin.create_app(
        "canary", input_type="float64", input_shape=[1], slo_ms=30_000, models=models, cache=False
    )
    admin.set_policy("canary", "weighted", weights={"stable": 0.8, "canary": 0.2}, seed=1)
    serve("stable", labeller("s"))
    serve("canary", labeller("c"))
    preds = client.predict_many("canary", [[float(i)] for i in range(1000)])
    share = sum(p.model == "canary" for p in preds) / len(preds)
    assert 0.15 < share < 0.25
    same_user = {client.predict("canary", [float(i)], context="user-7").model for i in range(20)}
    assert len(same_user) == 1


def test_shadow_answers_from_the_primary_and_records_agreement(env):
    _, admin, client, serve, _ = env
    admin.create_app("sh", input_type="float64", input_shape=[1], slo_ms=10_000, models=["prod", "next"])
    admin.set_policy("sh", "shadow", primary="prod")
    serve("prod", labeller("p"))
    serve("next", labeller("n"))
    for i in range(20):
        p = client.predict("sh", [float(i)])
        assert (p.output, p.model) == ("p", "prod")
    wait_for(lambda: admin.show_app("sh")["selection"]["models"].get("next", {}).get("agreement") is not None,
             30, "shadow agreement figures")  # fmt: skip
    assert admin.show_app("sh")["selection"]["models"]["next"]["agreement"] == 0.0


def test_version_switch_under_load_loses_no_query(env):
    _, admin, client, serve, _ = env
    # a deadline no busy machine reaches: the behaviour is that no query is lost, not speed
    admin.create_app("v", input_type="float64", input_shape=[1], slo_ms=120_000, models=["m"], cache=False)
    serve("m", lambda xs: [1.0 for _ in xs], version="1")
    serve("m", lambda xs: [2.0 for _ in xs], version="2")
    wait_for(lambda: len(admin.replicas("m")) == 2, 30, "both versions")
    result = {}
    xs = [[float(i)] for i in range(3000)]
    t = threading.Thread(target=lambda: result.setdefault("p", client.predict_many("v", xs)))
    t.start()
    with ketch.Admin(env[0].admin) as other:
        for k in range(10):
            other.set_version("m", "2" if k % 2 == 0 else "1")
    t.join(150)
    assert not t.is_alive(), "predict_many did not return"
    preds = result["p"]
    assert len(preds) == 3000 and not any(p.default for p in preds)
    assert {p.output for p in preds} <= {1.0, 2.0}


def test_learned_state_survives_a_broker_restart(make_thread_broker, tmp_path):
    state = str(tmp_path / "s.db")
    tb = make_thread_broker(state_path=state)
    with ketch.Admin(tb.admin) as admin:
        admin.create_app("b", input_type="float64", input_shape=[1], slo_ms=100, models=["a", "c"])
        admin.set_policy("b", "exp3", gamma=0.2, seed=5)
        before = admin.show_app("b")["selection"]
    tb.stop()
    again = make_thread_broker(state_path=state)
    with ketch.Admin(again.admin) as admin:
        after = admin.show_app("b")["selection"]
    assert after == before and after["policy"] == "exp3"


def test_feedback_names_only_the_clients_own_queries(env):
    tb, admin, client, serve, _ = env
    admin.create_app("bandit", input_type="float64", input_shape=[1], slo_ms=10_000, models=["a", "b"],
                     cache=False)  # fmt: skip
    admin.set_policy("bandit", "exp3", seed=1)
    serve("a", labeller("x"))
    serve("b", labeller("x"))
    mine = [client.predict("bandit", [float(i)]) for i in range(20)]
    before = admin.show_app("bandit")["selection"]["models"]
    with ketch.Client(tb.frontend) as intruder:
        for p in mine:  # another client names A's request ids: refused, learns nothing
            with pytest.raises(ketch.NotFound, match="this client's own"):
                intruder.feedback("bandit", "y", query_id=p.request_id)
    after = admin.show_app("bandit")["selection"]["models"]
    assert after == before
    client.feedback("bandit", "x", query_id=mine[-1].request_id)  # its own: taken
    assert sum(m["feedback"] for m in admin.show_app("bandit")["selection"]["models"].values()) == 1


def test_feedback_memory_is_bounded_in_bytes_and_keeps_no_inputs(make_thread_broker, replica_threads):
    tb = make_thread_broker(feedback_memory_bytes=256 * 1024)
    with ketch.Admin(tb.admin) as admin, ketch.Client(tb.frontend) as client:
        admin.create_app(
            "e", input_type="uint8", input_shape=[-1], slo_ms=2000, models=["a", "b"], cache=False
        )
        admin.set_policy("e", "exp3")
        for name in ("a", "b"):
            replica_threads(lambda xs: [bytes(16 * 1024) for _ in xs], backend=tb.backend, name=name)
            wait_for(lambda name=name: admin.replicas(name), 10, f"replica of {name}")
        preds = [client.predict("e", np.full(64 * 1024, i % 256, np.uint8)) for i in range(60)]
        recent = tb.broker.ensembles.recent
        assert 0 < recent.bytes <= 256 * 1024 and len(recent) < 20  # ~17 KiB each: outputs, not inputs
        assert all(f.payload == b"" for f, *_ in recent.sizes.values())
        with pytest.raises(ketch.NotFound):  # the oldest went out
            client.feedback("e", bytes(16 * 1024), query_id=preds[0].request_id)
        client.feedback("e", bytes(16 * 1024), query_id=preds[-1].request_id)
