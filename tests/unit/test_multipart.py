"""ketch.protocol.multipart: the hot-path send and receive keep send_multipart's meaning."""

from __future__ import annotations

import numpy as np
import pytest
import zmq
from ketch.protocol import multipart


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    for s in (router, dealer):
        s.linger = 0
        s.rcvtimeo = 5000
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.identity = b"peer"
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    router.close()
    dealer.close()
    ctx.term()


def test_frames_of_every_kind_arrive_whole_and_in_order(pair):
    router, dealer = pair
    big = np.arange(50_000, dtype=np.float64)  # 400 kB: goes zero-copy
    small = np.arange(4, dtype=np.float32)
    sent = [b"", b"header", memoryview(small).cast("B"), memoryview(big).cast("B"), big, zmq.Frame(b"frame")]
    multipart.send(dealer, sent)
    got = multipart.recv(router)
    assert got[0].bytes == b"peer"
    assert [f.bytes for f in got[1:]] == [
        bytes(memoryview(x)) if not isinstance(x, bytes) else x for x in sent
    ]
    # a received Frame is forwarded as it is
    multipart.send(router, got)
    back = multipart.recv(dealer)
    assert np.array_equal(np.frombuffer(back[4], np.float64), big)
    assert back[-1].bytes == b"frame"


def test_one_frame_and_waiting(pair):
    router, dealer = pair
    assert not multipart.waiting(router)
    multipart.send(dealer, [b"only"])
    assert router.poll(5000)
    assert multipart.waiting(router)
    assert [f.bytes for f in multipart.recv(router, multipart.NOBLOCK)] == [b"peer", b"only"]
    assert not multipart.waiting(router)


def test_noblock_receive_of_nothing_raises_again(pair):
    router, _ = pair
    with pytest.raises(zmq.Again):
        multipart.recv(router, multipart.NOBLOCK)
