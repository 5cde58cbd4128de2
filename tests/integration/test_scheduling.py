"""Scheduling through a real broker loop: pools of replicas of different speeds, priority
classes, admission of what fits, refusal of what cannot finish in time."""

from __future__ import annotations

import threading
import time

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(90)


def sleeper(per_batch_s: float, per_item_s: float = 0.0):
    def predict(xs):
        time.sleep(per_batch_s + per_item_s * len(xs))
        return [float(x.sum()) for x in xs]

    return predict


@pytest.fixture
def env(make_thread_broker, replica_threads):
    thread_broker = make_thread_broker(heartbeat_ms=100, dead_after_ms=10_000)
    admin = ketch.Admin(thread_broker.admin)
    client = ketch.Client(thread_broker.frontend)

    def serve(model, replica_id, name="m"):
        replica_threads(model, backend=thread_broker.backend, name=name, replica_id=replica_id)
        wait_for(lambda: replica_id in {r["replica_id"] for r in admin.replicas(name)}, 10, replica_id)

    def items() -> dict[str, int]:
        return {r["replica_id"]: r["items"] for r in admin.replicas("m")}

    yield thread_broker, admin, client, serve, items
    client.close()
    admin.close()


def raw_socket(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(address)
    return sock


def recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no message in time"
    return sock.recv_multipart()


def answers(sock: zmq.Socket, n: int, timeout_ms: int = 10_000) -> list[tuple[float, dict]]:
    """``n`` reply items as (time received, item), in the order they came."""
    out = []
    while len(out) < n:
        frames = recv(sock, timeout_ms)
        now = time.monotonic()
        out += [(now, item) for item in proto.to_dict(frames[0])["body"]["items"]]
    return out


# ---------------------------------------------------------------- pools of mixed speeds


@pytest.mark.parametrize("order", [("slow", "fast"), ("fast", "slow")])
def test_idle_replicas_do_not_tie_to_the_first_joined_the_faster_takes_the_query(env, order):
    _, admin, client, serve, items = env
    admin.create_app("a", input_type="float64", input_shape=[2], slo_ms=2000, models=["m"], cache=False)
    models = {"fast": sleeper(0.001), "slow": sleeper(0.200)}
    for rid in order:
        serve(models[rid], rid)
    client.predict_many("a", [[float(i), 1.0] for i in range(200)], window=100)  # both measured
    before = items()
    for i in range(40):  # one at a time: every query finds both replicas idle
        assert client.predict("a", [float(i), 1.0]).output == float(i) + 1.0
    after = items()
    taken = {rid: after[rid] - before[rid] for rid in after}
    assert taken["slow"] <= 2 and taken["fast"] >= 38, taken


@pytest.mark.parametrize("order", [("slow", "fast"), ("fast", "slow")])
def test_a_slow_replica_never_costs_a_default_that_a_faster_one_can_avoid(env, order):
    """An SLO the fast replica meets and the slow one never can: the slow one gets no
    work but a probe now and then (rather than batches, all of whose queries would get
    the default)."""
    _, admin, client, serve, items = env
    # (an SLO of 1.5 s, 500x the fast one's batch: a busy machine's stall of a second costs
    # no default; the slow one's 3 s never meets it)
    admin.create_app(
        "a", input_type="float64", input_shape=[2], slo_ms=1500, default=-1.0, models=["m"], cache=False
    )
    models = {"fast": sleeper(0.002, 0.0001), "slow": sleeper(3.0)}
    for rid in order:
        serve(models[rid], rid)
    rng = np.random.default_rng()
    warm = [rng.normal(size=2) for _ in range(300)]
    client.predict_many("a", warm, window=16)  # the slow one learns its latency here (a default or so)
    before = items()
    xs = [rng.normal(size=2) for _ in range(600)]
    start = time.monotonic()
    preds = client.predict_many("a", xs, window=16)
    after, took_s = items(), time.monotonic() - start
    # the slow one is sent nothing but a probe now and then (one query, about once a second
    # while it has had few batches): only those miss
    probes = after["slow"] - before["slow"]
    defaults = [p for p in preds if p.default]
    assert probes <= 2 + took_s and len(defaults) <= probes, (before, after, took_s, defaults[:3])
    answered = [(x, p) for x, p in zip(xs, preds, strict=True) if not p.default]
    assert [p.output for _, p in answered] == pytest.approx([float(x.sum()) for x, _ in answered])


@pytest.mark.parametrize("order", [("slow", "fast"), ("fast", "slow")])
def test_under_a_burst_each_replica_takes_a_share_and_every_query_is_answered(env, order):
    _, admin, client, serve, items = env
    admin.create_app(
        "a", input_type="float64", input_shape=[2], slo_ms=2000, default=-1.0, models=["m"], cache=False
    )
    # 20x apart, both by sleeping (not by CPU, which a busy machine takes from the test's
    # own process: only a replica that computes would slow)
    models = {"fast": sleeper(0.005, 0.0002), "slow": sleeper(0.100, 0.005)}
    for rid in order:
        serve(models[rid], rid)
    rng = np.random.default_rng()
    client.predict_many("a", [rng.normal(size=2) for _ in range(300)], window=300)
    before = items()
    xs = [rng.normal(size=2) for _ in range(2000)]
    preds = client.predict_many("a", xs, window=1000)
    after = items()
    assert not [p for p in preds if p.default]
    assert [p.output for p in preds] == pytest.approx([float(x.sum()) for x in xs])
    taken = {rid: after[rid] - before[rid] for rid in after}
    assert taken["fast"] > 3 * taken["slow"], taken  # the slow one is 20x slower: a small share


@pytest.mark.parametrize("order", [("slow", "fast"), ("fast", "slow")])
def test_a_slow_replica_takes_full_batches_from_a_queue_whose_head_it_cannot_finish_in_time(env, order):
    """A queue kept deeper than the fast replica drains in the SLO: the queries at its head
    have less time left than the slow replica needs for a full batch, those at its tail
    more. The slow one takes from the tail, in batches sized by the most time left (full
    ones), not from the head in batches sized by the least, and every query is answered in
    time (admission refuses none: the pool's capacity counts the slow one's full batches)."""
    _, admin, client, serve, _ = env
    admin.create_app(
        "a", input_type="float64", input_shape=[2], slo_ms=1500, default=-1.0, models=["m"], cache=False
    )
    taken: list[tuple[str, list[int]]] = []  # (replica, the queries of a batch), as they start

    def sleeper_noting(rid: str, per_batch_s: float, per_item_s: float):
        def predict(xs):
            taken.append((rid, [int(x[0]) for x in xs]))
            time.sleep(per_batch_s + per_item_s * len(xs))
            return [float(x.sum()) for x in xs]

        return predict

    # a full batch (64) takes the fast one 15 ms, the slow one 10x that (by sleeping: a
    # busy machine does not change it)
    models = {"fast": sleeper_noting("fast", 0.002, 0.0002), "slow": sleeper_noting("slow", 0.020, 0.002)}
    for rid in order:
        serve(models[rid], rid)
    # both measured, the slow one up to full batches (its controller grows them by doubling)
    # (before it is measured, admission may refuse part of the warm-up: not asserted)
    client.predict_many("a", [[-1.0, 0.0]] * 3000, window=2500, return_exceptions=True)
    taken.clear()
    # 4,000 queries, 2,500 outstanding: the queue holds ~0.6 s of the fast one's work
    xs = [[float(i), 1.0] for i in range(4000)]
    preds = client.predict_many("a", xs, window=2500)
    assert not [p for p in preds if p.default], [p.default_explanation for p in preds if p.default][:3]
    assert [p.output for p in preds] == [i + 1.0 for i in range(4000)]
    slow = [(at, b) for at, (rid, b) in enumerate(taken) if rid == "slow" and len(b) > 1]  # (a probe aside)
    assert slow, taken
    sizes = [len(b) for _, b in slow]
    assert sum(n >= 48 for n in sizes) >= len(sizes) // 2, sizes  # full batches


# ---------------------------------------------------------------- priority


def hello(sock: zmq.Socket, credits: int = 1) -> None:
    sock.send(
        proto.encode(
            "Hello",
            {
                "model": "m",
                "model_version": "1",
                "input": {"dtype": "FLOAT64", "shape": [1]},
                "sdk": "test",
                "replica_id": "held",
                "credits": credits,
            },
        )
    )
    assert proto.to_dict(recv(sock)[0])["type"] == "Welcome"


def take_batch(sock: zmq.Socket) -> tuple[int, list[float]]:
    """The next PredictRequest: its batch id and its inputs (heartbeats skipped)."""
    while True:
        frames = recv(sock)
        _, name, body = proto.decode(frames[0])
        if name == "PredictRequest":
            return body.BatchId(), [float(np.frombuffer(f, np.float64)[0]) for f in frames[1:]]


def answer_batch(sock: zmq.Socket, batch_id: int, n: int) -> None:
    reply = proto.build_predict_reply(batch_id, 10, [(0, proto.FLOAT64, (), 0, "")] * n)
    sock.send_multipart([reply, *([np.float64(0).tobytes()] * n)])


def test_a_higher_priority_is_served_before_lower_ones_whatever_the_deadlines(env):
    tb, admin, _, _, _ = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=20_000, models=["m"], cache=False)
    admin.configure_model("m", max_batch=1, create=True)
    replica, client = raw_socket(tb.backend), raw_socket(tb.frontend)
    try:
        hello(replica)
        wait_for(lambda: admin.replicas("m"), 5, "replica")

        def query(rid: int, x: float, priority: int, timeout_us: int = 0) -> None:
            header = proto.build_query("a", proto.FLOAT64, [1], [rid], timeout_us, priority)
            client.send_multipart([header, np.float64(x).tobytes()])

        query(1, 1.0, 0)
        first, xs = take_batch(replica)  # the replica holds it: the rest queue
        assert xs == [1.0]
        query(2, 2.0, -100, timeout_us=5_000_000)  # the earliest deadlines, the lowest class
        query(3, 3.0, -100, timeout_us=6_000_000)
        query(4, 4.0, 0)
        query(5, 5.0, 100)  # the latest deadline, the highest class
        query(6, 6.0, 0, timeout_us=4_000_000)
        wait_for(lambda: admin.stats()["models"]["m"]["queue_depth"] == 5, 5, "five queued")
        answer_batch(replica, first, 1)
        served = []
        for _ in range(5):
            batch, xs = take_batch(replica)
            served += xs
            answer_batch(replica, batch, len(xs))
        assert served == [5.0, 6.0, 4.0, 2.0, 3.0]
        assert {i["request_id"] for _, i in answers(client, 6)} == set(range(1, 7))
    finally:
        replica.close()
        client.close()


# ---------------------------------------------------------------- admission


def test_a_message_larger_than_the_room_left_is_admitted_in_part(env):
    tb, admin, _, serve, _ = env
    admin.create_app(
        "a", input_type="float64", input_shape=[1], slo_ms=2000, default=-1.0, models=["m"], cache=False
    )
    admin.configure_model("m", max_queue=5, create=True)
    sock = raw_socket(tb.frontend)
    try:
        ids = list(range(1, 7))
        payloads = [np.float64(i).tobytes() for i in ids]
        sock.send_multipart([proto.build_query("a", proto.FLOAT64, [1], ids), *payloads])
        got = {i["request_id"]: i for _, i in answers(sock, 6)}
        refused = [rid for rid, i in got.items() if i["status"] == "ERROR"]
        assert refused == [6] and got[6]["error"] == "OVERLOADED" and got[6]["retry_after_ms"] > 0
        assert "queue of model 'm' is full" in got[6]["message"]
        assert all(got[rid]["status"] == "DEFAULT" for rid in range(1, 6))  # no replica: at the deadline
        serve(sleeper(0.001), "r")
        sock.send_multipart([proto.build_query("a", proto.FLOAT64, [1], [7, 8]), *payloads[:2]])
        assert all(i["status"] == "OK" for _, i in answers(sock, 2))
    finally:
        sock.close()
    assert admin.stats()["models"]["m"]["refused"] == 1


def test_what_cannot_finish_in_time_is_refused_at_once_and_the_rest_served(env):
    tb, admin, client, serve, _ = env
    admin.create_app(
        "a", input_type="float64", input_shape=[1], slo_ms=1000, default=-1.0, models=["m"], cache=False
    )
    # a batch of n takes 20 + 2n ms: ~400 queries a second at most. (An SLO of 1 s, not less: a
    # busy machine's stall of a few hundred ms would make late all the queries admitted.)
    serve(sleeper(0.020, 0.002), "r")
    # its latency model learns (a stall of the machine in these first batches can make it
    # refuse a few, wrongly: see docs/architecture.md, "Admission by capacity")
    client.predict_many("a", [[float(i)] for i in range(400)], window=16, return_exceptions=True)
    sock = raw_socket(tb.frontend)
    try:
        n, chunk = 1200, 50
        for at in range(0, n, chunk):
            ids = list(range(at + 1, at + chunk + 1))
            sock.send_multipart(
                [proto.build_query("a", proto.FLOAT64, [1], ids), *[np.float64(i).tobytes() for i in ids]]
            )
        got = answers(sock, n)
    finally:
        sock.close()
    by_status: dict[str, list[tuple[float, dict]]] = {}
    for t, item in got:
        by_status.setdefault(item["status"], []).append((t, item))
    refused = by_status.get("ERROR", [])
    served, defaults = by_status.get("OK", []), by_status.get("DEFAULT", [])
    counts = {status: len(items) for status, items in by_status.items()}
    assert refused and all(i["error"] == "OVERLOADED" and i["retry_after_ms"] > 0 for _, i in refused)
    assert "cannot answer it in time" in refused[0][1]["message"]
    # refused at once: every refusal came before the first query that waited to its deadline
    assert not defaults or max(t for t, _ in refused) < min(t for t, _ in defaults)
    # the overload became refusals, not defaults: without admission by capacity all the
    # queries the model could not take would wait to their deadline. (How many of those admitted
    # are served in time depends on the machine: admission goes by the replica's typical
    # latency, and a loaded machine's stalls make some of the admitted late: on a quiet one
    # 0-30 defaults to ~800 refusals, under heavy load up to ~200.)
    assert served and len(defaults) * 2 < len(refused), (counts, admin.replicas("m"))
    assert len(served) + len(defaults) < n / 2  # far more was offered than the model could take
    # the flood answered, service is back to normal (the replica may first finish a batch
    # whose queries were given their default): nothing refused for work no longer queued
    wait_for(lambda: not client.predict("a", [0.0]).default, 5, "a prediction after the flood")
    after = [client.predict("a", [float(i)]) for i in range(20)]
    assert [(p.default, p.output) for p in after] == [(False, float(i)) for i in range(20)]


def test_a_burst_after_a_quiet_spell_is_not_refused_for_batches_not_made_yet(env):
    _, admin, client, serve, _ = env
    # 5 ms a batch, whatever its size: 2,000 queries take ~0.2 s in batches of 64. An SLO of
    # 10 s, which a machine stalled for seconds still meets; at the rate of the quiet spell's
    # batches of one (5 ms each) the burst would still not fit (0.9 x 10 s / 5 ms = 1,800)
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=10_000, models=["m"], cache=False)
    serve(sleeper(0.005), "r")
    for i in range(20):  # quiet: batches of one
        client.predict("a", [float(i)])
    preds = client.predict_many("a", [[float(i)] for i in range(2000)], window=2000)
    assert [p.output for p in preds] == [float(i) for i in range(2000)]


def test_ensemble_members_that_cannot_answer_in_time_are_left_out(env):
    _, admin, client, serve, _ = env
    admin.create_app(
        "v", input_type="float64", input_shape=[1], slo_ms=1000, default=-1.0, models=["m", "q"], cache=False
    )
    admin.set_policy("v", "ensemble")
    serve(sleeper(0.001), "fast", name="m")
    serve(sleeper(3.0), "slow", name="q")  # never within 1 s
    client.predict_many("v", [[1.0]] * 20, window=20)
    preds = client.predict_many("v", [[1.0]] * 50, window=50)
    assert all(not p.default and p.models_answered == ("m",) for p in preds)
    assert all("q" in p.models_missing for p in preds)


def test_refusals_and_answers_reach_a_client_that_sends_many_messages(env):
    """Refusals are rendered from a template per reason; a client that learnt none still
    reads each one, with its own retry-after."""
    tb, admin, _, _, _ = env
    admin.create_app(
        "a", input_type="float64", input_shape=[1], slo_ms=2000, default=-1.0, models=["m"], cache=False
    )
    admin.configure_model("m", max_queue=3, create=True)
    sock = raw_socket(tb.frontend)
    try:
        for rid in range(1, 11):
            sock.send_multipart(
                [proto.build_query("a", proto.FLOAT64, [1], [rid]), np.float64(rid).tobytes()]
            )
        got = {i["request_id"]: i for _, i in answers(sock, 10)}
    finally:
        sock.close()
    assert sorted(got) == list(range(1, 11))
    assert [rid for rid, i in got.items() if i["status"] == "ERROR"] == list(range(4, 11))
    assert all(got[rid]["retry_after_ms"] > 0 and got[rid]["error"] == "OVERLOADED" for rid in range(4, 11))


def test_threads_of_one_process_share_a_broker_fairly(env):
    """Several clients flooding at once: each gets an answer for each query."""
    tb, admin, _, serve, _ = env
    admin.create_app(
        "a", input_type="float64", input_shape=[1], slo_ms=300, default=-1.0, models=["m"], cache=False
    )
    serve(sleeper(0.010, 0.001), "r")
    results: dict[int, list] = {}

    def flood(k: int) -> None:
        with ketch.Client(tb.frontend) as c:
            results[k] = c.predict_many(
                "a", [[float(i)] for i in range(300)], window=300, return_exceptions=True
            )

    threads = [threading.Thread(target=flood, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(3):
        assert len(results[k]) == 300
        assert all(isinstance(p, (ketch.Prediction, ketch.Overloaded)) for p in results[k])
