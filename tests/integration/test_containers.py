"""The backend socket against replicas that lie, collide or crash (ketchd/containers.py):
Hello validation, replica identity, input types, fingerprints, cached answers that must not
outlive their replica, poison queries, unknown messages."""

from __future__ import annotations

import threading

import ketch
import numpy as np
import pytest
import zmq
from ketch import protocol as proto
from ketch.local import LocalModel, wait_for
from ketch.protocol import Status

pytestmark = pytest.mark.timeout(90)
F64 = proto.FLOAT64


class Raw:
    """A container speaking the protocol by hand."""

    def __init__(self, backend: str, replica_id: str = "raw-1", **fields) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(backend)
        self.fields = {
            "model": "m",
            "model_version": "1",
            "input": {"dtype": "FLOAT64", "shape": [-1]},
            "sdk": "test",
            "replica_id": replica_id,
            **fields,
        }

    def send(self, body: str, fields: dict) -> None:
        self.sock.send(proto.encode(body, fields))

    def recv(self, timeout_ms: int = 5000) -> list[bytes]:
        assert self.sock.poll(timeout_ms), "no message in time"
        return self.sock.recv_multipart()

    def hello(self, **fields) -> dict:
        self.send("Hello", {**self.fields, **fields})
        while True:
            doc = proto.to_dict(self.recv()[0])
            if doc["type"] in ("Welcome", "Error"):
                return doc

    def next_batch(self):
        while True:
            frames = self.recv()
            _, name, body = proto.decode(frames[0])
            if name == "PredictRequest":
                return proto.read_predict_request(body), frames[1:]

    def answer(self, request, payloads, value: float) -> None:
        outs = [(Status.OK, F64, (), 0, "")] * len(payloads)
        self.sock.send_multipart(
            [
                proto.build_predict_reply(request.batch_id, 10, outs),
                *[np.float64(value).tobytes()] * len(payloads),
            ]
        )

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def env(make_thread_broker, replica_threads):
    # dead only after 15 s: a replica thread stalled by a busy machine is not what is tested here
    tb = make_thread_broker(heartbeat_ms=100, dead_after_ms=15_000)
    admin = ketch.Admin(tb.admin)
    client = ketch.Client(tb.frontend)
    raws: list[Raw] = []

    def raw(**kw) -> Raw:
        r = Raw(tb.backend, **kw)
        raws.append(r)
        return r

    def serve(name: str, fn, **kw) -> ketch.Replica:
        return replica_threads(fn, backend=tb.backend, name=name, **kw)

    yield tb, admin, client, raw, serve
    for r in raws:
        r.close()
    client.close()
    admin.close()


BAD_HELLOS = {
    "empty name": {"model": ""},
    "5,000,000-character name": {"model": "m" * 5_000_000},
    "sql in the name": {"model": "'; DROP TABLE models;--"},
    "a path as the name": {"model": "../../etc/passwd"},
    "empty version": {"model_version": ""},
    "version with a space": {"model_version": "1 2"},
    "unknown dtype": {"input": {"dtype": 200, "shape": []}},
    "rank 40": {"input": {"dtype": "FLOAT64", "shape": [1] * 40}},
    "negative dimension": {"input": {"dtype": "FLOAT64", "shape": [-7]}},
    "text with a shape": {"input": {"dtype": "STRING", "shape": [3]}},
    "no input": {"input": None},
    "credits 5000": {"credits": 5000},
    "max_batch 2**31": {"max_batch": 2**31},
    "sdk with a newline": {"sdk": "python\nevil"},
    "replica id with a space": {"replica_id": "a b"},
    "replica id of 300 characters": {"replica_id": "r" * 300},
    "fingerprint of 200 characters": {"fingerprint": "f" * 200},
}


@pytest.mark.parametrize("case", list(BAD_HELLOS))
def test_a_hello_out_of_its_limits_is_refused_invalid_and_nothing_is_stored(env, case):
    _tb, admin, _, raw, _ = env
    r = raw()
    answer = r.hello(**BAD_HELLOS[case])
    assert answer["type"] == "Error" and answer["body"]["code"] == "INVALID", answer
    assert len(answer["body"]["message"]) < 500  # a 5 MB name is not echoed back
    assert admin.list_models() == [] and admin.replicas() == []
    assert r.hello()["type"] == "Welcome"  # the same connection, a valid Hello: let in


def test_a_live_replica_id_cannot_be_taken_over(env):
    _tb, admin, client, raw, _ = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=5000, models=["m"], cache=False)
    owner = raw(replica_id="same")
    assert owner.hello()["type"] == "Welcome"
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("p", client.predict("a", [5.0], timeout_ms=3000)))
    t.start()
    try:
        request, payloads = owner.next_batch()
        thief = raw(replica_id="same")
        refused = thief.hello()
        owner.answer(request, payloads, 7.0)  # still its work: answered, not discarded as late
    finally:
        t.join(10)
    assert refused["type"] == "Error" and refused["body"]["code"] == "CONFLICT"
    assert result["p"].output == 7.0
    assert [r["replica_id"] for r in admin.replicas("m")] == ["same"]
    assert admin.stats()["counters"].get("late_or_unknown_replies", 0) == 0


def test_a_replica_of_another_input_type_is_refused(env):
    _tb, admin, _, raw, _ = env
    assert raw(replica_id="r1").hello()["type"] == "Welcome"
    other = raw(replica_id="r2")
    refused = other.hello(input={"dtype": "INT64", "shape": [3]})
    assert refused["type"] == "Error" and refused["body"]["code"] == "CONFLICT"
    assert "input" in refused["body"]["message"]
    assert [r["replica_id"] for r in admin.replicas("m")] == ["r1"]
    assert other.hello()["type"] == "Welcome"  # the model's own type: let in


def test_a_redeploy_under_the_same_version_never_serves_the_old_codes_cached_answers(env):
    _tb, admin, client, _, serve = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    old = serve("m", lambda xs: [1.0 for _ in xs], replica_id="old")
    wait_for(lambda: admin.replicas("m"), 10, "the old code's replica")
    assert client.predict("a", [3.0]).output == 1.0  # cached
    old.stop()
    wait_for(lambda: not admin.replicas("m"), 10, "the old code gone")
    serve("m", lambda xs: [2.0 for _ in xs], replica_id="new")  # new code, same name and version
    wait_for(lambda: admin.replicas("m"), 10, "the new code's replica")
    assert client.predict("a", [3.0]).output == 2.0  # not the old code's cached 1.0


def test_other_code_under_a_live_version_is_refused_until_the_old_code_is_gone(env):
    tb, admin, client, _, serve = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    old = serve("m", lambda xs: [1.0 for _ in xs], replica_id="old", build_id="1")
    wait_for(lambda: admin.replicas("m"), 10, "the old code's replica")
    assert client.predict("a", [3.0]).output == 1.0  # cached
    new = serve("m", lambda xs: [2.0 for _ in xs], replica_id="new", build_id="2")
    wait_for(
        lambda: tb.broker.counters.get("hellos_refused"), 10, "the new code refused while the old serves"
    )
    assert [r["replica_id"] for r in admin.replicas("m")] == ["old"]
    assert client.predict("a", [3.0]).output == 1.0  # one code answers under one version
    old.stop()  # the old code goes: the new one is let in (it says Hello again after its backoff)
    wait_for(lambda: [r["replica_id"] for r in admin.replicas("m")] == ["new"], 15, "the new code's replica")
    assert client.predict("a", [3.0]).output == 2.0  # never the old code's cached 1.0
    shown = admin.show_model("m")["figures"]
    assert shown["fingerprints"] == {"1": "build:2"} and shown["fingerprint_changes"] == 1
    assert admin.replicas("m")[0]["fingerprint"] == "build:2"
    new.stop()


def test_a_replicas_cached_answers_leave_with_it(env):
    tb, admin, client, raw, serve = env
    admin.create_app("a", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    liar = raw(replica_id="liar")
    assert liar.hello()["type"] == "Welcome"
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("p", client.predict("a", [4.0], timeout_ms=10_000)))
    t.start()
    try:
        request, payloads = liar.next_batch()
        liar.answer(request, payloads, 999.0)  # a wrong answer, cached
    finally:
        t.join(30)
    assert result["p"].output == 999.0
    assert tb.broker.cache.bytes_used > 0
    liar.send("Goodbye", {"reason": "done lying"})
    wait_for(lambda: not admin.replicas("m"), 5, "the liar gone")
    assert tb.broker.cache.bytes_used == 0
    serve("m", lambda xs: [float(x[0]) for x in xs], replica_id="honest")
    wait_for(lambda: admin.replicas("m"), 10, "an honest replica")
    assert client.predict("a", [4.0]).output == 4.0


def test_unknown_message_types_are_unknown_message_not_bad_message(env):
    tb, *_ = env
    frontend = zmq.Context.instance().socket(zmq.DEALER)
    frontend.linger = 0
    frontend.connect(tb.frontend)
    try:
        for sock, address in ((frontend, "frontend"), (None, "backend")):
            s = sock
            if s is None:
                s = zmq.Context.instance().socket(zmq.DEALER)
                s.linger = 0
                s.connect(tb.backend)
            header = bytearray(proto.encode("Heartbeat", {}))
            at = header.index(proto.BODY_CODES["Heartbeat"].to_bytes(1, "little"), 8)
            header[at] = 99  # a body type of a later protocol release
            s.send(bytes(header))
            assert s.poll(5000), f"no answer on the {address}"
            doc = proto.to_dict(s.recv_multipart()[0])
            assert doc["type"] == "Error" and doc["body"]["code"] == "UNKNOWN_MESSAGE", (address, doc)
            if sock is None:
                s.close(linger=0)
    finally:
        frontend.close(linger=0)


def test_ready_out_of_range_is_refused(env):
    _tb, admin, _, raw, _ = env
    r = raw()
    assert r.hello(credits=2)["type"] == "Welcome"
    r.send("Ready", {"credits": 10**9})
    doc = proto.to_dict(r.recv()[0])
    assert doc["type"] == "Error" and doc["body"]["code"] == "INVALID"
    assert admin.replicas("m")[0]["credits"] == 2


POISON = """
import os
from pathlib import Path

def predict(xs):
    for x in xs:
        if float(x[0]) == 666.0:
            with open(os.environ["KETCH_POISON_LOG"], "a") as f:
                f.write("died\\n")
            os._exit(3)
    return [float(x[0]) for x in xs]
"""


def test_a_poison_query_kills_at_most_two_replicas(broker_process, start_model, tmp_path):
    target = tmp_path / "poison.py"
    target.write_text(POISON)
    deaths = tmp_path / "deaths.log"
    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        admin.create_app("p", input_type="float64", input_shape=[1], slo_ms=20000, default=-1.0, models=["p"])
        model: LocalModel = start_model(
            f"{target}:predict", "p", replicas=2, env={"KETCH_POISON_LOG": str(deaths)}
        )
        model.wait_ready(admin)
        results: dict[int, object] = {}

        def ask(i: int) -> None:
            with ketch.Client(broker_process.frontend) as c:
                results[i] = c.predict("p", [666.0])

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(3)]  # identical queries
        for t in askers:
            t.start()
        for t in askers:
            t.join(60)
        assert len(results) == 3 and all(r.default for r in results.values()), results
        assert "died" in results[0].default_explanation
        assert deaths.read_text().count("died") <= 2
        model.wait_ready(admin)
        assert client.predict("p", [1.0]).output == 1.0  # the model serves others again
        assert deaths.read_text().count("died") <= 2


def poison_among_16(broker_process, start_model, tmp_path) -> tuple[dict[int, dict], int]:
    """A message of 16 queries, the eighth a poison (it kills its replica), to two replicas
    of a model; returns the answers by request id and how many replicas died."""
    target = tmp_path / "poison.py"
    target.write_text(POISON)
    deaths = tmp_path / "deaths.log"
    with broker_process.admin_client() as admin:
        admin.create_app("p", input_type="float64", input_shape=[1], slo_ms=20000, default=-1.0, models=["p"])
        model: LocalModel = start_model(
            f"{target}:predict", "p", replicas=2, env={"KETCH_POISON_LOG": str(deaths)}
        )
        model.wait_ready(admin)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(broker_process.frontend)
    try:  # one message: the poison and 15 others, batched with it
        xs = [666.0 if i == 8 else float(i) for i in range(1, 17)]
        sock.send_multipart(
            [
                proto.build_query("p", proto.FLOAT64, [1], list(range(1, 17))),
                *[np.float64(x).tobytes() for x in xs],
            ]
        )
        got: dict[int, dict] = {}
        while len(got) < 16:
            assert sock.poll(60_000), f"answers so far: {got}"
            for item in proto.to_dict(sock.recv_multipart()[0])["body"]["items"]:
                assert item["request_id"] not in got, "answered twice"
                got[item["request_id"]] = item
    finally:
        sock.close()
    assert got[8]["status"] == "DEFAULT" and "died" in got[8]["message"], got[8]
    not_served = {rid: item["message"] for rid, item in got.items() if rid != 8 and item["status"] != "OK"}
    assert not not_served, not_served
    return got, deaths.read_text().count("died")


@pytest.mark.broker_args("--requeue-alone-ms", "1e9")
def test_the_queries_batched_with_a_poison_query_are_served(broker_process, start_model, tmp_path):
    # sent back one by one: the poison is found on the second death
    _, deaths = poison_among_16(broker_process, start_model, tmp_path)
    assert 1 <= deaths <= 2


@pytest.mark.broker_args("--requeue-alone-ms", "0")
def test_queries_sent_back_together_with_a_poison_are_served_and_it_kills_at_most_three(
    broker_process, start_model, tmp_path
):
    # sent back together (as a replica lost to a kill would have them): the batch of
    # suspects dies too, then each goes alone, and the poison is found on the third death
    _, deaths = poison_among_16(broker_process, start_model, tmp_path)
    assert 1 <= deaths <= 3


def test_the_models_and_replicas_a_backend_can_make_the_broker_hold_are_bounded(make_thread_broker):
    tb = make_thread_broker(max_models=2, max_replicas=3)
    raws = [Raw(tb.backend, replica_id=f"r{i}") for i in range(5)]
    try:
        assert raws[0].hello(model="m1")["type"] == "Welcome"
        assert raws[1].hello(model="m2")["type"] == "Welcome"
        refused = raws[2].hello(model="m3")  # a third model
        assert refused["body"]["code"] == "CONFLICT" and "at most 2" in refused["body"]["message"]
        assert raws[2].hello(model="m1")["type"] == "Welcome"  # a known model: let in
        refused = raws[3].hello(model="m2")  # a fourth replica
        assert refused["body"]["code"] == "CONFLICT" and "replicas connected" in refused["body"]["message"]
        raws[0].send("Goodbye", {"reason": "room for another"})
        wait_for(lambda: raws[3].hello(model="m2")["type"] == "Welcome", 5, "room again")
    finally:
        for r in raws:
            r.close()
