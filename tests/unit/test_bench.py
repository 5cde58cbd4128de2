"""ketch.bench: the load loops set up their thread for timing and put it back after."""

from __future__ import annotations

import gc
import sys
import threading

import numpy as np
import pytest
import zmq
from ketch import bench
from ketch import protocol as proto
from ketch.protocol import Status


def test_measuring_pauses_the_collector_and_puts_it_back():
    assert gc.isenabled()
    with bench._measuring():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), bench._measuring():
        raise RuntimeError("a load that fails")
    assert gc.isenabled()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timer slack is a Linux setting")
def test_measuring_sets_a_fine_timer_slack_and_restores_it():
    original = bench._set_timer_slack(50_000)
    assert original is not None
    bench._set_timer_slack(original)
    with bench._measuring():
        assert bench._set_timer_slack(1) == 1
    assert bench._set_timer_slack(original) == original


def _answering_router(stop: threading.Event, sizes: list[int]) -> tuple[str, threading.Thread]:
    """A stand-in broker on a free port: answers every Query with OK items, noting how many
    queries each message carried."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def serve() -> None:
        try:
            while not stop.is_set():
                if not sock.poll(50):
                    continue
                client, header, *payloads = sock.recv_multipart()
                _, _, q = proto.decode(header)
                ids = [q.RequestIds(i) for i in range(q.RequestIdsLength())]
                sizes.append(len(ids))
                items = [proto.ReplyFields(rid, Status.OK, proto.FLOAT64, (), latency_us=1) for rid in ids]
                sock.send_multipart([client, proto.build_reply(items), *payloads])
        finally:
            sock.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"tcp://127.0.0.1:{port}", thread


@pytest.mark.parametrize("one_per_message", [False, True])
def test_closed_loop_sends_a_level_in_one_message_or_one_per_query(one_per_message):
    stop, sizes = threading.Event(), []
    address, thread = _answering_router(stop, sizes)
    try:
        x = np.zeros(1)
        res = bench.closed_loop(
            address, "a", lambda _: x, 8, 5.0, max_queries=200, one_per_message=one_per_message
        )
    finally:
        stop.set()
        thread.join(5)
    assert res.ok == res.sent == sum(sizes) == 200 and res.lost == 0
    if one_per_message:
        assert set(sizes) == {1}
    else:
        assert sizes[0] == 8
