"""The broker's collaborators driven directly, without its loop: admission's checks, answers,
cache flights, dispatch and the reply sender (sockets: real ones on 127.0.0.1)."""

from __future__ import annotations

import time

import ketchd.overload
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status
from ketchd.admission import bad_items, check_input
from ketchd.answers import default_answer, output_problem
from ketchd.batching import BatchController
from ketchd.broker import Broker
from ketchd.config import BrokerConfig
from ketchd.registry import App, Batch, Model, Pending, Replica, ReplicaState

F64 = proto.FLOAT64


def _app(**kw) -> App:
    return App(**{"name": "a", "input_dtype": F64, "input_shape": (2,), "slo_ms": 1000.0, **kw})


def _replica(identity: bytes = b"r1", credits: int = 2) -> Replica:
    r = Replica(
        identity=identity,
        replica_id=identity.decode(),
        model="m",
        version="1",
        input_dtype=F64,
        input_shape=(2,),
        sdk="t",
        pid=1,
        credits=credits,
        max_batch=0,
        deterministic=True,
        connected=0.0,
        last_seen=0.0,
        last_sent=0.0,
    )
    r.move(ReplicaState.READY)
    return r


@pytest.fixture
def broker():
    b = Broker(BrokerConfig(state_path=":memory:"))
    b.apps["a"] = _app()
    b.models["m"] = Model("m", active_version="1")
    b.apps["a"].models = ["m"]
    yield b


def _pending(b: Broker, rid: int, x: list[float], client: bytes = b"c") -> Pending:
    now = time.monotonic()
    payload = np.asarray(x, dtype="<f8").tobytes()
    b.outstanding[client] = b.outstanding.get(client, 0) + 1
    return Pending(client, rid, b.apps["a"], "m", payload, (2,), F64, now, now + 10)


def _answers(b: Broker, client: bytes = b"c") -> dict[int, proto.ReplyFields]:
    return {item.request_id: item for item, _ in b.replies.out.get(client, [])}


# ---------------------------------------------------------------- admission


def test_check_input_names_what_is_wrong_with_a_message():
    app = _app(input_shape=(-1, 3))
    assert check_input(app, F64, (5, 3)) == ""
    assert "takes float64 inputs of shape (any, 3), got int64 of shape (5, 3)" in check_input(
        app, proto.INT64, (5, 3)
    )
    assert "got float64 of shape (5,)" in check_input(app, F64, (5,))
    assert check_input(_app(input_shape=(-1,)), F64, (-2,)) == "shape (any,) has a negative dimension"


def test_bad_items_fail_alone():
    app = _app(finite_only=True)
    good, nan, short = (np.asarray(v, "<f8").tobytes() for v in ([1, 2], [1, np.nan], [1]))
    frames = [zmq.Frame(good), zmq.Frame(nan), zmq.Frame(short)]
    bad = bad_items(app, F64, (2,), frames)
    assert set(bad) == {1, 2}
    assert "NaN or infinity" in bad[1] and "payload of 8 bytes, shape (2,) needs 16" in bad[2]
    assert bad_items(_app(), F64, (2,), frames[:2]) == {}  # NaN is fine unless the app says finite only


# ---------------------------------------------------------------- answers


def test_admission_counts_the_work_still_in_flight(broker):
    model = broker.models["m"]
    replica = model.replicas[b"r1"] = _replica()
    for size in (1, 10) * 8:  # a batch of n takes 10 + n ms, typically
        replica.controller.observe(size, 10.0 + size, 1000.0)
    now = time.monotonic()
    deadline = now + 0.5  # 450 ms usable: batches of 64 (74 ms), ~0.86 queries a ms
    idle = broker.overload.admissible(model, now, deadline, 0)
    assert 300 < idle < 400
    # two batches of 64 sent just now, the second to start when the first ends: all of
    # their 128 queries are still ahead of a new one
    for batch_id in (1, 2):
        items = [_pending(broker, 64 * batch_id + i, [0.0, 0.0]) for i in range(64)]
        replica.inflight[batch_id] = Batch(batch_id, replica, items, now)
    assert ketchd.overload.in_flight(model, now) == pytest.approx(128)
    assert idle - 129 <= broker.overload.admissible(model, now, deadline, 0) <= idle - 127
    # 111 ms on: the first is done, the second half done
    later = now + 0.111
    assert ketchd.overload.in_flight(model, later) == pytest.approx(32, abs=0.5)
    # 200 ms on: both done (by their typical latency), nothing counts
    assert ketchd.overload.in_flight(model, now + 0.2) == 0


def test_admission_scales_its_estimate_by_the_rate_the_head_moves_under_backlog(broker):
    overload, model = broker.overload, broker.models["m"]
    replica = model.replicas[b"r1"] = _replica()
    for size in (1, 10) * 8:  # a batch of n takes 10 + n ms, typically
        replica.controller.observe(size, 10.0 + size, 1000.0)
    now = time.monotonic()
    model.latest_deadline = now + 0.5
    estimate, _ = ketchd.overload.estimate(model, 500)
    assert overload.capacity(model, now, 500)[0] == estimate
    depth = replica.controller.policy.max_batch

    # a queue shorter than a full batch is a replica keeping up: no span, nothing learnt
    for i in range(depth - 1):
        model.queue.push(_pending(broker, i, [0.0, 0.0]))
    overload.backlog(model, now)
    model.batched_items += 10
    overload.backlog(model, now + 0.3)
    assert model.backlog_since == 0 and model.capacity_factor == 1.0

    # a full batch queued for 250 ms, in which the head moved at 40% of the estimate (what
    # a slow replica took from the tail does not count): smoothed from 1
    model.queue.push(_pending(broker, depth, [0.0, 0.0]))
    t = now + 1.0
    model.latest_deadline = t + 0.5
    overload.backlog(model, t)
    assert model.backlog_since == t
    full = overload.admissible(model, t, t + 0.5, 0)
    model.batched_items += int(0.4 * estimate * 250) + 500
    model.tail_sent += 500
    overload.backlog(model, t + 0.25)
    assert model.capacity_factor == pytest.approx(1 - 0.3 * 0.6, abs=0.01)
    for k in range(1, 10):  # the same, span after span
        model.batched_items += int(0.4 * estimate * 250)
        model.latest_deadline = t + 0.25 * k + 0.5
        overload.backlog(model, t + 0.25 * (k + 1))
    assert model.capacity_factor == pytest.approx(0.4, abs=0.02)
    end = t + 2.5
    assert overload.capacity(model, end, 500)[0] == pytest.approx(model.capacity_factor * estimate, rel=0.01)
    assert overload.admissible(model, end, end + 0.5, 0) < 0.5 * full
    # the head's rate strayed (from 1 to 0.4): the queue ahead may take less of the time left
    assert overload.safety(model, end) < ketchd.overload.SAFETY - 0.05

    # a span at three times the estimate: never above it
    for k in range(20):
        model.batched_items += int(3 * estimate * 250)
        model.latest_deadline = end + 0.25 * k + 0.5
        overload.backlog(model, end + 0.25 * (k + 1))
    assert model.capacity_factor == pytest.approx(1.0, abs=0.01)
    assert overload.safety(model, end + 5.0) == pytest.approx(ketchd.overload.SAFETY, abs=0.01)  # steady

    # a span in which nothing was sent (the replica gone quiet) teaches nothing; the queue
    # running low ends a span
    end += 5.0
    model.capacity_factor = 0.5
    overload.backlog(model, end + 0.25)
    assert model.capacity_factor == 0.5
    while len(model.queue):
        model.queue.pop()
    overload.backlog(model, end + 0.3)
    assert model.backlog_since == 0

    # a share not measured again within FACTOR_FOR_S lapses
    later = end + ketchd.overload.FACTOR_FOR_S + 1
    model.latest_deadline = later + 0.5
    assert overload.capacity(model, later, 500)[0] == estimate


def test_admission_measure_holds_at_the_extremes(broker):
    """The longest SLO an app may have (1 h), a count of queries sent far past any rate, and
    a replica that announces a batch larger than the broker allows: the share stays in its
    bounds and admission within the queue's."""
    overload, model = broker.overload, broker.models["m"]
    replica = model.replicas[b"r1"] = _replica()
    replica.controller.policy = model.policy(64, replica_max=2**31 - 1)  # a peer that lies
    for size in (1, 10) * 8:
        replica.controller.observe(size, 10.0 + size, 1000.0)
    for i in range(200):
        model.queue.push(_pending(broker, i, [0.0, 0.0]))
    now = time.monotonic()
    model.latest_deadline = now + 3_600.0
    overload.backlog(model, now)
    assert model.backlog_since == now and model.backlog_depth == 64
    model.batched_items += 10**15
    overload.backlog(model, now + 0.25)
    assert model.capacity_factor == 1.0 and model.capacity_spread == 0.0
    assert 0 < overload.admissible(model, now + 0.25, now + 3_600.0, 0) <= broker.config.max_queue - 200
    assert ketchd.overload.SAFETY_FLOOR <= overload.safety(model, now + 0.25) <= ketchd.overload.SAFETY


def test_output_problem_and_default_answer():
    assert output_problem(F64, (2,), 16) == ""
    assert output_problem(F64, (2,), 8) == "8 bytes do not fit float64 of shape (2,) (16 bytes)"
    assert output_problem(99, (), 0) == "unknown dtype 99"
    assert "negative dimension" in output_problem(F64, (-1,), 0)
    item, payload = default_answer(_app(), 5, "deadline", 2.0, ErrorCode.DEADLINE, [], ["m"], 0.0)
    assert item.status == Status.ERROR and item.error == ErrorCode.DEADLINE and payload == b""
    item, payload = default_answer(
        _app(default=[0], has_default=True), 5, "late", 2.0, ErrorCode.DEADLINE, [], [], 0.0
    )
    assert item.status == Status.DEFAULT and item.message == "late" and payload == b"[0]"


def test_a_plain_batch_is_answered_in_bulk_and_any_other_item_alone(broker):
    replica = _replica()
    items = [_pending(broker, rid, [rid, 0]) for rid in (1, 2, 3)]
    items[2].parent = None
    items[2].request_id = 0  # no id to put in a template: answered the per-item way
    payloads = [np.zeros(2).tobytes(), np.zeros(2).tobytes(), np.zeros(2).tobytes()]
    broker.answers.answer_plain(replica, items, (True, F64, (2,), 0, ""), payloads)
    values, sent = broker.replies.plain_out[(b"c", ("m", "1", F64, (2,)))]
    assert values[0::2] == [1, 2] and all(v >= 1 for v in values[1::2]) and len(sent) == 2
    assert _answers(broker)[0].status == Status.OK and all(p.done for p in items)
    assert b"c" not in broker.outstanding


# ---------------------------------------------------------------- flights


def test_identical_queries_share_one_computation_and_its_cache_entry(broker):
    model = broker.models["m"]
    flights = broker.flights
    leader, follower, other = (
        _pending(broker, 1, [1, 2]),
        _pending(broker, 2, [1, 2]),
        _pending(broker, 3, [3, 4]),
    )
    assert not flights.from_cache_or_flight(leader, model)  # computes
    assert flights.from_cache_or_flight(follower, model)  # waits on the leader
    assert not flights.from_cache_or_flight(other, model)  # another input
    assert leader.followers == [follower] and model.coalesced == 1
    out = np.asarray([9.0]).tobytes()
    broker.answers.answer_output(leader, _replica(), F64, (1,), out)
    answered = _answers(broker)
    assert {1, 2} <= set(answered) and answered[2].model_version == "1"
    again = _pending(broker, 4, [1, 2])
    assert flights.from_cache_or_flight(again, model)  # from the cache, at once
    assert _answers(broker)[4].status == Status.OK and model.cache_hits == 1


def test_a_model_error_is_shared_and_a_leader_without_answer_hands_over(broker):
    model = broker.models["m"]
    flights = broker.flights
    leader, follower = _pending(broker, 1, [1, 2]), _pending(broker, 2, [1, 2])
    flights.from_cache_or_flight(leader, model)
    flights.from_cache_or_flight(follower, model)
    broker.answers.answer_error(leader, ErrorCode.MODEL_ERROR, "boom")
    assert {i.request_id: i.message for i in _answers(broker).values()} == {1: "boom", 2: "boom"}
    leader, f1, f2 = (_pending(broker, r, [5, 6]) for r in (10, 11, 12))
    for p in (leader, f1, f2):
        flights.from_cache_or_flight(p, model)
    broker.answers.answer_default(leader, "deadline: too slow")  # no prediction: f1 takes over
    assert f1.cache_key is not None and f1.followers == [f2] and f1.queued and len(model.queue) == 1


# ---------------------------------------------------------------- dispatch and the reply sender


def _router_and_dealer(identity: bytes) -> tuple[zmq.Socket, zmq.Socket]:
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.linger = dealer.linger = 0
    dealer.setsockopt(zmq.IDENTITY, identity)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hi")
    assert router.poll(5000) and router.recv_multipart()[0] == identity
    return router, dealer


def test_dispatch_sends_a_batch_rendered_from_its_template(broker):
    router, dealer = _router_and_dealer(b"r1")
    try:
        broker.backend = router
        model, replica = broker.models["m"], _replica()
        model.batching = "fixed"  # up to max_batch at once: the three queued go together
        replica.controller = BatchController(model.policy(64))
        model.replicas[replica.identity] = replica
        items = [_pending(broker, rid, [rid, rid]) for rid in (1, 2, 3)]
        for p in items:
            model.queue.push(p)
        broker.dispatcher.mark_dirty(model)
        broker.dispatcher.dispatch(time.monotonic())
        assert dealer.poll(5000)
        frames = dealer.recv_multipart()
        request = proto.read_predict_request(proto.decode(frames[0])[2])
        assert request.shapes == (2, 2, 2) and len(request.budgets_us) == 3 and request.model == "m"
        assert [np.frombuffer(f, "<f8")[0] for f in frames[1:]] == [1, 2, 3]
        assert broker.batches[request.batch_id].items == items and replica.inflight and not len(model.queue)
        assert all(p.replica is replica for p in items)
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


def test_the_reply_sender_flushes_each_clients_answers(broker):
    router, dealer = _router_and_dealer(b"c")
    try:
        broker.frontend = router
        replica = _replica()
        items = [_pending(broker, rid, [0, 0]) for rid in range(1, 4)]
        broker.answers.answer_plain(replica, items, (True, F64, (2,), 0, ""), [np.ones(2).tobytes()] * 3)
        broker.replies.reply(
            b"c", proto.ReplyFields(9, Status.ERROR, error=ErrorCode.BAD_INPUT, message="no"), b""
        )
        broker.replies.flush()
        got = []
        while dealer.poll(1000):
            frames = dealer.recv_multipart()
            got += [(i.request_id, i.status) for i in proto.read_reply(proto.decode(frames[0])[2])]
        assert sorted(got) == [(1, Status.OK), (2, Status.OK), (3, Status.OK), (9, Status.ERROR)]
        assert not broker.replies.plain_out and not broker.replies.out
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


# ---------------------------------------------------------------- pinned versions


def test_a_pinned_query_goes_to_its_versions_replica_and_no_other(broker):
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealers = {}
    try:
        broker.backend = router
        model = broker.models["m"]
        model.known_versions = ["1", "2"]
        for identity, version in ((b"r1", "1"), (b"r2", "2")):
            dealer = dealers[identity] = ctx.socket(zmq.DEALER)
            dealer.linger = 0
            dealer.setsockopt(zmq.IDENTITY, identity)
            dealer.connect(f"tcp://127.0.0.1:{port}")
            dealer.send(b"hi")
            assert router.poll(5000) and router.recv_multipart()[0] == identity
            replica = _replica(identity)
            replica.version = version
            model.replicas[identity] = replica
        x = zmq.Frame(np.ones(2).tobytes())
        admit = broker.admission.admit
        admit(b"c", "a", F64, (2,), 0, 0, "", "2", [1], [x])  # pinned to 2, which is not active
        admit(b"c", "a", F64, (2,), 0, 0, "", "", [2], [x])  # the selection: the active version, 1
        admit(b"c", "a", F64, (2,), 0, 0, "", "9", [3], [x])  # no such version
        assert len(model.lanes["2"].queue) == 1 and len(model.queue) == 1
        broker.dispatcher.dispatch(time.monotonic())
        for identity, rid, version in ((b"r2", 1, "2"), (b"r1", 2, "1")):
            assert dealers[identity].poll(5000)
            request = proto.read_predict_request(proto.decode(dealers[identity].recv_multipart()[0])[2])
            (batch,) = model.replicas[identity].inflight.values()
            assert request.model_version == version and [p.request_id for p in batch.items] == [rid]
            assert not dealers[identity].poll(100)  # one batch each: the other's query never came here
        answers = _answers(broker)
        assert answers[3].error == ErrorCode.NOT_FOUND and "no version '9'" in answers[3].message
        assert set(answers) == {3}
    finally:
        router.close(linger=0)
        for dealer in dealers.values():
            dealer.close(linger=0)


def test_a_plain_version_for_an_app_of_several_models_is_refused(broker):
    broker.models["n"] = Model("n", active_version="3", known_versions=["3"])
    broker.models["m"].known_versions = ["1"]
    broker.apps["a"].models = ["m", "n"]
    x = zmq.Frame(np.ones(2).tobytes())
    for rid, version in ((1, "1"), (2, "n:3"), (3, "nope:1"), (4, "m:2")):
        broker.admission.admit(b"c", "a", F64, (2,), 0, 0, "", version, [rid], [x])
    answers = _answers(broker)
    assert answers[1].error == ErrorCode.INVALID and "MODEL:VERSION" in answers[1].message
    assert 2 not in answers and len(broker.models["n"].lanes["3"].queue) == 1  # queued in n's lane 3
    assert answers[3].error == answers[4].error == ErrorCode.NOT_FOUND
