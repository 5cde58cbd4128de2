"""The practical limit: a raw pyzmq two-hop relay of the same shape as the broker path.

    client DEALER -> relay (ROUTER front, ROUTER back) -> DEALER echo worker

No decoding anywhere: the relay forwards frames, the worker echoes them. Started as two
processes by ``RawRelay``; ``python -m perf.relay`` measures it alone.
"""

from __future__ import annotations

import multiprocessing as mp
import sys

import zmq


def _relay(front_port: int, back_port: int, ready) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    for s in (front, back):
        s.linger = 0
        s.sndhwm = s.rcvhwm = 100_000
    front.bind(f"tcp://127.0.0.1:{front_port}")
    back.bind(f"tcp://127.0.0.1:{back_port}")
    ready.set()
    worker = None
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            frames = sock.recv_multipart(copy=False)
            if sock is back:
                if worker is None or (len(frames) == 2 and frames[1].bytes == b"hi"):
                    worker = frames[0].bytes
                    continue
                # [worker, client, payload...] -> [client, payload...]
                front.send_multipart(frames[1:], copy=False)
            elif worker is not None:
                back.send_multipart([worker, *frames], copy=False)


def _echo(back_port: int) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.sndhwm = s.rcvhwm = 100_000
    s.connect(f"tcp://127.0.0.1:{back_port}")
    s.send(b"hi")
    while True:
        s.send_multipart(s.recv_multipart(copy=False), copy=False)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RawRelay:
    """Context manager running the relay and the echo worker as processes."""

    def __enter__(self) -> RawRelay:
        front, back = _free_port(), _free_port()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.procs = [ctx.Process(target=_relay, args=(front, back, ready), daemon=True)]
        self.procs[0].start()
        if not ready.wait(20):
            raise RuntimeError("relay did not start")
        self.procs.append(ctx.Process(target=_echo, args=(back,), daemon=True))
        self.procs[1].start()
        self.address = f"tcp://127.0.0.1:{front}"
        # wait until a round trip works
        c = zmq.Context.instance().socket(zmq.DEALER)
        c.linger = 0
        c.connect(self.address)
        try:
            for _ in range(200):
                c.send(b"ping")
                if c.poll(100):
                    c.recv_multipart()
                    break
            else:
                raise RuntimeError("relay does not answer")
            while c.poll(50):
                c.recv_multipart()
        finally:
            c.close()
        return self

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
            p.join(5)


if __name__ == "__main__":
    from perf.roundtrip import main

    sys.exit(main())
