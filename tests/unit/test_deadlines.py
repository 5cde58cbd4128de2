"""ketchd.deadlines: never early, at most a millisecond late, earliest first."""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st
from ketchd.deadlines import Deadlines


@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), max_size=200), st.floats(0, 101))
def test_due_is_exactly_what_passed_give_or_take_a_millisecond(deadlines, now):
    d = Deadlines()
    for i, t in enumerate(deadlines):
        d.add(t, (t, i))
    assert len(d) == len(deadlines)
    got = list(d.due(now))
    assert all(t <= now + 1e-9 + 0.001 for t, _ in got)  # not early beyond the millisecond
    assert {i for t, i in got} >= {i for i, t in enumerate(deadlines) if t <= now - 0.001}
    slots = [math.ceil(t * 1000) for t, _ in got]
    assert slots == sorted(slots)  # earliest millisecond first
    rest = list(d.items())
    assert len(rest) + len(got) == len(deadlines) and all(t > now - 0.001 for t, _ in rest)
    if rest:
        assert d.next_due() is not None and d.next_due() >= min(t for t, _ in rest) - 1e-9


def test_an_item_is_never_due_before_its_deadline():
    d = Deadlines()
    d.add(10.0004, "a")
    d.add(10.0005, "b")
    assert list(d.due(10.0003)) == []
    assert d.next_due() == 10.001
    assert list(d.due(10.001)) == ["a", "b"]
    assert d.next_due() is None and len(d) == 0


def test_items_added_while_expiring_are_seen_in_order():
    d = Deadlines()
    order = list(range(50))
    random.Random(1).shuffle(order)
    for k in order:
        d.add(k / 1000, k)
    seen = []
    for k in d.due(0.030):
        seen.append(k)
        if k == 3:
            d.add(0.0205, "late-add")  # within the window still being expired
    assert seen[: seen.index("late-add")] == list(range(22)) and seen[-1] == 30
    assert len(seen) == 32


@given(st.lists(st.tuples(st.floats(0, 10, allow_nan=False), st.booleans()), max_size=200))
def test_discarded_items_never_fall_due(entries):
    d = Deadlines()
    items = [(t, object(), answered) for t, answered in entries]
    for t, item, _ in items:
        d.add(t, item)
    for t, item, answered in items:
        if answered:
            d.discard(t, item)
    kept = [item for _, item, answered in items if not answered]
    assert len(d) == len(kept)
    due = d.next_due()
    if kept:
        assert due == min(math.ceil(t * 1000) for t, _, answered in items if not answered) / 1000
    else:
        assert due is None
    assert {id(x) for x in d.due(11)} == {id(x) for x in kept}


def test_discard_of_an_item_not_held_changes_nothing():
    d = Deadlines()
    d.add(1.0, "a")
    d.discard(2.0, "a")  # not its deadline
    d.discard(1.0, "b")  # not held
    assert list(d.due(1.0)) == ["a"]
