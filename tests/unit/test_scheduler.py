"""The split of a queue over replicas of different speeds, on synthetic latency models."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ketchd import scheduler
from ketchd.batching import BatchController, BatchPolicy
from ketchd.registry import Batch, Pending, Replica, ReplicaState
from ketchd.scheduler import Speed, split


def replica(name: str, batches: int = 0) -> Replica:
    r = Replica(
        identity=name.encode(),
        replica_id=name,
        model="m",
        version="1",
        input_dtype=0,
        input_shape=(),
        sdk="test",
        pid=1,
        credits=2,
        max_batch=0,
        deterministic=True,
        connected=0.0,
        last_seen=0.0,
        last_sent=0.0,
    )
    r.state = ReplicaState.READY
    r.batches = batches
    return r


def speed(name: str, a: float, b: float, size: int = 64, busy: float = 0.0, batches: int = 0) -> Speed:
    return Speed(replica(name, batches), busy, a, b, size, True)


def shares(pool: list[Speed], queued: int) -> dict[str, int]:
    return {s.replica.replica_id: n for s, n in split(pool, queued)}


def test_an_idle_slow_replica_gets_nothing_while_a_faster_one_is_done_sooner():
    fast, slow = speed("fast", 1.0, 0.05), speed("slow", 10.0, 0.5)
    for pool in ([fast, slow], [slow, fast]):  # join order does not matter
        assert shares(pool, 1) == {"fast": 1}
        assert shares(pool, 100) == {"fast": 100}  # done in ~7 ms, before slow's first


def test_under_a_long_queue_each_takes_a_share_in_proportion_to_its_rate():
    fast, slow = speed("fast", 1.0, 0.05), speed("slow", 10.0, 0.5)
    got = shares([slow, fast], 2000)
    assert sum(got.values()) == 2000
    rate_fast, rate_slow = fast.rate, slow.rate
    # both finish their share at about the same time
    assert fast.offset_ms + got["fast"] / rate_fast == pytest.approx(
        slow.offset_ms + got["slow"] / rate_slow, 0.01
    )
    assert 0 < got["slow"] < got["fast"] / 5


def test_a_busy_fast_replica_keeps_work_an_idle_slow_one_would_finish_later():
    fast = speed("fast", 1.0, 0.05, busy=4.0)  # free again in 4 ms
    slow = speed("slow", 10.0, 0.5)
    assert shares([fast, slow], 20) == {"fast": 20}


def test_ties_go_to_the_replica_with_fewer_batches_not_to_the_first_joined():
    a, b = speed("a", 1.0, 0.05, batches=10), speed("b", 1.0, 0.05, batches=3)
    assert shares([a, b], 1) == {"b": 1} == shares([b, a], 1)
    assert shares([a, b], 2) == {"a": 1, "b": 1}


@given(
    st.lists(
        st.tuples(st.floats(0.01, 50), st.floats(0.0001, 5), st.integers(1, 128), st.floats(0, 100)),
        min_size=1,
        max_size=5,
    ),
    st.integers(1, 5000),
)
def test_shares_are_whole_and_add_up_to_the_queue(specs, queued):
    pool = [speed(f"r{i}", a, b, size, busy) for i, (a, b, size, busy) in enumerate(specs)]
    got = split(pool, queued)
    assert sum(n for _, n in got) == queued and all(n > 0 for _, n in got)


def test_speeds_from_latency_models_unknown_replicas_borrow_the_fastest_line():
    known, fresh = replica("known"), replica("fresh")
    for size in (1, 2, 4, 8, 16, 32) * 4:
        known.controller.observe(size, 2.0 + 0.1 * size, math.inf)
    got = {s.replica.replica_id: s for s in scheduler.speeds([known, fresh], 0.0, 1000.0)}
    a, b = known.controller.typical_line()
    assert (got["known"].intercept_ms, got["known"].per_item_ms) == (a, b)
    assert (got["fresh"].intercept_ms, got["fresh"].per_item_ms) == (a, b)
    assert got["known"].free and got["known"].busy_ms == 0.0


def test_an_overdue_replica_is_left_out_of_the_split_until_it_answers():
    stuck, ok = replica("stuck"), replica("ok")
    for r in (stuck, ok):
        r.controller = BatchController(BatchPolicy())
        for size in (1, 2, 4) * 4:
            r.controller.observe(size, 1.0 + 0.1 * size, math.inf)
    item = Pending(b"c", 1, None, "m", b"", (), 0, 0.0, 10.0)  # type: ignore[arg-type]
    stuck.inflight[1] = Batch(1, stuck, [item], sent=0.0)
    now = 5.0  # the batch has been out for 5 s, predicted ~1 ms
    assert scheduler.overdue(stuck, now)
    assert [s.replica.replica_id for s in scheduler.speeds([stuck, ok], now, 1000.0)] == ["ok"]
    assert {s.replica.replica_id for s in scheduler.speeds([stuck, ok], now, 1000.0, skip_overdue=False)} == {
        "stuck",
        "ok",
    }
