"""ketch.Replica driven frame by frame from a raw ROUTER standing in for the broker."""

from __future__ import annotations

import threading
import time

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.runtime import Replica

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def driven():
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.rcvtimeo = 5000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    replica = Replica(
        lambda xs: [float(x.sum()) for x in xs],
        name="m",
        input_type="float64",
        input_shape=[4],
        broker=f"tcp://127.0.0.1:{port}",
    )
    thread = threading.Thread(target=replica.run, daemon=True)
    thread.start()
    identity = router.recv_multipart()[0]  # its Hello
    router.send_multipart([identity, proto.encode("Welcome", {"heartbeat_ms": 1000, "dead_after_ms": 5000})])

    def ask(batch_id: int, *payloads: bytes) -> dict:
        template = proto.predict_template("m", "1", proto.FLOAT64, (4,), len(payloads))
        router.send_multipart([identity, template.render(batch_id, *[10**6] * len(payloads)), *payloads])
        while True:
            frames = router.recv_multipart()
            message = proto.to_dict(frames[1])
            if message["type"] == "PredictReply":
                return {**message["body"], "payloads": frames[2:]}

    yield replica, ask
    replica.stop()
    thread.join(10)
    router.close()


def test_a_learnt_one_item_request_with_a_payload_that_does_not_fit_fails_alone(driven):
    replica, ask = driven
    assert ask(1, np.ones(4).tobytes())["outputs"][0]["status"] == "OK"
    assert replica._requests  # such requests are now read by template
    failed = ask(2, b"\x00" * 31)
    assert failed["batch_id"] == 2 and failed["error"] == "NONE"
    assert failed["outputs"][0]["status"] == "ERROR" and failed["outputs"][0]["error"] == "BAD_INPUT"
    again = ask(3, np.arange(4.0).tobytes())
    assert again["outputs"][0]["status"] == "OK" and again["batch_id"] == 3


def test_learnt_requests_of_several_items_answer_as_the_long_way(driven):
    replica, ask = driven
    xs = [np.arange(4.0) + i for i in range(3)]
    first = ask(7, *[x.tobytes() for x in xs])  # read the long way, then learnt
    rendered = proto.predict_template("m", "1", proto.FLOAT64, (4,), 3).render(8, 1, 2, 3)
    assert replica._requests.match(rendered) == ([8, 1, 2, 3], (proto.FLOAT64, (4,), 3))
    again = ask(8, *[(x * 2).tobytes() for x in xs])  # read by template
    assert first["batch_id"] == 7 and again["batch_id"] == 8
    assert [o["status"] for o in again["outputs"]] == ["OK"] * 3
    assert [np.frombuffer(p, "<f8")[0] for p in again["payloads"]] == [float((x * 2).sum()) for x in xs]
    failed = ask(9, xs[0].tobytes(), b"\x00" * 31, xs[2].tobytes())  # as the long way: that item fails
    assert failed["batch_id"] == 9 and failed["error"] == "NONE"
    assert [(o["status"], o["error"]) for o in failed["outputs"]] == [
        ("OK", "NONE"), ("ERROR", "BAD_INPUT"), ("OK", "NONE")
    ]  # fmt: skip
    assert [np.frombuffer(p, "<f8")[0] for p in (failed["payloads"][0], failed["payloads"][2])] == [
        float(xs[0].sum()), float(xs[2].sum())
    ]  # fmt: skip


class FakeBroker:
    """A raw ROUTER standing in for the broker, with a Replica on a thread connected to it."""

    def __init__(self, model, **kw) -> None:
        self.router = zmq.Context.instance().socket(zmq.ROUTER)
        self.router.linger = 0
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        kw.setdefault("name", "m")
        self.replica = Replica(model, broker=f"tcp://127.0.0.1:{port}", **kw)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.identity = b""

    def _run(self) -> None:
        try:
            self.replica.run()
        except BaseException as exc:  # what run() ended with, for the test to see
            self.error = exc

    def recv(self, timeout_s: float = 5.0) -> tuple[str, dict, list[bytes]] | None:
        if not self.router.poll(int(timeout_s * 1000)):
            return None
        frames = self.router.recv_multipart()
        self.identity = frames[0]
        doc = proto.to_dict(frames[1])
        return doc["type"], doc["body"], frames[2:]

    def expect(self, kind: str, timeout_s: float = 5.0) -> tuple[dict, list[bytes]]:
        end = time.monotonic() + timeout_s
        while True:
            got = self.recv(max(0.0, end - time.monotonic()))
            assert got is not None, f"no {kind} in time"
            if got[0] == kind:
                return got[1], got[2]

    def count(self, kind: str, seconds: float) -> int:
        """How many ``kind`` messages arrive within ``seconds``."""
        end, n = time.monotonic() + seconds, 0
        while (left := end - time.monotonic()) > 0:
            got = self.recv(left)
            if got is not None and got[0] == kind:
                n += 1
        return n

    def send(self, header: bytes, *payloads: bytes) -> None:
        self.router.send_multipart([self.identity, header, *payloads])

    def welcome(self) -> None:
        self.expect("Hello")
        self.send(proto.encode("Welcome", {"heartbeat_ms": 1000, "dead_after_ms": 5000}))

    def batch(self, batch_id: int, dtype: int, *payloads: bytes, shape=(), version: int = 1) -> bytes:
        n = len(payloads)
        header = proto.encode(
            "PredictRequest",
            {
                "batch_id": batch_id,
                "model": "m",
                "model_version": "1",
                "dtype": dtype,
                "ndim": len(shape),
                "shapes": list(shape) * n,
                "budgets_us": [10**6] * n,
            },
            version=version,
        )
        self.send(header, *payloads)
        return header

    def close(self) -> None:
        self.replica.stop()
        self.thread.join(10)
        self.router.close(linger=0)


@pytest.fixture
def fake_broker():
    made: list[FakeBroker] = []

    def make(model, **kw) -> FakeBroker:
        fb = FakeBroker(model, **kw)
        made.append(fb)
        return fb

    yield make
    for fb in made:
        fb.close()


def statuses(reply: dict) -> list[tuple[str, str]]:
    return [(o["status"], o["error"]) for o in reply["outputs"]]


@pytest.mark.parametrize(
    ("input_type", "good", "bad"),
    [
        ("json", b'{"a": 1}', b"{not json"),
        ("json", b"[1, 2]", b"[" * 100_000 + b"]" * 100_000),  # deeper than Python's stack
        ("string", "\u00e9t\u00e9".encode(), b"\xff\xfe not utf-8"),
    ],
)
def test_an_item_invalid_for_its_type_fails_alone_and_the_replica_lives(fake_broker, input_type, good, bad):
    fb = fake_broker(lambda xs: [str(x) for x in xs], input_type=input_type)
    fb.welcome()
    code = proto.dtype_code(input_type)
    for batch_id in (1, 2, 3):  # the long way, then as a learnt request, then again
        fb.batch(batch_id, code, good, bad, good)
        reply, payloads = fb.expect("PredictReply")
        assert reply["batch_id"] == batch_id and reply["error"] == "NONE"
        assert statuses(reply) == [("OK", "NONE"), ("ERROR", "BAD_INPUT"), ("OK", "NONE")]
        assert payloads[0] == payloads[2] != b""
        fb.batch(10 + batch_id, code, bad)  # a batch of that item alone
        reply, _ = fb.expect("PredictReply")
        assert statuses(reply) == [("ERROR", "BAD_INPUT")]
    assert fb.thread.is_alive() and fb.error is None


def test_a_model_that_fails_its_batch_keeps_bad_input_for_the_bad_item(fake_broker):
    def fails(xs):
        raise RuntimeError("model bug")

    fb = fake_broker(fails, input_type="json")
    fb.welcome()
    fb.batch(1, proto.JSON, b"1", b"{")
    reply, _ = fb.expect("PredictReply")
    assert statuses(reply) == [("ERROR", "MODEL_ERROR"), ("ERROR", "BAD_INPUT")]


@pytest.mark.parametrize(
    "kw",
    [
        {"name": ""},
        {"name": "a/b"},
        {"name": "m" * 200},
        {"name": "m", "version": "1 2"},
        {"name": "m", "replica_id": "has space"},
        {"name": "m", "credits": 5000},
        {"name": "m", "input_type": "string", "input_shape": [3]},
    ],
)
def test_a_replica_out_of_the_limits_is_refused_at_construction(kw):
    with pytest.raises(ValueError):
        Replica(lambda xs: xs, broker="tcp://127.0.0.1:9", **kw)


def test_an_error_text_never_makes_a_hello_loop(fake_broker):
    fb = fake_broker(lambda xs: xs)
    refusal = proto.encode("Error", {"code": proto.ErrorCode.BAD_MESSAGE, "message": "hello needs model"})
    fb.expect("Hello")
    hellos = 1
    end = time.monotonic() + 1.5
    while time.monotonic() < end:  # every Hello answered by a BAD_MESSAGE that says "hello"
        fb.send(refusal)
        got = fb.recv(max(0.0, end - time.monotonic()))
        hellos += got is not None and got[0] == "Hello"
    assert hellos <= 3  # the Hello repeated with backoff (1 s), not once per Error
    assert fb.thread.is_alive()


def test_once_welcomed_bad_message_means_hello_again_whatever_its_text(fake_broker):
    fb = fake_broker(lambda xs: xs)
    fb.welcome()
    fb.send(proto.encode("Error", {"code": proto.ErrorCode.BAD_MESSAGE, "message": "who are you?"}))
    hello, _ = fb.expect("Hello", 3)
    assert hello["replica_id"] == fb.replica.replica_id
    assert hello["fingerprint"].startswith("sha256:")


def test_conflict_waits_and_tries_again_invalid_ends_the_replica(fake_broker):
    fb = fake_broker(lambda xs: xs)
    fb.expect("Hello")
    sent = time.monotonic()
    fb.send(proto.encode("Error", {"code": proto.ErrorCode.CONFLICT, "message": "replica id in use"}))
    fb.expect("Hello", 5)
    assert time.monotonic() - sent >= 0.9  # after a backoff, not at once
    fb.send(proto.encode("Error", {"code": proto.ErrorCode.INVALID, "message": "hello refused: bad name"}))
    fb.thread.join(5)
    assert not fb.thread.is_alive()
    assert isinstance(fb.error, ketch.errors.Invalid) and fb.replica.refusal is fb.error


def test_messages_of_another_version_or_unknown_type_are_answered_not_acted_on(fake_broker):
    computed = []
    fb = fake_broker(lambda xs: computed.extend(xs) or [0.0 for _ in xs], input_shape=[1])
    fb.welcome()
    newer = max(proto.PROTOCOL_VERSIONS) + 1  # a version this runtime does not speak
    fb.batch(1, proto.FLOAT64, np.ones(1).tobytes(), shape=(1,), version=newer)
    error, _ = fb.expect("Error")
    assert error["code"] == "UNSUPPORTED_VERSION" and not computed
    unknown = bytearray(proto.encode("Heartbeat", {}))
    unknown[unknown.index(proto.BODY_CODES["Heartbeat"].to_bytes(1, "little"), 8)] = 99
    fb.send(bytes(unknown))
    error, _ = fb.expect("Error")
    assert error["code"] == "UNKNOWN_MESSAGE"
    fb.send(proto.build_query("a", proto.FLOAT64, (1,), [5]), np.ones(1).tobytes())  # a client's message
    error, _ = fb.expect("Error")
    assert error["code"] == "UNKNOWN_MESSAGE" and "Query" in error["message"]
    fb.send(proto.encode("Error", {"code": proto.ErrorCode.UNKNOWN_MESSAGE, "message": "x"}, version=newer))
    assert fb.count("Error", 0.5) == 0  # an Error is never answered with an Error
    fb.batch(2, proto.FLOAT64, np.ones(1).tobytes(), shape=(1,))
    reply, _ = fb.expect("PredictReply")
    assert reply["batch_id"] == 2 and len(computed) == 1
