"""The batch controller and the send/wait decision on synthetic latency curves."""

import math
from collections import deque

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ketchd.batching import BatchController, BatchPolicy, _quantile_of, decide


def curve(overhead_ms: float, per_item_ms: float, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda n: overhead_ms + per_item_ms * n + abs(rng.normal(0, noise))


def drive(ctl: BatchController, latency, budget_ms: float, steps: int) -> list[int]:
    sizes = []
    for _ in range(steps):
        n = ctl.size_for(budget_ms)
        sizes.append(n)
        ctl.observe(n, latency(n), budget_ms)
    return sizes


@pytest.mark.parametrize("mode", ["aimd", "model"])
def test_converges_near_the_largest_feasible_size(mode):
    # 2 ms overhead + 0.25 ms per item, 20 ms budget: the largest feasible batch is 72
    ctl = BatchController(BatchPolicy(mode=mode, max_batch=512))
    sizes = drive(ctl, curve(2.0, 0.25, noise=0.05), 20.0, 300)
    tail = sizes[-50:]
    feasible = (20.0 * (0.9 if mode == "model" else 1.0) - 2.0) / 0.25
    assert max(tail) <= 73
    assert np.mean(tail) >= 0.75 * feasible, (mode, np.mean(tail), feasible)


@pytest.mark.parametrize("mode", ["aimd", "model"])
def test_backs_off_when_latency_jumps(mode):
    ctl = BatchController(BatchPolicy(mode=mode, max_batch=512, window=8))
    drive(ctl, curve(1.0, 0.1), 20.0, 200)
    before = ctl.size_for(20.0)
    sizes = drive(ctl, curve(1.0, 1.0), 20.0, 100)  # the model became 10x slower per item
    after = np.mean(sizes[-20:])
    assert after < before / 3
    assert after <= 20  # 1 + 1.0 * n <= 20


@pytest.mark.parametrize("mode", ["aimd", "model", "fixed"])
def test_never_exceeds_max_batch(mode):
    ctl = BatchController(BatchPolicy(mode=mode, max_batch=8))
    sizes = drive(ctl, curve(0.1, 0.001), 1000.0, 100)
    assert max(sizes) <= 8
    assert sizes[-1] == 8


def test_model_never_jumps_past_twice_what_it_has_seen():
    ctl = BatchController(BatchPolicy(mode="model", max_batch=4096))
    ctl.observe(1, 1.0, 100)
    ctl.observe(2, 1.1, 100)
    assert ctl.size_for(1000.0) == 4
    assert ctl.size_for(math.inf) == 4


def test_tight_deadline_sends_small_batches():
    ctl = BatchController(BatchPolicy(mode="model", max_batch=256))
    drive(ctl, curve(2.0, 0.25), 50.0, 200)
    assert ctl.size_for(2.5) == 1  # only the overhead fits: one query at a time
    assert 10 <= ctl.size_for(10.0) <= 30


def test_decide_waits_to_fill_only_while_the_delay_and_deadline_allow():
    ctl = BatchController(BatchPolicy(mode="fixed", max_batch=32, batch_delay_ms=5.0))
    d = decide(ctl, queued=4, earliest_left_ms=100.0, oldest_waited_ms=1.0)
    assert d.send == 0 and d.wait_ms == pytest.approx(4.0)
    d = decide(ctl, queued=4, earliest_left_ms=100.0, oldest_waited_ms=6.0)
    assert d.send == 4  # waited long enough
    d = decide(ctl, queued=32, earliest_left_ms=100.0, oldest_waited_ms=0.0)
    assert d.send == 32  # full: go now
    d = decide(ctl, queued=4, earliest_left_ms=2.0, oldest_waited_ms=0.0, replica_busy_ms=2.0)
    assert d.send == 4  # the replica is busy until the deadline: no time to wait
    ctl.observe(1, 1.0, 100.0)
    ctl.observe(32, 3.0, 100.0)
    d = decide(ctl, queued=4, earliest_left_ms=3.2, oldest_waited_ms=0.0)
    assert d.send == 4  # a full batch would take 3 ms: waiting would miss the deadline
    no_delay = BatchController(BatchPolicy(mode="fixed", max_batch=32))
    assert decide(no_delay, queued=3, earliest_left_ms=100.0, oldest_waited_ms=0.0).send == 3
    assert decide(no_delay, queued=0, earliest_left_ms=100.0, oldest_waited_ms=0.0).send == 0


def test_policy_rejects_nonsense():
    with pytest.raises(ValueError):
        BatchPolicy(mode="magic")
    with pytest.raises(ValueError):
        BatchPolicy(max_batch=0)
    with pytest.raises(ValueError):
        BatchPolicy(batch_delay_ms=-1)


@given(
    st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=64),
    st.floats(0, 1),
)
def test_window_quantile_equals_numpys(values, q):
    assert _quantile_of(deque(values), q) == pytest.approx(float(np.quantile(values, q)), rel=1e-9, abs=1e-9)


def test_one_queued_query_is_sent_at_once_without_a_delay():
    ctl = BatchController(BatchPolicy(mode="model", max_batch=64))
    assert decide(ctl, 1, earliest_left_ms=50.0, oldest_waited_ms=0.0).send == 1
    delayed = BatchController(BatchPolicy(mode="fixed", max_batch=8, batch_delay_ms=2.0))
    assert decide(delayed, 1, earliest_left_ms=50.0, oldest_waited_ms=0.0).send == 0


def test_typical_latency_is_the_median_line_and_shrugs_off_stalls():
    ctl = BatchController(BatchPolicy(mode="model", max_batch=64))
    rng = np.random.default_rng(3)
    for _ in range(20):
        for n in (1, 8, 16, 32):
            stall = 50.0 if rng.random() < 0.1 else 0.0  # one batch in ten stalls
            ctl.observe(n, 2.0 + 0.5 * n + stall, 1000.0)
    assert ctl.typical_ms(32) == pytest.approx(18.0, abs=1.0)
    assert ctl.typical_ms(64) == pytest.approx(34.0, abs=2.0)  # extrapolated along the line
    assert ctl.predict_ms(32) > 30  # the high quantile carries the stalls


def test_a_size_seen_once_in_a_stall_does_not_steepen_the_typical_line():
    """A burst after a quiet spell: batches of one, then new sizes, each seen once, one of
    them in a stall of the machine (700 ms where the model takes 5 ms whatever the size)."""
    ctl = BatchController(BatchPolicy(mode="model", max_batch=64))
    for _ in range(20):
        ctl.observe(1, 5.0, 2000.0)
    for n, ms in ((3, 5.2), (5, 700.0), (7, 5.1), (9, 4.9), (11, 5.0)):
        ctl.observe(n, ms, 2000.0)
    intercept, slope = ctl.typical_line()
    assert intercept == pytest.approx(5.0, abs=0.2) and slope < 0.1
    n, typical, _ = ctl.serving(1000.0)
    assert n == 64 and typical < 12  # the capacity admission counts on: not the stall's


def test_serving_says_nothing_before_two_sizes_and_a_few_batches():
    ctl = BatchController(BatchPolicy(mode="model", max_batch=64))
    assert ctl.serving(100.0) is None and ctl.typical_line() is None
    for _ in range(10):
        ctl.observe(4, 10.0, 100.0)
    assert ctl.serving(100.0) is None  # one size only
    assert ctl.typical_line() == pytest.approx((10.0, 0.0))  # flat: as long as the one size seen
    for _ in range(8):
        ctl.observe(8, 12.0, 100.0)
    # the line through (4, 10 ms) and (8, 12 ms), extrapolated: 64 (the policy's largest) fits 90 ms
    n, typical, high = ctl.serving(100.0)
    assert (n, typical) == (64, pytest.approx(8.0 + 0.5 * 64)) and high >= typical
    assert 36 <= ctl.serving(30.0)[0] <= 38  # 27 ms usable: (27 - 8) / 0.5
