"""The admin socket against mistyped, malformed and hostile messages.

Every admin message gets exactly one answer: a result, or an error code with a message
that names what is wrong. A user's mistake (``slo_ms='abc'``, ``input_shape=['a']``, a
fraction for a count, an unknown argument) is INVALID, never silence and never INTERNAL;
the broker keeps serving queries throughout.
"""

from __future__ import annotations

import json

import ketch
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(120)


class RawAdmin:
    """A DEALER on the admin socket that sends any bytes and waits (bounded) for the answer."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(address)
        self.n = 0

    def send_raw(self, raw: bytes) -> dict:
        self.sock.send(raw)
        assert self.sock.poll(5000), f"no answer to {raw[:100]!r}"
        return json.loads(self.sock.recv())

    def call(self, op: str, **args) -> dict:
        self.n += 1
        reply = self.send_raw(json.dumps({"id": self.n, "op": op, "args": args}).encode())
        assert reply["id"] == self.n
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def env(make_thread_broker, replica_threads):
    tb = make_thread_broker(heartbeat_ms=100, dead_after_ms=10_000)
    raw = RawAdmin(tb.admin)
    admin = ketch.Admin(tb.admin)
    admin.create_app("ok", input_type="float64", input_shape=[2], slo_ms=10_000, models=["m"])
    replica_threads(lambda xs: [float(np.sum(x)) for x in xs], backend=tb.backend, name="m")
    wait_for(lambda: admin.replicas("m"), 10, "the replica of m")
    client = ketch.Client(tb.frontend)
    yield tb, raw, admin, client
    client.close()
    admin.close()
    raw.close()


def invalid(reply: dict, *needles: str) -> None:
    assert not reply["ok"], reply
    assert reply["error"]["code"] == "INVALID", reply
    for needle in needles:
        assert needle in reply["error"]["message"], (needle, reply)


MISTYPED = [
    ("app.create", {"name": "a", "input_type": "float64", "slo_ms": "abc"}, "slo_ms"),
    ("app.create", {"name": "a", "input_type": "float64", "slo_ms": True}, "slo_ms"),
    ("app.create", {"name": "a", "input_type": "float64", "slo_ms": [5]}, "slo_ms"),
    ("app.create", {"name": "a", "input_type": "float64", "slo_ms": 10**400}, "slo_ms"),
    ("app.create", {"name": "a", "input_type": "float64", "slo_ms": -1}, "slo_ms"),
    ("app.create", {"name": "a", "input_type": "float64", "input_shape": ["a"]}, "input_shape[0]"),
    ("app.create", {"name": "a", "input_type": "float64", "input_shape": [1.5]}, "input_shape[0]"),
    ("app.create", {"name": "a", "input_type": "float64", "input_shape": 4}, "input_shape"),
    ("app.create", {"name": "a", "input_type": "float64", "input_shape": [2**40]}, "input shape"),
    ("app.create", {"name": "a", "input_type": "float64", "input_shape": [1] * 33}, "dimensions"),
    ("app.create", {"name": "a", "input_type": "float64", "input_shape": [0]}, "input shape"),
    ("app.create", {"name": "a", "input_type": 7}, "input_type"),
    ("app.create", {"name": "a", "input_type": "complex128"}, "complex128"),
    ("app.create", {"name": "a", "input_type": "float64", "models": "m"}, "models"),
    ("app.create", {"name": "a", "input_type": "float64", "models": [1]}, "models[0]"),
    ("app.create", {"name": "a", "input_type": "float64", "models": ["m"] * 300}, "at most"),
    ("app.create", {"name": "a", "input_type": "float64", "cache": "no"}, "cache"),
    ("app.create", {"name": "a", "input_type": "float64", "finite_only": 1}, "finite_only"),
    ("app.create", {"name": "a", "input_type": "float64", "has_default": "yes"}, "has_default"),
    ("app.create", {"name": "a", "input_type": "float64", "default": float("nan")}, "NaN"),
    (
        "app.create",
        {
            "name": "a",
            "input_type": "float64",
            "default": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[0]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
        },
        "deeper",
    ),
    ("app.create", {"name": ["a"], "input_type": "float64"}, "name"),
    ("app.create", {"name": "a" * 200, "input_type": "float64"}, "1-128"),
    ("app.create", {"name": "'; DROP TABLE apps;--", "input_type": "float64"}, "letters"),
    ("app.create", {"input_type": "float64"}, "missing argument 'name'"),
    ("app.create", {"name": "a", "input_type": "float64", "unknown": 1}, "unknown argument 'unknown'"),
    ("app.configure", {"name": "ok", "slo_ms": "x"}, "slo_ms"),
    ("app.configure", {"name": "ok", "cache": "off"}, "cache"),
    ("app.configure", {"name": {"a": 1}}, "name"),
    ("app.show", {"name": 5}, "name"),
    ("app.show", {}, "missing"),
    ("app.delete", {"name": [1]}, "name"),
    ("app.link", {"app": "ok", "model": 5}, "model"),
    ("app.link", {"app": "ok", "model": "../../etc/passwd"}, "letters"),
    ("app.unlink", {"app": "ok", "model": [1]}, "model"),
    ("app.set_policy", {"name": "ok", "policy": 5}, "policy"),
    ("app.set_policy", {"name": "ok", "policy": "exp3", "options": [1]}, "options"),
    ("app.set_policy", {"name": "ok", "policy": "exp3", "options": {"gamma": "x"}}, "gamma"),
    ("app.set_policy", {"name": "ok", "policy": "exp3", "options": {"rng": 1}}, "rng"),
    ("app.set_policy", {"name": "ok", "policy": "exp3", "options": {"gamma": float("inf")}}, "NaN"),
    ("app.set_policy", {"name": "ok", "policy": "weighted", "options": {"weights": {"m": "x"}}}, "weights"),
    ("app.set_policy", {"name": "ok", "policy": "nope"}, "unknown policy"),
    ("model.show", {"name": 5}, "name"),
    ("model.set_version", {"name": "m", "version": {"a": 1}}, "version"),
    ("model.set_version", {"name": "m", "version": None}, "version"),
    ("model.configure", {"name": "m", "max_batch": "x"}, "max_batch"),
    ("model.configure", {"name": "m", "max_batch": 1.5}, "max_batch"),
    ("model.configure", {"name": "m", "max_batch": 10**30}, "max_batch"),
    ("model.configure", {"name": "m", "max_batch": -1}, "max_batch"),
    ("model.configure", {"name": "m", "max_queue": [1]}, "max_queue"),
    ("model.configure", {"name": "m", "max_queue": 10**9}, "max_queue"),
    ("model.configure", {"name": "m", "batch_delay_ms": "x"}, "batch_delay_ms"),
    ("model.configure", {"name": "m", "batch_delay_ms": 1e9}, "batch_delay_ms"),
    ("model.configure", {"name": "m", "batching": ["x"]}, "batching"),
    ("model.configure", {"name": "m", "batching": "lifo"}, "batching"),
    ("model.configure", {"name": "m", "create": "yes"}, "create"),
    ("model.configure", {"name": 5, "create": True}, "name"),
    ("model.drain", {"name": "m", "replica": 5}, "replica"),
    ("model.rollback", {"name": ["m"]}, "name"),
    ("replica.list", {"model": 5}, "model"),
    ("ping", {"x": 1}, "unknown argument"),
    ("stats", {"verbose": True}, "unknown argument"),
]


@pytest.mark.parametrize(("op", "args", "needle"), MISTYPED, ids=[f"{o}-{n}" for o, _, n in MISTYPED])
def test_a_mistyped_argument_is_invalid_with_a_message(env, op, args, needle):
    tb, raw, admin, client = env
    before = {a["name"]: a for a in admin.list_apps()}, admin.show_model("m")
    invalid(raw.call(op, **args), needle)
    after = {a["name"]: a for a in admin.list_apps()}, admin.show_model("m")
    assert [set(before[0]), before[1]["max_batch"], before[1]["max_queue"]] == [
        set(after[0]),
        after[1]["max_batch"],
        after[1]["max_queue"],
    ]  # a refused call changes nothing
    assert client.predict("ok", [1.0, 2.0]).output == 3.0
    assert tb.broker.counters["internal_errors"] == 0


def test_a_refused_configure_changes_nothing(env):
    _, raw, admin, _ = env
    invalid(raw.call("model.configure", name="m", max_batch=8, batching="lifo"), "batching")
    assert admin.show_model("m")["max_batch"] == 0
    assert raw.call("model.configure", name="m", max_batch=8, max_queue=100)["ok"]
    assert admin.show_model("m")["max_batch"] == 8


def test_a_refused_configure_create_creates_nothing(env):
    # the model was once made before its values were checked: in this broker's memory, not
    # on disk, so it was gone after a restart
    _, raw, admin, _ = env
    invalid(raw.call("model.configure", name="fresh", max_batch=-1, create=True), "max_batch")
    invalid(raw.call("model.configure", name="fresh", batching="lifo", create=True), "batching")
    assert "fresh" not in {m["name"] for m in admin.list_models()}
    assert raw.call("model.configure", name="fresh", max_batch=4, create=True)["ok"]
    assert admin.show_model("fresh")["max_batch"] == 4


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json", "BAD_MESSAGE"),
        (b"\xff\xfe", "BAD_MESSAGE"),
        (b"[" * 100_000 + b"]" * 100_000, "BAD_MESSAGE"),
        (b'{"id": 1, "op": "ping", "args": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "BAD_MESSAGE"),
        (b"[]", "BAD_MESSAGE"),
        (b'{"id": 1, "op": 5}', "BAD_MESSAGE"),
        (b'{"id": 1, "op": "ping", "args": [1]}', "BAD_MESSAGE"),
        (b'{"id": 1, "op": "nope"}', "UNKNOWN_MESSAGE"),
        (b'{"id": 1, "op": "__init__"}', "UNKNOWN_MESSAGE"),
        (
            b'{"id": 1, "op": "app.create", "args": {"name": "x", "input_type": "'
            + b"f" * 2_000_000
            + b'"}}',
            "TOO_LARGE",
        ),
        (b'{"id": 1, "op": "' + b"\xc3\xa9" * 10 + b'"}', "UNKNOWN_MESSAGE"),
        (
            b'{"id": 1, "op": "app.create", "args": {"name": "x", "input_type": "int64", "slo_ms": 1e999}}',
            "INVALID",
        ),
    ],
)
def test_malformed_admin_messages_are_answered(env, raw, code):
    tb, admin_raw, _, client = env
    reply = admin_raw.send_raw(raw)
    assert not reply["ok"] and reply["error"]["code"] == code, reply
    assert len(reply["error"]["message"]) < 1000
    assert client.predict("ok", [1.0, 2.0]).output == 3.0
    assert tb.broker.counters["internal_errors"] == 0


OPS = {
    "app.create": [
        "name",
        "input_type",
        "input_shape",
        "slo_ms",
        "default",
        "has_default",
        "models",
        "cache",
    ],
    "app.configure": ["name", "cache", "slo_ms"],
    "app.show": ["name"],
    "app.delete": ["name"],
    "app.link": ["app", "model"],
    "app.unlink": ["app", "model"],
    "app.set_policy": ["name", "policy", "options"],
    "model.show": ["name"],
    "model.set_version": ["name", "version"],
    "model.rollback": ["name"],
    "model.configure": ["name", "max_batch", "max_queue", "batching", "batch_delay_ms", "create"],
    "model.drain": ["name", "replica"],
    "replica.list": ["model"],
    "app.list": [],
    "model.list": [],
    "status": [],
    "stats": [],
    "ping": [],
}
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.sampled_from(["ok", "m", "float64", "exp3", "weighted", "aimd", "1", "", "a" * 300])
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def admin_calls(draw):
    op = draw(st.sampled_from(sorted(OPS)))
    names = OPS[op] + ["extra"]
    keys = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    return op, {k: draw(JSON) for k in keys}


@given(calls=st.lists(admin_calls(), min_size=1, max_size=8))
@settings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_any_admin_call_is_answered_and_never_internal(make_thread_broker, calls):
    tb = make_thread_broker()
    raw = RawAdmin(tb.admin)
    try:
        for op, args in calls:
            reply = raw.call(op, **args)
            if not reply["ok"]:
                assert reply["error"]["code"] in {"INVALID", "NOT_FOUND", "CONFLICT", "BAD_MESSAGE"}, reply
            json.dumps(reply, allow_nan=False)  # every answer is strict JSON
        assert raw.call("ping")["ok"]
        assert tb.broker.counters["internal_errors"] == 0
    finally:
        raw.close()
        tb.stop()
