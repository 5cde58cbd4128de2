"""Version negotiation against the real broker (docs/protocol.md section 3).

A container written by hand plays peers of three versions: one of a version 3 this schema
does not know (it offers [1, 2, 3], appends fields to its tables and sends a message type
past the last union member), a version-1 container (its Hello names no versions) and one
that speaks only version 3. The broker, which speaks 1 and 2, chooses 2, 1 and refuses.
"""

from __future__ import annotations

import threading

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import wait_for
from ketch.protocol import Status
from structlog.testing import capture_logs

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def encode_newer(make_vectors):
    """schemas/make_vectors.py's encoder of a newer peer's messages."""
    return make_vectors.encode_newer


class Peer:
    """A container's DEALER driven frame by frame; ``versions`` None sends a version-1 Hello."""

    def __init__(self, backend: str, name: str, versions: list[int] | None, encode_newer=None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(backend)
        self.name, self.versions, self.encode_newer = name, versions, encode_newer

    def hello(self) -> dict:
        fields = {
            "model": self.name,
            "model_version": "1",
            "input": {"dtype": "FLOAT64", "shape": [-1]},
            "sdk": "test/newer" if self.encode_newer else "test",
            "replica_id": f"{self.name}-0",
        }
        if self.versions is not None:
            fields["versions"] = self.versions
        if self.encode_newer:  # stamped with the lowest version offered, a field appended
            lowest = min(self.versions or [1])
            header = self.encode_newer("Hello", fields, version=lowest, extra={"Hello": [99]})
        else:
            header = proto.encode("Hello", fields)
        self.sock.send(header)
        return self.recv()

    def recv(self, timeout_ms: int = 10_000) -> dict:
        """The next message but heartbeats, as {"type", "version", "body", "payloads"}."""
        while True:
            assert self.sock.poll(timeout_ms), "no message from the broker in time"
            header, *payloads = self.sock.recv_multipart()
            msg = proto.to_dict(header)
            if msg["type"] != "Heartbeat":
                return {**msg, "payloads": payloads}

    def close(self) -> None:
        self.sock.close(linger=0)


def _sums(payloads: list[bytes]) -> list[bytes]:
    return [np.float64(np.frombuffer(p, "<f8").sum()).tobytes() for p in payloads]


def test_a_newer_container_chooses_2_and_is_served_through_what_it_adds(thread_broker, encode_newer):
    peer = Peer(thread_broker.backend, "newer", [1, 2, 3], encode_newer)
    try:
        welcome = peer.hello()
        assert (welcome["type"], welcome["version"], welcome["body"]["version"]) == ("Welcome", 1, 2)
        with ketch.Admin(thread_broker.admin) as admin:
            admin.create_app("newer", input_type="float64", input_shape=[-1], slo_ms=5000, models=["newer"])
            (replica,) = admin.replicas("newer")
            assert (replica["protocol"], replica["sdk"]) == (2, "test/newer")
        # a heartbeat of version 2 with a field appended: taken silently
        peer.sock.send(encode_newer("Heartbeat", {"busy": False}, version=2, extra={"Heartbeat": [5]}))
        # a message type this broker does not know, of a version it speaks
        peer.sock.send(encode_newer("Heartbeat", {}, version=2, body_type=200))
        error = peer.recv()
        assert (error["type"], error["body"]["code"]) == ("Error", "UNKNOWN_MESSAGE")
        # a message of version 3
        peer.sock.send(encode_newer("Heartbeat", {}, version=3))
        error = peer.recv()
        assert (error["type"], error["body"]["code"]) == ("Error", "UNSUPPORTED_VERSION")
        assert "speaks 1, 2" in error["body"]["message"]

        # still registered: real queries, answered through replies with fields appended
        rng = np.random.default_rng()
        xs = [rng.normal(size=int(n)) for n in rng.integers(1, 6, size=5)]
        answers: list = []
        with ketch.Client(thread_broker.frontend) as client:
            asking = threading.Thread(target=lambda: answers.extend(client.predict_many("newer", xs)))
            asking.start()
            served = 0
            while served < len(xs):
                batch = peer.recv()
                assert batch["type"] == "PredictRequest"
                body, payloads = batch["body"], batch["payloads"]
                outputs = [{"status": "OK", "output": {"dtype": "FLOAT64"}} for _ in payloads]
                reply = encode_newer(
                    "PredictReply",
                    {"batch_id": body["batch_id"], "compute_us": 7, "outputs": outputs},
                    version=1,
                    extra={"PredictReply": [1, 2], "Output": [3], "Tensor": [4]},
                )
                peer.sock.send_multipart([reply, *_sums(payloads)])
                served += len(payloads)
            asking.join(10)
        assert [float(a.output) for a in answers] == pytest.approx([float(x.sum()) for x in xs])
        assert all(a.model == "newer" and not a.default for a in answers)

        # version 2's drain: Ready{0} is answered with Paused
        peer.sock.send(proto.encode("Ready", {"credits": 0}))
        paused = peer.recv()
        assert (paused["type"], paused["version"], paused["body"]) == ("Paused", 2, {"inflight": 0})
        peer.sock.send(proto.encode("Goodbye", {"reason": "drained"}))
        with ketch.Admin(thread_broker.admin) as admin:
            wait_for(lambda: not admin.replicas("newer"), 10, "the replica to leave")
    finally:
        peer.close()


def test_a_version_1_container_keeps_working_and_never_gets_a_paused(thread_broker, encode_newer):
    peer = Peer(thread_broker.backend, "v1", None)
    try:
        welcome = peer.hello()
        assert (welcome["type"], welcome["body"]["version"]) == ("Welcome", 1)
        with ketch.Admin(thread_broker.admin) as admin, ketch.Client(thread_broker.frontend) as client:
            admin.create_app("v1", input_type="float64", input_shape=[-1], slo_ms=5000, models=["v1"])
            assert admin.replicas("v1")[0]["protocol"] == 1
            answer: list = []
            asking = threading.Thread(target=lambda: answer.append(client.predict("v1", [1.0, 2.5])))
            asking.start()
            batch = peer.recv()
            assert batch["type"] == "PredictRequest" and batch["version"] == 1
            outs = [(Status.OK, proto.FLOAT64, (), 0, "") for _ in batch["payloads"]]
            peer.sock.send_multipart(
                [proto.build_predict_reply(batch["body"]["batch_id"], 10, outs), *_sums(batch["payloads"])]
            )
            asking.join(10)
            assert float(answer[0].output) == 3.5
        # Ready{0}, then a message that gets an Error: had a Paused been sent, it would come first
        peer.sock.send(proto.encode("Ready", {"credits": 0}))
        peer.sock.send(encode_newer("Heartbeat", {}, version=1, body_type=200))
        nxt = peer.recv()
        assert (nxt["type"], nxt["body"]["code"]) == ("Error", "UNKNOWN_MESSAGE"), nxt
    finally:
        peer.close()


def test_a_container_of_versions_the_broker_does_not_speak_is_refused(thread_broker, encode_newer):
    peer = Peer(thread_broker.backend, "v3only", [3, 4], encode_newer)
    try:
        refusal = peer.hello()  # stamped 3: refused for the stamp
        assert (refusal["type"], refusal["body"]["code"]) == ("Error", "UNSUPPORTED_VERSION")
        # a Hello stamped 1 that offers only [3, 4]: refused for what it offers
        peer.sock.send(
            proto.encode(
                "Hello",
                {"model": "v3only", "model_version": "1", "input": {"dtype": "FLOAT64"}, "versions": [3, 4]},
            )
        )
        refusal = peer.recv()
        assert (refusal["type"], refusal["body"]["code"]) == ("Error", "UNSUPPORTED_VERSION")
        assert "3, 4" in refusal["body"]["message"] and "speaks 1, 2" in refusal["body"]["message"]
        with ketch.Admin(thread_broker.admin) as admin:
            assert all(r["model"] != "v3only" for r in admin.replicas())
    finally:
        peer.close()


def test_a_python_replica_negotiates_2_and_ends_its_drain_on_paused(thread_broker, replica_threads):
    def total(xs):
        return [float(x.sum()) for x in xs]

    replica = replica_threads(total, backend=thread_broker.backend, name="py2")
    with ketch.Admin(thread_broker.admin) as admin, ketch.Client(thread_broker.frontend) as client:
        admin.create_app("py2", input_type="float64", input_shape=[-1], slo_ms=5000, models=["py2"])
        wait_for(lambda: admin.replicas("py2"), 10, "the replica")
        assert admin.replicas("py2")[0]["protocol"] == 2
        assert float(client.predict("py2", [2.0, 3.0]).output) == 5.0
        assert replica.protocol == 2
        with capture_logs() as logs:
            replica.stop()
            wait_for(lambda: not admin.replicas("py2"), 10, "the replica to leave")
            wait_for(lambda: any(e["event"] == "replica stopped" for e in logs), 10, "its last line")
        (stopped,) = [e for e in logs if e["event"] == "replica stopped"]
        assert stopped["drained_on"] == "paused"
