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
