"""The cache and single-flight through a real broker loop and real replicas."""

from __future__ import annotations

import threading

import ketch
import numpy as np
import pytest
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(60)


class Counting:
    """A model that counts its computations and can be held mid-batch."""

    def __init__(self, value: float = 0.0) -> None:
        self.calls = 0
        self.items = 0
        self.value = value
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.lock = threading.Lock()

    def predict(self, xs):
        self.entered.set()
        self.gate.wait(10)
        with self.lock:
            self.calls += 1
            self.items += len(xs)
        return [float(x.sum()) + self.value for x in xs]


@pytest.fixture
def setup(thread_broker, replica_threads):
    admin = ketch.Admin(thread_broker.admin)
    client = ketch.Client(thread_broker.frontend)
    count = [0]

    def serve(model, **kw):
        r = replica_threads(model, backend=thread_broker.backend, **kw)
        count[0] += 1
        wait_for(lambda: len(admin.replicas("m")) >= count[0], 10, "replica")
        return r

    yield admin, client, serve
    client.close()
    admin.close()


def test_identical_concurrent_queries_compute_once(setup):
    admin, client, serve = setup
    admin.create_app("a", input_type="float64", input_shape=[3], slo_ms=5000, models=["m"])
    model = Counting()
    serve(model)
    model.gate.clear()
    x = np.random.default_rng().normal(size=3)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("p", client.predict_many("a", [x] * 20)))
    t.start()
    assert model.entered.wait(5)
    model.gate.set()
    t.join(10)
    assert [p.output for p in result["p"]] == pytest.approx([x.sum()] * 20)
    assert model.items == 1
    stats = admin.stats()
    assert stats["models"]["m"]["coalesced"] == 19
    # and again: served from the cache without reaching the replica
    assert client.predict("a", x).output == pytest.approx(x.sum())
    assert model.items == 1
    assert admin.stats()["apps"]["a"]["cache_hits"] == 1


def test_version_switch_changes_answers_at_once_and_back(setup):
    admin, client, serve = setup
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=5000, models=["m"])
    v1, v2 = Counting(100.0), Counting(200.0)
    serve(v1, version="1", replica_id="v1")
    serve(v2, version="2", replica_id="v2")
    x = [1.0]
    assert client.predict("a", x).output == 101.0
    admin.set_version("m", "2")
    assert client.predict("a", x).output == 201.0
    admin.rollback("m")
    back = client.predict("a", x)
    assert (back.output, back.version) == (101.0, "1")
    assert v1.items == 1 and v2.items == 1  # the rollback was served from v1's entry


def test_errors_and_defaults_are_not_cached(setup):
    admin, client, serve = setup
    # a deadline a busy machine meets: what is cached is under test, not speed
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=5000, default=-1, models=["m"])
    calls = []

    def flaky(xs):
        calls.append(len(xs))
        if len(calls) == 1:
            raise RuntimeError("first call fails")
        return [7.0 for _ in xs]

    pred = client.predict("a", [1.0])  # no replica yet: the default
    assert pred.default
    serve(flaky)
    with pytest.raises(ketch.ModelError):
        client.predict("a", [1.0])
    assert client.predict("a", [1.0]).output == 7.0
    assert client.predict("a", [1.0]).output == 7.0
    assert len(calls) == 2


def test_cache_can_be_switched_off_per_app_and_by_the_model(setup):
    admin, client, serve = setup
    admin.create_app("off", input_type="float64", input_shape=[1], slo_ms=5000, models=["m"], cache=False)
    model = Counting()
    serve(model)
    for _ in range(3):
        client.predict("off", [2.0])
    assert model.items == 3
    admin.configure_app("off", cache=True)
    for _ in range(3):
        client.predict("off", [2.0])
    assert model.items == 4


def test_nondeterministic_model_is_never_cached(setup):
    admin, client, serve = setup
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=5000, models=["m"])
    model = Counting()
    serve(model, deterministic=False)
    for _ in range(3):
        client.predict("a", [2.0])
    assert model.items == 3
    assert admin.stats()["models"]["m"]["deterministic"] is False
