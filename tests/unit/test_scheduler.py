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


# pools of up to five replicas: (ms per batch, ms per query, batch size, ms busy) each
POOLS = st.lists(
    st.tuples(st.floats(0.01, 50), st.floats(0.0001, 5), st.integers(1, 128), st.floats(0, 100)),
    min_size=1,
    max_size=5,
)


def shares(pool: list[Speed], queued: int, arrival_rate: float = 0.0) -> dict[str, int]:
    return {s.replica.replica_id: n for s, n in split(pool, queued, arrival_rate)}


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


@given(POOLS, st.integers(1, 5000))
def test_shares_are_whole_and_add_up_to_the_queue(specs, queued):
    pool = [speed(f"r{i}", a, b, size, busy) for i, (a, b, size, busy) in enumerate(specs)]
    got = split(pool, queued)
    assert sum(n for _, n in got) == queued and all(n > 0 for _, n in got)


def test_a_slow_replica_the_pool_needs_to_keep_up_gets_work_even_from_a_short_queue():
    # 2 + 0.1 ms/query at 64: 7.6 queries/ms; 20 + 1 ms/query: 0.76 queries/ms
    fast, slow = speed("fast", 2.0, 0.1), speed("slow", 20.0, 1.0)
    for pool in ([fast, slow], [slow, fast]):
        assert shares(pool, 100) == {"fast": 100}  # the queue alone: fast is done sooner
        assert shares(pool, 10, 3.0) == {"fast": 10}  # fast keeps up alone
        # more arrives than fast serves: slow takes a share, the larger the longer the queue
        some = shares(pool, 100, 8.0)
        assert sum(some.values()) == 100 and some["slow"] > 0
        assert shares(pool, 1000, 8.0)["slow"] > some["slow"]
        # more than both serve: each takes the batch it would use
        assert shares(pool, 300, 20.0) == {"fast": 64, "slow": 64}


@given(POOLS, st.integers(1, 5000), st.floats(0, 100))
def test_with_arrivals_shares_are_whole_and_never_more_than_the_queue(specs, queued, rate):
    pool = [speed(f"r{i}", a, b, size, busy) for i, (a, b, size, busy) in enumerate(specs)]
    got = split(pool, queued, rate)
    assert 0 < sum(n for _, n in got) <= queued and all(n > 0 for _, n in got)


def test_a_slow_replica_takes_the_freshest_queries_it_finishes_in_time():
    from ketchd.dispatch import tail_batch
    from ketchd.queue import ModelQueue

    slow = replica("slow")
    for size in (1, 2, 4, 8, 16, 32) * 4:
        slow.controller.observe(size, 20.0 + 1.0 * size, math.inf)
    queue = ModelQueue()
    now = 100.0
    # time left: 10, 20, ..., 1000 ms (the head has least); safety 0.9
    items = [Pending(b"c", i, None, "m", b"", (), 0, now, now + (i + 1) / 100) for i in range(100)]  # type: ignore[arg-type]
    for p in items:
        queue.push(p)
    batch = tail_batch(queue, slow.controller, 0.0, now, 64)
    # a batch of n takes 20 + n ms: the n freshest have >= (1000 - 10 (n - 1)) * 0.9 ms
    assert [p.request_id for p in batch] == list(range(99, 35, -1))  # 64 of them, all in time
    assert len(queue) == 36 and queue.peek() is items[0]
    busy = tail_batch(queue, slow.controller, 200.0, now, 64)  # busy for 200 ms first
    # n queries done at 220 + n ms; the nth freshest left has (360 - 10 (n - 1)) * 0.9: 11 fit
    assert [p.request_id for p in busy] == list(range(35, 24, -1))
    assert len(queue) == 25


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


def test_suspects_sent_back_together_go_in_batches_the_replica_takes_each_once():
    from ketchd.dispatch import Dispatcher
    from ketchd.registry import Model

    model = Model("m")
    now = 100.0
    group = [Pending(b"c", i, None, "m", b"", (), 0, now, now + 1.0) for i in range(10)]  # type: ignore[arg-type]
    for p in group:
        p.requeued, p.suspects = True, group
        model.queue.push(p)
    other = Pending(b"c", 99, None, "m", b"", (), 0, now, now + 0.5)  # type: ignore[arg-type]
    model.queue.push(other)
    first = Dispatcher.isolate(model, [model.queue.pop(), model.queue.pop()], limit=4)  # other, group[0]
    assert first == group[:4] and len(model.queue) == 7 and model.queue.peek() is other
    for p in first:
        p.replica = replica("r")  # in flight
    model.queue.discard(group[5])  # taken for a batch: its fellows not in flight come with it
    again = Dispatcher.isolate(model, [group[5]], limit=4)
    assert again == [group[4], group[5], group[6], group[7]] and len(model.queue) == 3
    assert model.queue.take(5) == [other, group[8], group[9]]
