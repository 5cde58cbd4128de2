"""ketch.Replica driven frame by frame from a raw ROUTER standing in for the broker."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zmq
from ketch import _protocol as proto
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

    def ask(batch_id: int, payload: bytes) -> dict:
        router.send_multipart(
            [identity, proto.predict_template("m", "1", proto.FLOAT64, (4,)).render(batch_id, 10**6), payload]
        )
        while True:
            frames = router.recv_multipart()
            message = proto.to_dict(frames[1])
            if message["type"] == "PredictReply":
                return message["body"]

    yield replica, ask
    replica.stop()
    thread.join(10)
    router.close()


def test_a_learnt_one_item_request_with_a_payload_that_does_not_fit_fails_alone(driven):
    replica, ask = driven
    assert ask(1, np.ones(4).tobytes())["outputs"][0]["status"] == "OK"
    assert replica._one  # one-item requests are now read by template
    failed = ask(2, b"\x00" * 31)
    assert failed["batch_id"] == 2 and failed["error"] == "BAD_MESSAGE"
    again = ask(3, np.arange(4.0).tobytes())
    assert again["outputs"][0]["status"] == "OK" and again["batch_id"] == 3
