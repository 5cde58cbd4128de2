"""Shared fixtures: real brokers and replicas on free loopback ports, cleaned up by pid.

Every socket a test opens is closed with linger 0; the zmq context of the test process
must terminate at the end of the session (a leaked socket fails the run instead of
hanging it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import zmq
from ketch import Replica
from ketch.local import Endpoints, LocalBroker, LocalModel
from ketchd import Broker, BrokerConfig

# every broker a test starts as a process (ketchd, ketch broker start, ketch serve, ketch up)
# serves its /metrics on a free port, not on the default one another broker may hold
os.environ.setdefault("KETCH_METRICS", "127.0.0.1:0")
# this process makes gRPC channels and starts processes (fork, then exec): gRPC's fork
# handlers are for a fork without exec, and with them a channel's constructor hung for
# 90 s once in a loaded run (grpc/grpc#37710; Apache Beam's tests turn them off too)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


@pytest.fixture(scope="session", autouse=True)
def _zmq_context_terminates() -> Iterator[None]:
    yield
    ctx = zmq.Context.instance()
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    threading.Thread(target=term, daemon=True).start()
    assert done.wait(10), "zmq context did not terminate: a socket was left open"


@pytest.fixture(scope="session")
def make_vectors() -> ModuleType:
    """schemas/make_vectors.py as a module: its ``encode_newer`` writes messages as a peer of
    a newer protocol version would (fields appended, message types this schema lacks)."""
    path = Path(__file__).resolve().parents[1] / "schemas" / "make_vectors.py"
    spec = importlib.util.spec_from_file_location("make_vectors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ThreadBroker(Endpoints):
    """A Broker running on a thread of the test process (fast, same real sockets)."""

    def __init__(self, **overrides) -> None:
        cfg = BrokerConfig(
            frontend="tcp://127.0.0.1:*",
            backend="tcp://127.0.0.1:*",
            admin="tcp://127.0.0.1:*",
            metrics=overrides.pop("metrics", None),  # a test that scrapes asks for "127.0.0.1:0"
            state_path=overrides.pop("state_path", ":memory:"),
            **overrides,
        )
        self.broker = Broker(cfg)
        self.endpoints = self.broker.bind()
        self.thread = threading.Thread(target=self.broker.run, name="test-broker", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.broker.request_stop("test over")
        self.thread.join(10)
        assert not self.thread.is_alive(), "broker thread did not stop"


@contextlib.contextmanager
def _replica_threads() -> Iterator:
    """``start(model, backend=..., name=..., **kw)`` starts a ``ketch.Replica`` thread; all
    are stopped (drained) on leaving."""
    started: list[tuple[Replica, threading.Thread]] = []

    def start(model, *, backend: str, name: str = "m", **kw) -> Replica:
        r = Replica(model, name=name, broker=backend, **kw)
        t = threading.Thread(target=r.run, name=f"replica-{name}", daemon=True)
        t.start()
        started.append((r, t))
        return r

    try:
        yield start
    finally:
        for r, t in started:
            r.stop()
            t.join(5)


@pytest.fixture
def replica_threads() -> Iterator:
    """Start ``ketch.Replica`` threads: ``start(model, backend=..., name=..., **kw)``; all are
    stopped (drained) at the end."""
    with _replica_threads() as start:
        yield start


@pytest.fixture(scope="module")
def module_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """One broker process for a whole test module (the gateway's). Its replicas are threads
    of the test process, which hypothesis can keep busy: one is declared dead only after 10 s
    of silence (no test of such a module is about death)."""
    broker = LocalBroker(
        state_path=str(tmp_path_factory.mktemp("module-broker") / "state.db"),
        extra_args=["--heartbeat-ms", "200", "--dead-after-ms", "10000"],
    )
    broker.start()
    yield broker
    broker.stop()
    broker._tmp.cleanup()


@pytest.fixture(scope="module")
def module_replicas(module_broker: LocalBroker) -> Iterator:
    """Start ``ketch.Replica`` threads on ``module_broker``: ``start(model, name, **kw)``
    (replica id ``NAME/N`` unless given); all are stopped (drained) at the module's end."""
    count = itertools.count()
    with _replica_threads() as start_thread:

        def start(model, name: str, **kw) -> Replica:
            kw.setdefault("replica_id", f"{name}/{next(count)}")
            return start_thread(model, backend=module_broker.backend, name=name, **kw)

        yield start


@pytest.fixture
def thread_broker(request: pytest.FixtureRequest) -> Iterator[ThreadBroker]:
    """A replica silent for 10 s is declared dead: a busy machine can hold a replica thread's
    heartbeats for a second or more, and a replica declared dead has its batch sent again
    (which changes what a test counts). A test of silence itself asks for less with
    ``@pytest.mark.dead_after_ms(1000)``."""
    marker = request.node.get_closest_marker("dead_after_ms")
    tb = ThreadBroker(heartbeat_ms=100, dead_after_ms=marker.args[0] if marker else 10_000)
    yield tb
    tb.stop()


@pytest.fixture
def make_thread_broker() -> Iterator:
    """A factory of ThreadBrokers with given settings; all are stopped at the end."""
    made: list[ThreadBroker] = []

    def make(**overrides) -> ThreadBroker:
        tb = ThreadBroker(**overrides)
        made.append(tb)
        return tb

    yield make
    for tb in made:
        tb.stop()


@pytest.fixture
def broker_process(tmp_path, request: pytest.FixtureRequest) -> Iterator[LocalBroker]:
    """A broker process; a replica silent for 1.5 s is declared dead. A test whose replica
    processes (a JVM, R) may stall that long on a busy machine, and which is not about
    silence, asks for more with ``@pytest.mark.dead_after_ms(15_000)``; other options with
    ``@pytest.mark.broker_args(...)``."""
    marker = request.node.get_closest_marker("dead_after_ms")
    more = request.node.get_closest_marker("broker_args")
    broker = LocalBroker(
        state_path=str(tmp_path / "state.db"),
        extra_args=[
            *("--heartbeat-ms", "200", "--dead-after-ms", str(marker.args[0] if marker else 1500)),
            *(more.args if more else ()),
        ],
    )
    broker.start()
    yield broker
    broker.stop()
    broker._tmp.cleanup()


@pytest.fixture
def start_model(broker_process, tmp_path) -> Iterator:
    """Start ``ketch model serve`` process groups; all are stopped at the end."""
    started: list[LocalModel] = []

    def start(target: str, name: str, **kw) -> LocalModel:
        kw.setdefault("log_path", str(tmp_path / f"model-{name}-{len(started)}.log"))
        model = LocalModel(
            target, name, backend=broker_process.backend, admin=broker_process.admin, **kw
        ).start()
        started.append(model)
        return model

    yield start
    for model in started:
        model.stop()


class RawClient:
    """A frontend DEALER speaking the protocol by hand: queries of any shape (ids, contexts,
    sizes a real client would never send), and every answer counted per request id."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.rcvhwm = self.sock.sndhwm = 0
        self.sock.connect(address)
        self.items: dict[int, list[dict]] = {}  # request id -> every answer for it
        self.errors: list[dict] = []  # message-level Errors

    def query(self, app: str, payloads: list, ids: list[int], dtype: int, shape=(), **kw) -> None:
        from ketch import protocol as proto

        self.sock.send_multipart([proto.build_query(app, dtype, shape, ids, **kw), *payloads], copy=False)

    def send(self, frames: list) -> None:
        self.sock.send_multipart(frames, copy=False)

    def take(self, timeout_s: float = 0.0) -> int:
        """Read what arrives within ``timeout_s`` (at least what is waiting); messages read."""
        import time

        from ketch import protocol as proto

        end, n = time.monotonic() + timeout_s, 0
        while True:
            left = max(0, int((end - time.monotonic()) * 1000))
            if not self.sock.poll(left):
                return n
            frames = self.sock.recv_multipart()
            n += 1
            doc = proto.to_dict(frames[0])
            if doc["type"] == "Error":
                self.errors.append(doc["body"])
                continue
            for item, payload in zip(doc["body"]["items"], frames[1:], strict=True):
                self.items.setdefault(item["request_id"], []).append({**item, "payload": payload})

    def wait(self, ids, timeout_s: float = 10.0) -> dict[int, dict]:
        """The first answer of each of ``ids``, waiting for them (TimeoutError if any is missing)."""
        import time

        end = time.monotonic() + timeout_s
        while not all(rid in self.items for rid in ids):
            if time.monotonic() > end:
                missing = [rid for rid in ids if rid not in self.items]
                raise TimeoutError(f"no answer for {len(missing)} of {len(ids)} request ids")
            self.take(0.05)
        return {rid: self.items[rid][0] for rid in ids}

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw_client() -> Iterator:
    """``raw_client(address)``: a RawClient, closed at the end."""
    made: list[RawClient] = []

    def make(address: str) -> RawClient:
        c = RawClient(address)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
