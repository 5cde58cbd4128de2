from dataclasses import dataclass

from ketchd.queue import ModelQueue


@dataclass(eq=False)
class Item:
    deadline: float
    priority: int = 0
    queued: int = 0


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


def test_a_higher_priority_is_served_first_whatever_the_deadlines():
    q = ModelQueue()
    items = [Item(1.0, -100), Item(2.0, 0), Item(9.0, 100), Item(3.0, 0), Item(0.5, -100), Item(8.0, 100)]
    for it in items:
        q.push(it)
    # strict classes, earliest deadline first within each
    assert [(it.priority, it.deadline) for it in q.take(10)] == [
        (100, 8.0), (100, 9.0), (0, 2.0), (0, 3.0), (-100, 0.5), (-100, 1.0)
    ]  # fmt: skip


def test_ahead_counts_the_class_and_the_higher_ones():
    q = ModelQueue()
    assert q.ahead(0) == 0
    for p in (0, 0, 5, -3):
        q.push(Item(1.0, p))
    assert (q.ahead(5), q.ahead(0), q.ahead(-3), q.ahead(-10), q.ahead(9)) == (1, 3, 4, 4, 0)
    one = ModelQueue()
    a, b = Item(1.0, 2), Item(2.0, 2)
    one.push(a)
    one.push(b)
    assert (one.ahead(2), one.ahead(0), one.ahead(3)) == (2, 2, 0)
    one.discard(a)
    assert one.ahead(2) == 1 and one.pop() is b and one.ahead(0) == 0


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


def test_an_entry_taken_out_and_pushed_again_is_taken_once():
    # a query taken out of the queue (a probe, a batch of suspects) and pushed again when
    # its replica dies: the heap entry that discard left must not make it come out twice
    q = ModelQueue()
    a, b, c = Item(1.0), Item(2.0), Item(3.0)
    for it in (a, b, c):
        q.push(it)
    q.discard(b)
    assert q.take_latest() is c
    q.push(b)
    q.push(c)
    assert len(q) == 3
    assert q.take(10) == [a, b, c]
    assert len(q) == 0 and q.pop() is None and q.peek() is None
