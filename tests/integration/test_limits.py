"""What one message and one client may cost the broker (ketchd/limits.py): every limit refused
at once with a clear error, a legitimate client served meanwhile."""

from __future__ import annotations

import threading

import ketch
import numpy as np
import pytest
from ketch import protocol as proto
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(90)
U8 = proto.DType.UINT8
F64 = proto.FLOAT64
MIB = 1024 * 1024


@pytest.fixture
def env(make_thread_broker, replica_threads):
    def make(**overrides):
        # dead only after 15 s: a replica thread stalled by a busy machine is not what is tested here
        tb = make_thread_broker(heartbeat_ms=100, dead_after_ms=15_000, **overrides)
        admin = ketch.Admin(tb.admin)
        client = ketch.Client(tb.frontend)
        made.append((admin, client))

        def serve(name: str, fn, **kw) -> ketch.Replica:
            r = replica_threads(fn, backend=tb.backend, name=name, replica_id=f"{name}-r", **kw)
            wait_for(lambda: admin.replicas(name), 10, f"replica of {name}")
            return r

        return tb, admin, client, serve

    made: list = []
    yield make
    for admin, client in made:
        client.close()
        admin.close()


def lengths(xs):
    return [len(x) for x in xs]


def test_a_message_over_the_limit_with_all_its_frames_is_refused_per_request_id(env, raw_client):
    tb, admin, client, serve = env(max_message_bytes=MIB)
    admin.create_app("b", input_type="uint8", input_shape=[-1], slo_ms=2000, models=["m"])
    serve("m", lengths)
    raw = raw_client(tb.frontend)
    frames = [bytes(600 * 1024)] * 3  # each frame under the limit, the message over it
    raw.query("b", frames, [1, 2, 3], U8, (600 * 1024,))
    answers = raw.wait([1, 2, 3])
    assert {a["error"] for a in answers.values()} == {"TOO_LARGE"}
    assert "at most 1.0 MiB" in answers[1]["message"]
    assert client.predict("b", np.zeros(1000, np.uint8)).output == 1000  # served meanwhile
    assert admin.stats()["counters"]["refused_too_large"] == 1


def test_a_message_of_too_many_frames_is_refused_without_holding_them(env, raw_client):
    tb, admin, client, serve = env(max_message_items=64)
    admin.create_app("b", input_type="uint8", input_shape=[-1], slo_ms=2000, models=["m"])
    serve("m", lengths)
    raw = raw_client(tb.frontend)
    raw.send([proto.build_query("b", U8, (1,), [7]), *[b"x"] * 20_000])
    raw.take(5)
    assert raw.errors == [] and raw.items[7][0]["error"] == "TOO_LARGE"
    assert "frames" in raw.items[7][0]["message"]
    assert client.predict("b", np.zeros(3, np.uint8)).output == 3


def test_a_query_naming_too_many_ids_gets_one_error_not_one_per_id(env, raw_client):
    tb, admin, client, serve = env()
    admin.create_app("b", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    serve("m", lambda xs: [1.0 for _ in xs])
    raw = raw_client(tb.frontend)
    raw.query("b", [np.ones(1).tobytes()], list(range(1, 200_001)), F64, (1,))
    assert client.predict("b", [1.0]).output == 1.0  # the legitimate client is served
    raw.take(1.0)
    assert raw.items == {} and len(raw.errors) == 1
    assert raw.errors[0]["code"] == "TOO_LARGE" and "200000 request ids" in raw.errors[0]["message"]


@pytest.mark.parametrize(
    ("field", "why"),
    [("context", "context of 4194304 bytes"), ("app", "app name of 1048576 bytes")],
)
def test_a_query_field_over_its_limit_is_bad_input_and_never_learnt(env, raw_client, field, why):
    tb, admin, client, serve = env()
    admin.create_app("b", input_type="float64", input_shape=[1], slo_ms=2000, models=["m"])
    serve("m", lambda xs: [1.0 for _ in xs])
    raw = raw_client(tb.frontend)
    learnt = tb.broker.admission.queries.count
    kw = {"context": "c" * 4 * MIB} if field == "context" else {}
    app = "b" if field == "context" else "a" * MIB
    for i in range(5):
        raw.query(app, [np.ones(1).tobytes()], [100 + i], F64, (1,), **kw)
    answers = raw.wait([100 + i for i in range(5)])
    assert all(a["error"] == "BAD_INPUT" and why in a["message"] for a in answers.values())
    assert max(len(a["message"]) for a in answers.values()) < 300  # the field is not echoed
    assert tb.broker.admission.queries.count == learnt  # no template holds it
    assert client.predict("b", [1.0]).output == 1.0


def test_an_unknown_app_names_a_few_apps_not_all(env, raw_client):
    tb, admin, _client, _serve = env()
    for i in range(30):
        admin.create_app(f"app{i:02d}", input_type="float64", input_shape=[1], slo_ms=100)
    raw = raw_client(tb.frontend)
    raw.query("nope", [np.ones(1).tobytes()], [5], F64, (1,))
    message = raw.wait([5])[5]["message"]
    assert "app09" in message and "app10" not in message and "and 20 more" in message


def test_one_clients_held_bytes_are_bounded_and_come_back(env, raw_client):
    tb, admin, _client, serve = env(max_client_bytes=MIB)
    admin.create_app("b", input_type="uint8", input_shape=[-1], slo_ms=5000, models=["m"], cache=False)
    go = threading.Event()

    def held(xs):
        go.wait(10)
        return lengths(xs)

    serve("m", held)
    size = 400 * 1024
    greedy, other = raw_client(tb.frontend), raw_client(tb.frontend)
    try:
        for rid in (1, 2, 3):  # 1.2 MiB in all: the third is over this client's bound
            greedy.query("b", [bytes(size)], [rid], U8, (size,))
        refused = greedy.wait([3])[3]
        assert refused["error"] == "OVERLOADED" and refused["retry_after_ms"] > 0
        assert "hold 800.0 KiB of payloads (at most 1.0 MiB)" in refused["message"]
        other.query("b", [bytes(size)], [9], U8, (size,))  # another client has its own bound
        wait_for(lambda: tb.broker.held_bytes == 3 * size, 5, "the other client's query held")
    finally:
        go.set()
    assert [greedy.wait([1, 2])[r]["status"] for r in (1, 2)] == ["OK", "OK"]
    assert other.wait([9])[9]["status"] == "OK"
    wait_for(lambda: tb.broker.held_bytes == 0 and not tb.broker.client_bytes, 5, "held bytes released")
    greedy.query("b", [bytes(size)], [4], U8, (size,))  # taken again once its others are answered
    assert greedy.wait([4])[4]["status"] == "OK"


def test_feedback_payloads_over_the_limit_are_too_large(env):
    _tb, admin, client, serve = env(max_label_bytes=1024)
    admin.create_app("e", input_type="float64", input_shape=[1], slo_ms=2000, models=["a", "b"])
    admin.set_policy("e", "exp3")
    serve("a", lambda xs: ["x" for _ in xs])
    serve("b", lambda xs: ["x" for _ in xs])
    pred = client.predict("e", [1.0])
    with pytest.raises(ketch.errors.TooLarge):
        client.feedback("e", "y" * 5000, query_id=pred.request_id)
    client.feedback("e", "x", query_id=pred.request_id)
