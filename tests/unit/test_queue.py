from dataclasses import dataclass

from ketchd.queue import ModelQueue


@dataclass(eq=False)
class Item:
    deadline: float
    priority: int = 0
    queued: bool = False


def test_earliest_deadline_first():
    q = ModelQueue()
    items = [Item(d) for d in (5.0, 1.0, 3.0, 2.0)]
    for it in items:
        q.push(it)
    assert [it.deadline for it in q.take(10)] == [1.0, 2.0, 3.0, 5.0]
    assert len(q) == 0 and q.pop() is None


def test_priority_breaks_deadline_ties():
    q = ModelQueue()
    low, high = Item(1.0, 0), Item(1.0, 5)
    q.push(low)
    q.push(high)
    assert q.take(2) == [high, low]


def test_discard_removes_in_place_and_keeps_count():
    q = ModelQueue()
    a, b, c = Item(1.0), Item(2.0), Item(3.0)
    for it in (a, b, c):
        q.push(it)
    q.discard(a)
    q.discard(a)  # twice is harmless
    assert len(q) == 2
    assert q.peek() is b
    assert q.take(5) == [b, c]
    assert not any(it.queued for it in (a, b, c))


def test_take_respects_limit():
    q = ModelQueue()
    for d in range(10):
        q.push(Item(float(d)))
    assert len(q.take(3)) == 3 and len(q) == 7
