"""ketch.Replica driven frame by frame from a raw ROUTER standing in for the broker."""

from __future__ import annotations

import threading

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
    assert failed["batch_id"] == 2 and failed["error"] == "BAD_MESSAGE"
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
    failed = ask(9, xs[0].tobytes(), b"\x00" * 31, xs[2].tobytes())  # as the long way: the batch fails
    assert failed["batch_id"] == 9 and failed["error"] == "BAD_MESSAGE"
