"""ketch.protocol: the contract in its docstring, clause by clause, and the generated numbers."""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path

import flatbuffers
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ketch import protocol as proto
from ketch.protocol import Status, schema

ROOT = Path(__file__).resolve().parents[2]
VECTORS = sorted((ROOT / "schemas" / "vectors").glob("*.json"))
F64 = proto.FLOAT64


# ---------------------------------------------------------------- the generated numbers


class _Recorder:
    def __getattr__(self, method: str):
        def record(slot: int, value: object, default: object = None) -> None:
            self.got = (slot, default)

        return record


def test_generated_field_ids_and_defaults_are_flatcs():
    """Every id in ketch.protocol.schema is the slot flatc's own accessor writes."""
    for table, fields in schema.FIELDS.items():
        mod = importlib.import_module(f"ketch.protocol._generated.{table}")
        for name, kind in fields:
            rec = _Recorder()
            getattr(mod, "Add" + "".join(p.capitalize() for p in name.split("_")))(rec, 0)
            slot, default = rec.got
            assert slot == getattr(getattr(schema, table), name.upper()), (table, name)
            if not kind.startswith("[") and kind not in schema.FIELDS and kind != "str":
                assert schema.DEFAULTS.get((table, name), 0) == default, (table, name)


def test_the_item_limit_is_one_constant():
    from ketch.client import AsyncClient

    assert proto.MAX_ITEMS == 64 and AsyncClient._MAX_PER_MESSAGE == proto.MAX_ITEMS
    assert proto.REQUEST_TEMPLATE_ITEMS == 2 * proto.MAX_ITEMS


# ---------------------------------------------------------------- 2. templates are the builders


@pytest.mark.parametrize("n", range(1, proto.MAX_ITEMS + 1))
def test_every_template_renders_the_builders_bytes_at_every_size(n):
    ok = Status.OK
    ids = [(1 << 40) + 7 * i for i in range(n)]
    lat = [1 + (i * 37) % 5000 for i in range(n)]
    pairs = [v for pair in zip(ids, lat, strict=True) for v in pair]
    item = {"model": "m", "model_version": "v2", "models_answered": ("m",)}
    reply = [
        proto.ReplyFields(r, ok, F64, (3, 2), latency_us=t, **item) for r, t in zip(ids, lat, strict=True)
    ]
    assert proto.reply_ok_many_template("m", "v2", F64, (3, 2), n).render(*pairs) == proto.build_reply(reply)
    budgets = [(i * 977) % 2**32 for i in range(n)]  # vector elements may take any value, 0 too
    assert proto.predict_template("m", "v2", F64, (3, 2), n).render(
        99, *budgets
    ) == proto.build_predict_request(99, "m", "v2", F64, 2, [3, 2] * n, budgets)
    assert proto.query_template("app", F64, (4,), 250, -1, "ctx", n).render(*ids) == proto.build_query(
        "app", F64, (4,), ids, 250, -1, "ctx"
    )
    assert proto.predict_reply_many_template(F64, (3,), n).render(5, 1234) == proto.build_predict_reply(
        5, 1234, [(ok, F64, (3,), 0, "")] * n
    )
    retries = [1 + (i * 53) % 60_000 for i in range(n)]
    refused = [v for pair in zip(ids, retries, strict=True) for v in pair]
    assert proto.reply_refused_many_template(7, "full", n).render(*refused) == proto.build_reply(
        [
            proto.ReplyFields(r, Status.ERROR, error=7, message="full", retry_after_ms=t)
            for r, t in zip(ids, retries, strict=True)
        ]
    )


def test_the_direct_builders_write_what_encode_writes():
    assert proto.build_predict_reply(3, 7, [(Status.OK, F64, (2,), 0, "")]) == proto.encode(
        "PredictReply",
        {
            "batch_id": 3,
            "compute_us": 7,
            "outputs": [{"status": "OK", "output": {"dtype": "FLOAT64", "shape": [2]}}],
        },
    )
    assert proto.build_predict_request(3, "m", "1", F64, 1, [2, 2], [5, 6]) == proto.encode(
        "PredictRequest",
        {"batch_id": 3, "model": "m", "model_version": "1", "dtype": "FLOAT64", "ndim": 1, "shapes": [2, 2],
         "budgets_us": [5, 6]},
    )  # fmt: skip


def test_build_reply_decodes_as_encode_with_each_string_once():
    fields = {"model": "m", "model_version": "1", "latency_us": 3, "models_answered": ("m",)}
    built = proto.build_reply([proto.ReplyFields(5, Status.OK, F64, (2,), **fields)])
    encoded = proto.encode(
        "Reply",
        {
            "items": [
                {
                    "request_id": 5,
                    "output": {"dtype": "FLOAT64", "shape": [2]},
                    **fields,
                    "models_answered": ["m"],
                }
            ]
        },
    )
    assert proto.to_dict(built) == proto.to_dict(encoded) and len(built) < len(encoded)
    error = proto.ReplyFields(5, Status.ERROR, error=9, message="x")
    assert proto.build_reply([error]) == proto.encode(
        "Reply", {"items": [{"request_id": 5, "status": "ERROR", "error": 9, "message": "x"}]}
    )


def test_the_request_sender_renders_one_shape_and_builds_others():
    pre = proto.Prebuilds()
    sender = proto.RequestSender(pre)
    family = ("m", "1", F64, (2,))
    assert sender.header(7, family, [10, 20]) == proto.build_predict_request(
        7, "m", "1", F64, 1, [2, 2], [10, 20]
    )
    assert pre  # the family's other sizes are queued, once
    queued = len(pre._todo)
    sender.header(8, family, [1])
    assert len(pre._todo) == queued
    mixed = sender.header(9, family, [1, 2], [(2,), (3,)])
    assert proto.read_predict_request(proto.decode(mixed)[2]).shapes == (2, 3)
    many = [1] * (proto.REQUEST_TEMPLATE_ITEMS + 1)  # past the templates: built
    assert sender.header(10, family, many) == proto.build_predict_request(
        10, "m", "1", F64, 1, [2] * len(many), many
    )


# ---------------------------------------------------------------- 3. what may be learnt


def _query_in_another_layout(app: str, ids: list[int]) -> bytes:
    """A valid Query whose bytes differ from the canonical builder's (ids written first)."""
    from ketch.protocol._generated import Query as Q

    b = flatbuffers.Builder(64)
    ids_off = b.CreateNumpyVector(np.asarray(ids, dtype="<u8"))
    app_off = b.CreateString(app)
    shape_off = b.CreateNumpyVector(np.asarray([4], dtype="<i8"))
    Q.Start(b)
    Q.AddRequestIds(b, ids_off)
    Q.AddShape(b, shape_off)
    Q.AddDtype(b, F64)
    Q.AddApp(b, app_off)
    return proto.codec.finish(b, schema.Body.Query, Q.End(b))


def test_the_broker_learns_a_query_only_when_canonical():
    receiver = proto.QueryReceiver(16)
    odd = _query_in_another_layout("app", [5, 6])
    _, _, body = proto.decode(odd)
    query, ids = proto.read_query(body)
    assert (query.app, query.dtype, query.shape, ids) == ("app", F64, (4,), [5, 6])
    assert not receiver.learn_query(body, query, len(ids)) and not receiver
    canonical = proto.query_header("app", F64, (4,), [5, 6])
    _, _, body = proto.decode(canonical)
    query, ids = proto.read_query(body)
    assert receiver.learn_query(body, query, len(ids))
    assert receiver.match(proto.query_header("app", F64, (4,), [8, 9])) == ([8, 9], query)
    assert receiver.match(odd) is None
    long_ids = list(range(1, proto.MAX_ITEMS + 2))  # past the limit: read the long way, never learnt
    _, _, body = proto.decode(proto.query_header("app", F64, (4,), long_ids))
    query, ids = proto.read_query(body)
    assert ids == long_ids and not receiver.learn_query(body, query, len(ids))


def test_a_replica_learns_a_request_as_a_template_of_itself():
    receiver = proto.RequestReceiver(4)
    header = proto.build_predict_request(3, "m", "1", F64, 1, [2, 2, 2], [9, 8, 7])
    body = proto.decode(header)[2]
    request = proto.read_predict_request(body)
    assert receiver.learn_request(header, body, request)
    again = proto.build_predict_request(4, "m", "1", F64, 1, [2, 2, 2], [1, 2, 3])
    assert receiver.match(again) == ([4, 1, 2, 3], (F64, (2,), 3))
    mixed = proto.build_predict_request(5, "m", "1", F64, 1, [2, 3], [1, 2])
    body = proto.decode(mixed)[2]
    assert not receiver.learn_request(mixed, body, proto.read_predict_request(body))


def test_the_broker_learns_a_plain_predict_reply_as_a_template_of_itself():
    receiver = proto.PredictReplyReceiver(4)
    header = proto.build_predict_reply(3, 40, [(Status.OK, F64, (2,), 0, "")] * 2)
    body = proto.decode(header)[2]
    view = proto.read_predict_reply(body)
    assert view.outputs == [(True, F64, (2,), 0, "")] * 2 and view.compute_us == 40
    assert receiver.learn_reply(header, body, view.outputs)
    assert receiver.match(proto.build_predict_reply(4, 41, [(Status.OK, F64, (2,), 0, "")] * 2)) == (
        [4, 41],
        ((True, F64, (2,), 0, ""), 2),
    )
    mixed = proto.build_predict_reply(
        3, 40, [(Status.OK, F64, (2,), 0, ""), (Status.ERROR, None, (), 9, "x")]
    )
    body = proto.decode(mixed)[2]
    outputs = proto.read_predict_reply(body).outputs
    assert outputs[1] == (False, None, (), proto.ErrorCode.MODEL_ERROR, "x")
    assert not receiver.learn_reply(mixed, body, outputs)


# ---------------------------------------------------------------- 4. readers raise only DecodeError

BINS = [p.with_suffix(".bin").read_bytes() for p in VECTORS]
VIEWS = {
    "Query": proto.read_query,
    "Reply": proto.read_reply,
    "PredictRequest": proto.read_predict_request,
    "PredictReply": proto.read_predict_reply,
}


def _read_all(frame: bytes) -> None:
    with contextlib.suppress(proto.DecodeError):
        name, body = proto.decode_current(frame)
        proto.read_fields(name, body)
    with contextlib.suppress(proto.DecodeError):
        _, name, body = proto.decode(frame)
        if name in VIEWS:
            VIEWS[name](body)
        if name == "PredictReply":
            proto.read_batch_id(body)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BINS), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_views_raise_only_decode_error_on_corrupt_headers(frame, flips):
    buf = bytearray(frame)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    _read_all(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(BINS), st.integers(0, 200))
def test_views_raise_only_decode_error_on_truncated_headers(frame, cut):
    _read_all(frame[: max(0, len(frame) - cut)])


@given(
    st.sampled_from(sorted(proto.DTYPE_CODES.values())), st.binary(max_size=40), st.lists(st.integers(0, 4))
)
def test_payloads_decode_or_raise_decode_error(dtype, payload, shape):
    with contextlib.suppress(proto.DecodeError):
        proto.payload_to_value(dtype, shape, payload)


@pytest.mark.parametrize(
    "twin", [v for v in VECTORS if json.loads(v.read_text())["type"] in VIEWS], ids=lambda p: p.stem
)
def test_views_read_the_golden_vectors_as_the_generic_decoder(twin):
    expected = json.loads(twin.read_text("utf-8"))["body"]
    name, body = proto.decode_current(twin.with_suffix(".bin").read_bytes())
    view = VIEWS[name](body)
    if name == "Query":
        query, ids = view
        assert (query.app, list(query.shape), ids) == (
            expected["app"],
            expected["shape"],
            expected["request_ids"],
        )
        assert (query.timeout_us, query.priority, query.context) == (
            expected["timeout_us"], expected["priority"], expected["context"]
        )  # fmt: skip
    elif name == "Reply":
        for item, want in zip(view, expected["items"], strict=True):
            assert (item.request_id, item.message, item.latency_us) == (
                want["request_id"], want["message"], want["latency_us"]
            )  # fmt: skip
            assert list(item.models_answered) == want["models_answered"]
            assert (item.dtype is None) == (want["output"] is None)
    elif name == "PredictRequest":
        assert (view.batch_id, list(view.shapes), list(view.budgets_us)) == (
            expected["batch_id"], expected["shapes"], expected["budgets_us"]
        )  # fmt: skip
    else:
        assert (view.compute_us, len(view.outputs), view.message) == (
            expected["compute_us"], len(expected["outputs"]), expected["message"]
        )  # fmt: skip


def test_another_version_is_refused_by_decode_current():
    frame = proto.encode("Heartbeat", {}, version=3)
    with pytest.raises(proto.UnsupportedVersion) as caught:
        proto.decode_current(frame)
    assert caught.value.version == 3 and isinstance(caught.value, proto.DecodeError)
    assert "speaks 1, 2" in str(caught.value)
    for version in proto.PROTOCOL_VERSIONS:  # every version spoken is taken
        assert proto.decode_current(proto.encode("Heartbeat", {}, version=version))[0] == "Heartbeat"


# ---------------------------------------------------------------- 5. at most MAX_ITEMS per Reply


def _pair() -> tuple[zmq.Socket, zmq.Socket]:
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.linger = dealer.linger = 0
    dealer.setsockopt(zmq.IDENTITY, b"client")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"hello")  # the router learns the dealer's identity
    assert router.poll(5000) and router.recv_multipart()[0] == b"client"
    return router, dealer


def _receive(dealer: zmq.Socket) -> list[list[bytes]]:
    got = []
    while dealer.poll(1000):
        got.append(dealer.recv_multipart())
    return got


def test_the_reply_sender_sends_at_most_max_items_answers_a_reply():
    router, dealer = _pair()
    try:
        sender = proto.ReplySender(proto.Prebuilds())
        n = proto.MAX_ITEMS + 3
        items = [
            proto.ReplyFields(
                i + 1, Status.OK, F64, (), model="m", model_version="1", latency_us=5, models_answered=("m",)
            )
            for i in range(n)
        ]
        payloads = [np.float64(i).tobytes() for i in range(n)]
        sender.send(router, b"client", list(zip(items, payloads, strict=True)))  # plain: by template
        messages = _receive(dealer)
        assert [len(m) - 1 for m in messages] == [proto.MAX_ITEMS, 3]
        ids = [i.request_id for m in messages for i in proto.read_reply(proto.decode(m[0])[2])]
        assert ids == list(range(1, n + 1)) and sender.prebuilds  # the family's sizes are queued
        items[5] = proto.ReplyFields(6, Status.ERROR, error=proto.ErrorCode.MODEL_ERROR, message="no")
        sender.send(router, b"client", list(zip(items, payloads, strict=True)))  # not all plain: built
        messages = _receive(dealer)
        assert [len(m) - 1 for m in messages] == [proto.MAX_ITEMS, 3]
        assert proto.read_reply(proto.decode(messages[0][0])[2])[5].message == "no"
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
