"""``ketch.AsyncClient`` against a real broker: queries issued together share messages,
each still gets its own answer, and a bad one fails alone."""

from __future__ import annotations

import asyncio
import time

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(60)


def sums(xs):
    return [float(x.sum()) for x in xs]


@pytest.fixture
def env(thread_broker, replica_threads):
    with ketch.Admin(thread_broker.admin) as admin:
        admin.create_app("a", input_type="float64", input_shape=[3], slo_ms=5000, models=["m"])
        admin.create_app(
            "strict", input_type="float64", input_shape=[3], slo_ms=5000, models=["m"], finite_only=True
        )
        replica_threads(sums, backend=thread_broker.backend, name="m")
        wait_for(lambda: len(admin.replicas("m")) == 1, 10, "a replica")
        yield thread_broker, admin


def test_concurrent_queries_share_messages_and_each_gets_its_own_answer(env):
    broker, _ = env
    xs = [np.random.default_rng(i).normal(size=3) for i in range(200)]

    async def main():
        async with ketch.AsyncClient(broker.frontend) as client:
            sent: list[int] = []
            client._now = _Counting(client._now, sent)
            preds = await asyncio.gather(*(client.predict("a", x) for x in xs))
            return preds, sent

    preds, sent = asyncio.run(main())
    assert [p.output for p in preds] == pytest.approx([float(x.sum()) for x in xs])
    assert len({p.request_id for p in preds}) == len(xs)
    # 200 queries issued in one turn of the loop: at most 64 to a message
    assert sum(sent) == len(xs) and len(sent) <= 4, sent


def test_a_bad_query_among_concurrent_ones_fails_alone(env):
    broker, _ = env
    good = [np.array([1.0, 2.0, float(i)]) for i in range(10)]

    async def main():
        async with ketch.AsyncClient(broker.frontend) as client:
            return await asyncio.gather(
                *(client.predict("strict", x) for x in good[:5]),
                client.predict("strict", np.array([1.0, np.nan, 0.0])),
                *(client.predict("strict", x) for x in good[5:]),
                return_exceptions=True,
            )

    answers = asyncio.run(main())
    bad = answers.pop(5)
    assert isinstance(bad, ketch.BadInput) and "NaN or infinity" in str(bad)
    assert [a.output for a in answers] == [float(x.sum()) for x in good]


def test_a_reply_arriving_just_before_a_send_is_not_missed():
    # A ZeroMQ socket's descriptor signals new messages only once, and any operation on the
    # socket may use up that signal. Here a reply arrives after the event loop's last poll
    # and just before the client sends its next query: the client must still see it.
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def reply_to(frames: list[bytes]) -> None:
        peer, header = frames[0], frames[1]
        _, _, q = proto.decode(header)
        rid = q.RequestIds(0)
        reply = proto.reply_ok_many_template("m", "1", proto.FLOAT64, (), 1).render(rid, 100)
        router.send_multipart([peer, reply, np.float64(42.0).tobytes()])
        time.sleep(0.1)  # the reply is in the client's socket before the callbacks go on

    async def main():
        loop = asyncio.get_running_loop()
        async with ketch.AsyncClient(f"tcp://127.0.0.1:{port}") as client:
            first = asyncio.ensure_future(client.predict("a", np.zeros(3), timeout_ms=1500))
            for _ in range(500):  # let the first query go out
                await asyncio.sleep(0.01)
                if router.poll(0):
                    break
            query = router.recv_multipart(zmq.NOBLOCK)
            await asyncio.sleep(0.05)  # the client's reader now waits for the descriptor
            # callbacks run in the order they were scheduled: the reply goes out (and
            # arrives) in the loop turn that then runs the send of the second query
            loop.call_soon(loop.call_soon, reply_to, query)
            second = asyncio.ensure_future(client.predict("a", np.ones(3), timeout_ms=300))
            assert (await first).output == 42.0
            with pytest.raises(ketch.Timeout):
                await second  # nobody answers it

    try:
        asyncio.run(main())
    finally:
        router.close()


class _Counting:
    """The client's direct-send socket, counting the queries in each message it sends."""

    def __init__(self, sock, sent: list[int]) -> None:
        self._sock, self._sent = sock, sent

    def send_multipart(self, frames, *args, **kw):
        self._sent.append(len(frames) - 1)
        return self._sock.send_multipart(frames, *args, **kw)

    def __getattr__(self, name):
        return getattr(self._sock, name)
