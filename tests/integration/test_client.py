"""ketch.Client and ketch.AsyncClient against a raw ROUTER standing in for the broker, sending
what a broken or hostile broker might: a reply that does not decode fails only the request
ids it names, what names none fails nothing (counted), and no reply message is dropped."""

from __future__ import annotations

import asyncio
import threading

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.protocol import Status

pytestmark = pytest.mark.timeout(60)
F64 = proto.FLOAT64


@pytest.fixture
def router():
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.linger = 0
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)


def ok(rid: int) -> proto.ReplyFields:
    return proto.ReplyFields(rid, Status.OK, F64, (), model="m", model_version="1", latency_us=5)


def answer_badly(sock: zmq.Socket, want: int) -> None:
    """Take queries until ``want`` request ids arrived; then answer them through bad messages:
    garbage (names nothing), an Error naming nothing, a reply whose second item's payload does
    not fit, an answer for an id never sent, and last a good reply for the rest."""
    ids: list[int] = []
    identity = b""
    while len(ids) < want:
        assert sock.poll(5000), "no query"
        frames = sock.recv_multipart()
        identity = frames[0]
        ids += proto.read_query(proto.decode(frames[1])[2])[1]
    first, second, *rest = ids
    one = np.float64(1.0).tobytes()
    sock.send_multipart([identity, b"\x07garbage that is no envelope"])
    sock.send_multipart(
        [identity, proto.encode("Error", {"code": proto.ErrorCode.BAD_MESSAGE, "message": "?"})]
    )
    sock.send_multipart([identity, proto.build_reply([ok(first), ok(second)]), one, b"\x01\x02\x03"])
    sock.send_multipart([identity, proto.build_reply([ok(0)]), one])  # an id it never sent: ignored
    sock.send_multipart([identity, proto.build_reply([ok(r) for r in rest]), *[one] * len(rest)])


def test_a_bad_reply_fails_only_what_it_names_in_the_blocking_client(router):
    sock, address = router
    broker = threading.Thread(target=answer_badly, args=(sock, 4))
    broker.start()
    with ketch.Client(address) as client:
        answers = client.predict_many(
            "a", [[1.0], [2.0], [3.0], [4.0]], timeout_ms=3000, return_exceptions=True
        )
        broker.join(10)
        assert answers[0].output == 1.0
        assert isinstance(answers[1], ketch.ProtocolError) and "does not decode" in answers[1].message
        assert [a.output for a in answers[2:]] == [1.0, 1.0]
        assert client.unreadable == 2  # the garbage and the Error naming no query


def test_a_bad_reply_fails_only_what_it_names_in_the_async_client(router):
    sock, address = router
    broker = threading.Thread(target=answer_badly, args=(sock, 4))
    broker.start()

    async def main() -> tuple[list, int]:
        async with ketch.AsyncClient(address) as client:
            calls = [client.predict("a", [float(i)], timeout_ms=3000) for i in range(4)]
            return await asyncio.gather(*calls, return_exceptions=True), client.unreadable

    answers, unreadable = asyncio.run(main())
    broker.join(10)
    assert answers[0].output == 1.0
    assert isinstance(answers[1], ketch.ProtocolError)
    assert [a.output for a in answers[2:]] == [1.0, 1.0]
    assert unreadable == 2


def test_predict_many_sends_at_most_64_queries_to_a_message(router):
    sock, address = router
    sizes = []

    def broker() -> None:
        got = 0
        while got < 200:
            assert sock.poll(5000)
            frames = sock.recv_multipart()
            ids = proto.read_query(proto.decode(frames[1])[2])[1]
            sizes.append(len(ids))
            got += len(ids)
            reply = proto.build_reply([ok(r) for r in ids])
            sock.send_multipart([frames[0], reply, *[np.float64(0).tobytes()] * len(ids)])

    t = threading.Thread(target=broker)
    t.start()
    with ketch.Client(address) as client:
        assert len(client.predict_many("a", [[1.0]] * 200, chunk=1000)) == 200
    t.join(10)
    assert max(sizes) <= proto.MAX_ITEMS


def test_a_pinned_query_answered_by_another_version_fails(router):
    """A broker that predates Query.model_version skips it and answers by its selection: the
    client does not take that answer for the version it pinned."""
    sock, address = router
    seen = []

    def broker() -> None:
        for _ in range(4):
            assert sock.poll(5000)
            frames = sock.recv_multipart()
            query, ids = proto.read_query(proto.decode(frames[1])[2])
            seen.append(query.model_version)
            reply = proto.build_reply([ok(r) for r in ids])  # model m, version 1, whatever was asked
            sock.send_multipart([frames[0], reply, *[np.float64(0).tobytes()] * len(ids)])

    t = threading.Thread(target=broker)
    t.start()
    with ketch.Client(address) as client:
        assert client.predict("a", [1.0], version="1", timeout_ms=3000).version == "1"
        assert client.predict("a", [1.0], version="m:1", timeout_ms=3000).version == "1"
        with pytest.raises(ketch.ProtocolError, match="pinned to version '2'"):
            client.predict("a", [1.0], version="2", timeout_ms=3000)
        answers = client.predict_many("a", [[1.0]], version="2", timeout_ms=3000, return_exceptions=True)
        assert isinstance(answers[0], ketch.ProtocolError)
    t.join(10)
    assert seen == ["1", "m:1", "2", "2"]
