"""The broker loop with real sockets, driven from the test process.

The broker runs on a thread; replicas are either ``ketch.Replica`` threads or a raw
DEALER (``RawReplica``) that the test drives frame by frame.
"""

from __future__ import annotations

import contextlib
import threading
import time

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import wait_for
from ketch.protocol import Status

pytestmark = pytest.mark.timeout(60)


def recv(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "no message in time"
    return sock.recv_multipart()


class RawReplica:
    """A container speaking the protocol by hand."""

    def __init__(
        self, backend: str, name: str = "m", version: str = "1", replica_id: str = "raw-1", credits: int = 2
    ) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(backend)
        self.name, self.version, self.replica_id, self.credits = name, version, replica_id, credits

    def hello(self) -> None:
        assert self.say_hello()["type"] == "Welcome"

    def say_hello(self, **fields) -> dict:
        """Send a Hello (these fields over the defaults); the broker's answer, as a dict."""
        self.sock.send(
            proto.encode(
                "Hello",
                {
                    "model": self.name,
                    "model_version": self.version,
                    "input": {"dtype": "FLOAT64", "shape": [-1]},
                    "sdk": "test",
                    "replica_id": self.replica_id,
                    "credits": self.credits,
                    **fields,
                },
            )
        )
        return proto.to_dict(recv(self.sock)[0])

    def next_batch(self, timeout_ms: int = 5000):
        while True:
            frames = recv(self.sock, timeout_ms)
            _, name, body = proto.decode(frames[0])
            if name == "PredictRequest":
                return body, frames[1:]

    def answer_sums(self, body, payloads) -> None:
        outs = [(Status.OK, proto.FLOAT64, (), 0, "") for _ in payloads]
        sums = [np.float64(np.frombuffer(p, "<f8").sum()).tobytes() for p in payloads]
        self.sock.send_multipart([proto.build_predict_reply(body.BatchId(), 10, outs), *sums])

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def admin(thread_broker):
    with ketch.Admin(thread_broker.admin) as a:
        yield a


@pytest.fixture
def client(thread_broker):
    with ketch.Client(thread_broker.frontend) as c:
        yield c


@pytest.fixture
def serve(thread_broker, replica_threads):
    def start(model, name: str = "m", **kw) -> ketch.Replica:
        return replica_threads(model, backend=thread_broker.backend, name=name, **kw)

    return start


def sums(xs):
    return [float(x.sum()) for x in xs]


def wait_replicas(admin, n: int, model: str = "m") -> None:
    wait_for(lambda: len(admin.replicas(model)) >= n, 10, f"{n} replicas of {model}")


def test_answers_match_the_model_for_random_inputs(thread_broker, admin, client, serve):
    # (an SLO of 10 s: a burst of 500 on a machine loaded enough to stall the replica threads
    # for seconds is still answered, not refused or late)
    admin.create_app("a", input_type="float64", input_shape=[8], slo_ms=10_000, models=["m"])
    serve(sums, replica_id="r1")
    serve(sums, replica_id="r2")
    wait_replicas(admin, 2)
    rng = np.random.default_rng(7)
    xs = [rng.normal(size=8) for _ in range(500)]
    preds = client.predict_many("a", xs)
    assert [p.output for p in preds] == pytest.approx([x.sum() for x in xs])
    assert all(p.model == "m" and p.version == "1" and not p.default for p in preds)
    one = client.predict("a", xs[0])
    assert one.output == pytest.approx(xs[0].sum()) and one.latency_ms > 0


def test_string_and_bytes_apps(thread_broker, admin, client, serve):
    admin.create_app("s", input_type="string", slo_ms=2000, models=["upper"])
    admin.create_app("b", input_type="bytes", slo_ms=2000, models=["echo"])
    serve(lambda xs: [x.upper() for x in xs], name="upper", input_type="string")
    serve(lambda xs: [bytes(reversed(x)) for x in xs], name="echo", input_type="bytes")
    wait_replicas(admin, 1, "upper")
    wait_replicas(admin, 1, "echo")
    assert client.predict("s", "héllo wörld").output == "HÉLLO WÖRLD"
    assert client.predict("b", b"\x00\x01\xff").output == b"\xff\x01\x00"
    words = [f"w{i}" for i in range(50)]
    assert [p.output for p in client.predict_many("s", words)] == [w.upper() for w in words]


def test_unknown_app_and_bad_input_get_explicit_errors(thread_broker, admin, client):
    admin.create_app("a", input_type="float64", input_shape=[4], slo_ms=100, models=["m"])
    with pytest.raises(ketch.UnknownApp, match="no app named 'zzz'"):
        client.predict("zzz", [1.0])
    with pytest.raises(
        ketch.BadInput, match=r"takes float64 inputs of shape \(4,\), got float64 of shape \(3,\)"
    ):
        client.predict("a", [1.0, 2.0, 3.0])
    # another dtype is converted when every value survives it (int32 to float64), else refused
    with pytest.raises(ketch.BadInput, match="would change as float64"):
        client.predict("a", np.full(4, 2**53 + 1, dtype=np.int64))
    # a payload whose size does not match its declared shape
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(thread_broker.frontend)
    try:
        sock.send_multipart([proto.build_query("a", proto.FLOAT64, [4], [11]), b"\x00" * 31])
        item = proto.to_dict(recv(sock)[0])["body"]["items"][0]
        assert item["status"] == "ERROR" and item["error"] == "BAD_INPUT" and "31 bytes" in item["message"]
        sock.send_multipart([proto.build_query("a", proto.FLOAT64, [4], [12, 13]), b"\x00" * 32])
        items = proto.to_dict(recv(sock)[0])["body"]["items"]
        assert {i["request_id"] for i in items} == {12, 13} and all(
            i["error"] == "BAD_MESSAGE" for i in items
        )
    finally:
        sock.close()
    assert admin.stats()["counters"]["refused_bad_input"] >= 3


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"not a flatbuffer"], "BAD_MESSAGE"),
        ([b""], "BAD_MESSAGE"),
        ([proto.encode("Heartbeat", {})], "UNKNOWN_MESSAGE"),
        ([proto.encode("Query", {"app": "a", "request_ids": [1]}, version=9), b""], "UNSUPPORTED_VERSION"),
        ([proto.encode("Query", {"app": "a"})], "BAD_MESSAGE"),
    ],
)
def test_malformed_frontend_messages_get_an_error_and_the_broker_keeps_serving(
    thread_broker, admin, frames, code
):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(thread_broker.frontend)
    try:
        sock.send_multipart(frames)
        reply = proto.to_dict(recv(sock)[0])
        assert reply["type"] == "Error" and reply["body"]["code"] == code
    finally:
        sock.close()
    assert admin.ping()["version"] == 1


def test_backend_requires_hello_and_refuses_garbage(thread_broker):
    raw = RawReplica(thread_broker.backend)
    try:
        raw.sock.send(proto.encode("Heartbeat", {}))
        err = proto.to_dict(recv(raw.sock)[0])
        assert err["body"]["code"] == "BAD_MESSAGE" and "Hello" in err["body"]["message"]
        raw.sock.send(b"\x01\x02")
        assert proto.to_dict(recv(raw.sock)[0])["body"]["code"] == "BAD_MESSAGE"
        raw.sock.send(proto.encode("Hello", {"model": "m"}, version=3))  # the broker speaks 1 and 2
        assert proto.to_dict(recv(raw.sock)[0])["body"]["code"] == "UNSUPPORTED_VERSION"
        raw.hello()
    finally:
        raw.close()


def test_no_replica_answers_the_default_within_the_slo(thread_broker, admin, client):
    admin.create_app(
        "a", input_type="float64", input_shape=[2], slo_ms=50, default={"label": "unknown"}, models=["ghost"]
    )
    admin.create_app("nodefault", input_type="float64", input_shape=[2], slo_ms=50, models=["ghost"])
    pred = client.predict("a", [1.0, 2.0])
    assert pred.default and pred.output == {"label": "unknown"}
    assert "no replica" in pred.default_explanation and "ghost" in pred.default_explanation
    assert 45 <= pred.latency_ms < 5000  # at its deadline; the bound only says "answered, not lost"
    with pytest.raises(ketch.DeadlineExceeded, match="no default"):
        client.predict("nodefault", [1.0, 2.0])


def test_app_without_model_answers_at_once(thread_broker, admin, client):
    admin.create_app("lonely", input_type="float64", input_shape=[1], slo_ms=60_000, default=0)
    pred = client.predict("lonely", [1.0], timeout_ms=60_000)
    # at once: long before the minute its deadline allows, however busy the machine
    assert pred.default and "links no model" in pred.default_explanation and pred.latency_ms < 20_000


def test_model_error_fails_its_batch_and_the_replica_keeps_serving(thread_broker, admin, client, serve):
    def picky(xs):
        if any(x[0] < 0 for x in xs):
            raise ValueError("negative input")
        return sums(xs)

    admin.create_app("a", input_type="float64", input_shape=[2], slo_ms=2000, models=["m"])
    serve(picky)
    wait_replicas(admin, 1)
    with pytest.raises(ketch.ModelError, match="ValueError: negative input"):
        client.predict("a", [-1.0, 2.0])
    assert client.predict("a", [1.0, 2.0]).output == 3.0
    assert admin.stats()["models"]["m"]["errors"] == 1


def test_wrong_output_count_is_a_model_error(thread_broker, admin, client, serve):
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    serve(lambda xs: [1.0] * (len(xs) + 1))
    wait_replicas(admin, 1)
    with pytest.raises(ketch.ModelError, match="returned 2 outputs for 1 inputs"):
        client.predict("a", [1.0])


def test_batches_form_under_load_and_respect_max_batch(thread_broker, admin, client, serve):
    seen: list[int] = []

    def slow_sums(xs):
        seen.append(len(xs))
        time.sleep(0.005)
        return sums(xs)

    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=10_000, models=["m"])
    admin.configure_model("m", max_batch=16)
    serve(slow_sums, credits=1)
    wait_replicas(admin, 1)
    xs = [np.array([float(i)]) for i in range(400)]
    assert [p.output for p in client.predict_many("a", xs)] == [float(i) for i in range(400)]
    assert max(seen) == 16 and sum(seen) == 400
    assert admin.stats()["models"]["m"]["mean_batch"] > 1


@pytest.mark.dead_after_ms(3000)
def test_a_batch_longer_than_the_dead_interval_keeps_its_replica(thread_broker, admin, client, serve):
    # the broker declares a silent replica dead after 3 s (not 1 s: a loaded machine can hold
    # the heartbeat thread that long); this batch takes 7.5 s, and the replica's heartbeat
    # thread must speak for it while it computes
    def slow(xs):
        time.sleep(7.5)
        return sums(xs)

    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=30_000, models=["m"])
    serve(slow, replica_id="patient")
    wait_replicas(admin, 1)
    before = admin.replicas("m")[0]
    assert client.predict("a", [4.0], timeout_ms=30_000).output == 4.0
    after = admin.replicas("m")
    assert len(after) == 1 and after[0]["replica_id"] == "patient"
    assert after[0]["pid"] == before["pid"] and after[0]["batches"] == before["batches"] + 1, after
    assert admin.stats()["counters"].get("late_or_unknown_replies", 0) == 0


def test_dead_replica_work_is_requeued_on_another(thread_broker, admin, client, serve):
    # (an SLO of 30 s: the dead replica's queries wait for another to start, which a loaded
    # machine can make take seconds)
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=30_000, models=["m"])
    raw = RawReplica(thread_broker.backend, credits=1)
    raw.hello()
    wait_replicas(admin, 1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(thread_broker.frontend)
    try:
        sock.send_multipart(
            [
                proto.build_query("a", proto.FLOAT64, [1], [1, 2, 3]),
                *(np.float64(v).tobytes() for v in (1.0, 2.0, 3.0)),
            ]
        )
        raw.next_batch(30_000)  # it takes the work ... and dies silently
        raw.close()
        serve(sums, replica_id="healthy")
        answers = {}
        while len(answers) < 3:
            for item in proto.to_dict(recv(sock, 30_000)[0])["body"]["items"]:
                assert item["request_id"] not in answers, "answered twice"
                answers[item["request_id"]] = item
        assert all(a["status"] == "OK" for a in answers.values()), answers
    finally:
        sock.close()


@pytest.mark.dead_after_ms(3000)
def test_late_reply_from_a_replaced_replica_is_discarded(thread_broker, admin, client):
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=20_000, models=["m"])
    old = RawReplica(thread_broker.backend, replica_id="same")
    old.hello()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("p", client.predict("a", [5.0])))
    t.start()
    body, payloads = old.next_batch()
    new = RawReplica(thread_broker.backend, replica_id="same")  # same replica id reconnects
    try:
        # while the old connection is live its id is not taken over: CONFLICT, try later
        old.sock.send(proto.encode("Heartbeat", {}))  # (alive: its dead interval starts again)
        refused = new.say_hello()
        assert refused["type"] == "Error" and refused["body"]["code"] == "CONFLICT"
        assert "in use by a live connection" in refused["body"]["message"]
        wait_for(lambda: not admin.replicas("m"), 10, "the silent replica declared dead")
        new.hello()
        old.answer_sums(body, payloads)  # too late: the batch went back to the queue
        body2, payloads2 = new.next_batch()
        new.answer_sums(body2, payloads2)
        t.join(10)
        assert result["p"].output == 5.0
        wait_for(
            lambda: admin.stats()["counters"].get("late_or_unknown_replies") == 1, 5, "late reply counted"
        )
    finally:
        old.close()
        new.close()


def test_version_switch_and_rollback(thread_broker, admin, client, serve):
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    serve(lambda xs: [1.0] * len(xs), version="1", replica_id="v1")
    wait_replicas(admin, 1)
    serve(lambda xs: [2.0] * len(xs), version="2", replica_id="v2")
    wait_replicas(admin, 2)
    assert client.predict("a", [0.0]).output == 1.0  # the first version seen stays active
    admin.set_version("m", "2")
    pred = client.predict("a", [0.0])
    assert (pred.output, pred.version) == (2.0, "2")
    admin.rollback("m")
    assert client.predict("a", [0.0]).version == "1"
    with pytest.raises(ketch.NotFound, match="no version '7'"):
        admin.set_version("m", "7")


def test_admin_validates_its_arguments(thread_broker, admin):
    admin.create_app("a", input_type="float64", input_shape=[4], slo_ms=20)
    with pytest.raises(ketch.Conflict):
        admin.create_app("a", input_type="float64")
    with pytest.raises(ketch.Invalid, match="unknown dtype"):
        admin.create_app("b", input_type="complex128")
    with pytest.raises(ketch.Invalid, match="name"):
        admin.create_app("bad name!", input_type="float64")
    with pytest.raises(ketch.Invalid, match="slo_ms"):
        admin.create_app("c", input_type="float64", slo_ms=-1)
    with pytest.raises(ketch.NotFound):
        admin.show_app("nope")
    with pytest.raises(ketch.KetchError, match="unknown admin op"):
        admin.call("app.explode")
    admin.link("a", "m1")
    admin.link("a", "m2")  # an app may link several models; its policy says how they are used
    with pytest.raises(ketch.Invalid, match="unknown policy"):
        admin.set_policy("a", "nonsense")
    with pytest.raises(ketch.Invalid):
        admin.set_policy("a", "exp3", gamma=7)
    assert [a["name"] for a in admin.list_apps()] == ["a"]
    admin.delete_app("a")
    assert admin.list_apps() == []


def test_feedback_is_answered_explicitly(thread_broker, admin, client):
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=20)
    with pytest.raises(ketch.Invalid, match="learns nothing from feedback"):
        client.feedback("a", 1, query_id=5)
    with pytest.raises(ketch.UnknownApp):
        client.feedback("zz", 1, x=[1.0])


def test_learnt_message_templates_answer_as_the_long_way(thread_broker, admin, client, serve):
    """Client, broker and replica read a message that matches a template learnt from an
    earlier one from its fixed slots. A message that differs anywhere else (another shape
    of the same length, a payload of the wrong size, an app since deleted) must still get
    the answer the long way gives."""
    admin.create_app("v", input_type="float64", input_shape=[-1], slo_ms=2000, models=["double"])
    replica = serve(lambda xs: [x * 2 for x in xs], name="double")
    wait_replicas(admin, 1, "double")
    rng = np.random.default_rng(3)
    for n in [4, 4, 5, 3, 4, 6]:  # one-dimensional shapes: headers of one length, other values
        x = rng.normal(size=n)
        for _ in range(3):  # learnt on the first, matched on the next
            p = client.predict("v", x)
            assert p.output.shape == (n,) and np.array_equal(p.output, x * 2)
            assert p.model == "double" and p.version == "1" and p.models_answered == ("double",)
    broker = thread_broker.broker
    assert broker.admission.queries and broker.containers.plain_replies and replica._requests
    assert ketch.client._PLAIN
    # a learnt query with a payload of the wrong size, then for an app deleted since
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(thread_broker.frontend)
    template = proto.query_template("v", proto.FLOAT64, (4,), 0, 0, "")
    try:
        sock.send_multipart([template.render(21), np.ones(4).tobytes()])
        item = proto.to_dict(recv(sock)[0])["body"]["items"][0]
        assert item["status"] == "OK" and item["request_id"] == 21
        sock.send_multipart([template.render(22), b"\x00" * 31])
        item = proto.to_dict(recv(sock)[0])["body"]["items"][0]
        assert item["request_id"] == 22 and item["error"] == "BAD_INPUT" and "31 bytes" in item["message"]
        admin.delete_app("v")
        sock.send_multipart([template.render(23), np.ones(4).tobytes()])
        item = proto.to_dict(recv(sock)[0])["body"]["items"][0]
        assert item["request_id"] == 23 and item["error"] == "UNKNOWN_APP"
    finally:
        sock.close()


@contextlib.contextmanager
def one_batch_setup(thread_broker, admin, size: int):
    """App "a" on model "m", whose batches are of ``size`` exactly, served by one raw
    replica; yields (replica, a client DEALER)."""
    admin.create_app("a", input_type="float64", input_shape=[-1], slo_ms=30_000, models=["m"])
    admin.configure_model("m", max_batch=size, batching="fixed", create=True)
    replica = RawReplica(thread_broker.backend, credits=1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(thread_broker.frontend)
    try:
        replica.hello()
        wait_replicas(admin, 1)
        yield replica, sock
    finally:
        sock.close()
        replica.close()


def test_many_answers_go_in_replies_of_at_most_64_and_leave_the_broker_at_once(thread_broker, admin):
    """100 queries in one message, computed in one batch: their answers leave in Replies
    of 64 at most (the sizes a broker prebuilds templates for), and no answered query is
    held until its deadline."""
    with one_batch_setup(thread_broker, admin, 100) as (replica, sock):
        ids = list(range(1000, 1100))
        xs = [np.arange(3.0) + i for i in range(100)]
        sock.send_multipart([proto.build_query("a", proto.FLOAT64, (3,), ids), *[x.tobytes() for x in xs]])
        body, payloads = replica.next_batch()
        assert body.BudgetsUsLength() == 100
        replica.answer_sums(body, payloads)
        answered: dict[int, float] = {}
        sizes = []
        while len(answered) < 100:
            frames = recv(sock)
            items = proto.to_dict(frames[0])["body"]["items"]
            sizes.append(len(items))
            for item, payload in zip(items, frames[1:], strict=True):
                assert item["status"] == "OK" and item["request_id"] not in answered
                answered[item["request_id"]] = float(np.frombuffer(payload, "<f8")[0])
        assert sizes == [64, 36]
        assert answered == {rid: float(x.sum()) for rid, x in zip(ids, xs, strict=True)}
        assert len(thread_broker.broker.deadlines) == 0  # a 30 s SLO, yet nothing is held


def test_a_batch_of_one_output_type_still_checks_every_answer(thread_broker, admin):
    """Outputs that all declare one type are answered in bulk, but an output whose payload
    does not fit that type is still that query's MODEL_ERROR, and a request id of 0 (which a
    reply template cannot carry) still gets its answer."""
    with one_batch_setup(thread_broker, admin, 3) as (replica, sock):
        xs = [np.full(2, float(i)) for i in range(3)]
        sock.send_multipart(
            [proto.build_query("a", proto.FLOAT64, (2,), [0, 5, 6]), *[x.tobytes() for x in xs]]
        )
        body, inputs = replica.next_batch()
        assert body.BudgetsUsLength() == 3 and [bytes(f) for f in inputs] == [x.tobytes() for x in xs]
        outs = [(Status.OK, proto.FLOAT64, (), 0, "")] * 3
        sums = [np.float64(10.0).tobytes(), b"\x00" * 7, np.float64(12.0).tobytes()]
        replica.sock.send_multipart([proto.build_predict_reply(body.BatchId(), 10, outs), *sums])
        answers = {}
        while len(answers) < 3:
            frames = recv(sock)
            for item, payload in zip(proto.to_dict(frames[0])["body"]["items"], frames[1:], strict=True):
                answers[item.get("request_id", 0)] = (item, payload)
        assert answers[0][0]["status"] == "OK" and np.frombuffer(answers[0][1], "<f8")[0] == 10.0
        assert answers[6][0]["status"] == "OK" and np.frombuffer(answers[6][1], "<f8")[0] == 12.0
        assert answers[5][0]["error"] == "MODEL_ERROR" and "7 bytes" in answers[5][0]["message"]
