import pytest
from ketchd.registry import Batch, IllegalTransition, Model, Replica, ReplicaState


def replica(**kw) -> Replica:
    base = dict(
        identity=b"x",
        replica_id="r",
        model="m",
        version="1",
        input_dtype=11,
        input_shape=(4,),
        sdk="t",
        pid=1,
        credits=2,
        max_batch=0,
        deterministic=True,
        connected=0.0,
        last_seen=0.0,
        last_sent=0.0,
    )
    return Replica(**{**base, **kw})


def test_replica_lifecycle_follows_the_transition_table():
    r = replica()
    assert r.state is ReplicaState.CONNECTING and r.free_credit == 0
    r.move(ReplicaState.READY)
    assert r.free_credit == 2
    r.inflight = {1: Batch(1, r, [], 0.0)}
    r.refresh_state()
    assert r.state is ReplicaState.READY and r.free_credit == 1
    r.inflight[2] = Batch(2, r, [], 0.0)
    r.refresh_state()
    assert r.state is ReplicaState.BUSY and r.free_credit == 0
    # a batch of one query back from a replica that died: its replica takes nothing else
    r.inflight = {3: Batch(3, r, [], 0.0, alone=True)}
    r.refresh_state()
    assert r.state is ReplicaState.BUSY and r.free_credit == 0
    r.inflight.clear()
    r.refresh_state()
    assert r.state is ReplicaState.READY
    r.move(ReplicaState.DRAINING)
    with pytest.raises(IllegalTransition):
        r.move(ReplicaState.READY)
    r.move(ReplicaState.DEAD)
    with pytest.raises(IllegalTransition):
        r.move(ReplicaState.READY)


def test_set_version_keeps_history_for_rollback():
    m = Model("m")
    m.set_version("1")
    m.set_version("2")
    m.set_version("2")
    assert m.active_version == "2" and m.history == ["1"] and m.known_versions == ["1", "2"]
    doc = Model.from_json(m.to_json())
    assert doc.active_version == "2" and doc.history == ["1"]


def test_latency_histogram_counts_a_bound_in_its_own_bucket():
    from ketchd.stats import LATENCY_BUCKETS_S, Histogram, Histograms

    h = Histogram()
    for s in (0.0, 0.0001, 0.00010001, 10.0, 10.5, 0.003):
        h.observe(s)
    counts = h.to_json()["counts"]
    assert len(counts) == len(LATENCY_BUCKETS_S) + 1
    assert counts[0] == 2  # 0 and the first bound itself (le)
    assert counts[1] == 1  # just over it
    assert counts[LATENCY_BUCKETS_S.index(0.005)] == 1
    assert counts[LATENCY_BUCKETS_S.index(10.0)] == 1 and counts[-1] == 1  # +Inf
    assert h.sum == pytest.approx(20.50320001)
    by = Histograms()
    assert by.get("m", "1") is by.get("m", "1")
    by.get("a", "2").observe(0.5)
    rows = by.to_json(("model", "version"), app="x")
    assert [(r["app"], r["model"], r["version"], sum(r["counts"])) for r in rows] == [
        ("x", "a", "2", 1),
        ("x", "m", "1", 0),
    ]
