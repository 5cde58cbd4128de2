"""The codec against the golden vectors, and the hot-path builders against the codec."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from pathlib import Path

import ketch
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ketch import protocol as proto
from ketch.protocol import Status

ROOT = Path(__file__).resolve().parents[2]
VECTORS = sorted((ROOT / "schemas" / "vectors").glob("*.json"))


def test_every_message_type_has_a_vector():
    types = {json.loads(p.read_text("utf-8"))["type"] for p in VECTORS}
    assert types == set(proto.BODY_CODES)


@pytest.mark.parametrize("twin", VECTORS, ids=lambda p: p.stem)
def test_golden_vector_decodes_to_its_twin(twin: Path):
    expected = json.loads(twin.read_text("utf-8"))
    decoded = proto.to_dict(twin.with_suffix(".bin").read_bytes())
    assert decoded == {k: expected[k] for k in ("type", "version", "body")}


@pytest.mark.parametrize("twin", VECTORS, ids=lambda p: p.stem)
def test_reference_encoder_reproduces_golden_bytes(twin: Path):
    expected = json.loads(twin.read_text("utf-8"))
    assert proto.from_dict(expected) == twin.with_suffix(".bin").read_bytes()


def test_vectors_and_generated_code_are_current():
    for script in ("schemas/make_vectors.py", "scripts/gen_schema.py"):
        done = subprocess.run([sys.executable, script, "--check"], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, f"{script} --check: {done.stdout}{done.stderr}"


def test_build_query_matches_generic_encoder():
    fast = proto.build_query("iris", proto.FLOAT64, [4], [1, 2, 3], 20000, -2, "user")
    slow = proto.encode(
        "Query",
        {
            "app": "iris",
            "dtype": "FLOAT64",
            "shape": [4],
            "request_ids": [1, 2, 3],
            "timeout_us": 20000,
            "priority": -2,
            "context": "user",
        },
    )
    assert fast == slow


TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_traced_query_reads_back_and_is_learnt_only_as_traced():
    """A traced Query is the same bytes rendered (a version-00 traceparent, no tracestate)
    or built; the broker reads its trace, and learns it only in a receiver of traced ones,
    whose match ends with the traceparent."""
    fields = {"app": "iris", "dtype": "FLOAT64", "shape": [4], "request_ids": [1, 2]}
    rendered = proto.query_header("iris", proto.FLOAT64, (4,), [1, 2], trace=(TP, ""))
    assert rendered == proto.encode("Query", {**fields, "traceparent": TP})
    with_state = proto.query_header("iris", proto.FLOAT64, (4,), [1, 2], trace=(TP, "k=v"))
    assert with_state == proto.encode("Query", {**fields, "traceparent": TP, "tracestate": "k=v"})
    body = proto.decode(with_state)[2]
    assert proto.read_query_trace(body) == (TP, "k=v")
    plain = proto.query_header("iris", proto.FLOAT64, (4,), [1, 2])
    assert proto.read_query_trace(proto.decode(plain)[2]) is None
    body = proto.decode(rendered)[2]
    query, ids = proto.read_query(body)
    assert not proto.QueryReceiver().learn_query(body, query, len(ids))
    traced = proto.QueryReceiver()
    assert traced.learn_query(body, query, len(ids), traced=True)
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    again = proto.query_header("iris", proto.FLOAT64, (4,), [5, 6], trace=(other, ""))
    assert traced.match(again) == ([5, 6, other.encode()], query)
    assert traced.match(plain) is None
    # over the bounds: a traceparent is not read at all, a tracestate reads as none
    huge = proto.build_query("iris", proto.FLOAT64, (4,), [1], traceparent=TP + "x" * 300, tracestate="k=v")
    assert proto.read_query_trace(proto.decode(huge)[2]) is None
    state = proto.build_query("iris", proto.FLOAT64, (4,), [1], traceparent=TP, tracestate="k=v," * 200)
    assert proto.read_query_trace(proto.decode(state)[2]) == (TP, "")


def test_a_traced_batch_reads_back_and_is_learnt_only_as_traced():
    sender = proto.RequestSender(proto.Prebuilds())
    family = ("m", "1", proto.FLOAT64, (2,))
    mixed = sender.header(7, family, [10, 20, 30], None, ([TP, "", TP], ["k=v", "", ""]))
    body = proto.decode(mixed)[2]
    view = proto.read_predict_request(body)
    assert view.traceparents == (TP, "", TP) and view.tracestates == ("k=v", "", "")
    assert view.budgets_us == (10, 20, 30) and view.shapes == (2, 2, 2)
    assert not proto.RequestReceiver().learn_request(mixed, body, view)
    assert not proto.RequestReceiver().learn_request(mixed, body, view, traced=True)  # not all traced
    # every item traced, no tracestate: rendered from the traced template, the same bytes
    other = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    full = sender.header(8, family, [10, 20], None, ([TP, other], ["", ""]))
    assert full == proto.build_predict_request(8, "m", "1", proto.FLOAT64, 1, [2, 2], [10, 20], [TP, other])
    body = proto.decode(full)[2]
    view = proto.read_predict_request(body)
    assert not proto.RequestReceiver().learn_request(full, body, view)
    receiver = proto.RequestReceiver()
    assert receiver.learn_request(full, body, view, traced=True)
    later = sender.header(9, family, [5, 6], None, ([other, TP], ["", ""]))
    assert receiver.match(later) == ([9, 5, 6, other.encode(), TP.encode()], (proto.FLOAT64, (2,), 2))
    plain = sender.header(10, family, [10, 20])
    assert proto.read_predict_request(proto.decode(plain)[2]).traceparents == ()
    assert receiver.match(plain) is None


def test_build_reply_decodes_to_what_was_built():
    items = [
        proto.ReplyFields(
            5,
            Status.DEFAULT,
            proto.JSON,
            (),
            message="why",
            latency_us=7,
            confidence=0.0,
            models_missing=("m",),
        ),
        proto.ReplyFields(
            6,
            Status.OK,
            proto.DTYPE_CODES["FLOAT32"],
            (2, 3),
            model="m",
            model_version="2",
            models_answered=("m",),
        ),
        proto.ReplyFields(7, Status.ERROR, error=9, message="ValueError: x"),
    ]
    body = proto.to_dict(proto.build_reply(items))["body"]["items"]
    assert [i["request_id"] for i in body] == [5, 6, 7]
    assert (
        body[0]["status"] == "DEFAULT" and body[0]["confidence"] == 0.0 and body[0]["models_missing"] == ["m"]
    )
    assert body[1]["output"] == {"dtype": "FLOAT32", "shape": [2, 3]} and body[1]["model_version"] == "2"
    assert body[2]["error"] == "MODEL_ERROR" and body[2]["output"] is None


def test_build_predict_messages_round_trip():
    req = proto.to_dict(proto.build_predict_request(9, "m", "1", proto.FLOAT64, 2, [2, 2, 3, 1], [10, 20]))
    assert req["body"] == {
        "batch_id": 9,
        "model": "m",
        "model_version": "1",
        "dtype": "FLOAT64",
        "ndim": 2,
        "shapes": [2, 2, 3, 1],
        "budgets_us": [10, 20],
        "traceparents": [],
        "tracestates": [],
    }
    rep = proto.to_dict(
        proto.build_predict_reply(
            9, 150, [(Status.OK, proto.INT64, (), 0, ""), (Status.ERROR, None, (), 9, "boom")]
        )
    )
    outs = rep["body"]["outputs"]
    assert rep["body"]["compute_us"] == 150
    assert outs[0]["output"]["dtype"] == "INT64" and outs[1]["message"] == "boom"


@pytest.mark.parametrize(
    "frame",
    [b"", b"KTCH", b"\x00" * 3, b"garbage that is long enough", b"\x0c\x00\x00\x00KTCH\xff\xff\xff\xff"],
)
def test_garbage_headers_raise_decode_error(frame: bytes):
    with pytest.raises(proto.DecodeError):
        proto.decode(frame)


def test_payload_values_round_trip():
    rng = np.random.default_rng(1)
    for code, np_dtype in proto.NUMPY_DTYPES.items():
        arr = (rng.random((2, 3)) * 100).astype(np_dtype)
        shape, payload = proto.value_to_payload(arr, code)
        back = proto.payload_to_value(code, shape, bytes(payload))
        assert back.dtype == np_dtype and np.array_equal(back, arr)
    assert proto.payload_to_value(proto.STRING, (), "héllo".encode()) == "héllo"
    assert proto.payload_to_value(proto.JSON, (), b'{"a":[1,2]}') == {"a": [1, 2]}
    assert proto.payload_to_value(proto.JSON, (), b"") is None
    assert proto.payload_to_value(proto.FLOAT64, (), np.float64(2.5).tobytes()) == 2.5


def test_float_input_is_not_silently_truncated_to_int():
    with pytest.raises(TypeError):
        proto.value_to_payload([1.5, 2.5], proto.INT64)


def test_twins_carry_payloads_as_base64():
    twin = json.loads((ROOT / "schemas" / "vectors" / "query_float64.json").read_text())
    payload = base64.b64decode(twin["payloads"][0])
    assert np.frombuffer(payload, "<f8").tolist() == [5.1, 3.5, 1.4, 0.2]


def test_templates_render_the_same_bytes_as_the_builders():
    ok = Status.OK
    f64 = proto.FLOAT64
    assert proto.reply_ok_many_template("m", "1", f64, (3,), 1).render(12345, 678) == proto.build_reply(
        [
            proto.ReplyFields(
                12345, ok, f64, (3,), model="m", model_version="1", latency_us=678, models_answered=("m",)
            )
        ]
    )
    assert proto.predict_template("m", "2", f64, (4,)).render(99, 1234) == proto.build_predict_request(
        99, "m", "2", f64, 1, [4], [1234]
    )
    assert proto.predict_template("m", "2", f64, (4,), 3).render(9, 1, 2, 3) == proto.build_predict_request(
        9, "m", "2", f64, 1, [4, 4, 4], [1, 2, 3]
    )
    assert proto.query_template("iris", f64, (4,), 500, 1, "u").render(77) == proto.build_query(
        "iris", f64, (4,), [77], 500, 1, "u"
    )
    assert proto.query_template("iris", f64, (4,), 0, 0, "", 3).render(7, 8, 9) == proto.build_query(
        "iris", f64, (4,), [7, 8, 9]
    )
    assert proto.predict_reply_many_template(proto.INT64, (), 1).render(5, 10) == proto.build_predict_reply(
        5, 10, [(ok, proto.INT64, (), 0, "")]
    )
    # a rendered template is an ordinary message
    assert (
        proto.to_dict(proto.reply_ok_many_template("m", "1", f64, (), 1).render(0, 0))["body"]["items"][0][
            "request_id"
        ]
        == 0
    )


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_many_item_templates_render_the_builders_bytes(n):
    ok, f32 = Status.OK, proto.DTYPE_CODES["FLOAT32"]
    ids = [1000 + 3 * i for i in range(n)]
    lat = [50 + i for i in range(n)]
    rendered = proto.reply_ok_many_template("m", "4", f32, (2,), n).render(
        *[v for pair in zip(ids, lat, strict=True) for v in pair]
    )
    built = proto.build_reply(
        [
            proto.ReplyFields(
                r, ok, f32, (2,), model="m", model_version="4", latency_us=t, models_answered=("m",)
            )
            for r, t in zip(ids, lat, strict=True)
        ]
    )
    assert rendered == built
    assert proto.predict_reply_many_template(proto.INT64, (), n).render(
        77, 1234
    ) == proto.build_predict_reply(77, 1234, [(ok, proto.INT64, (), 0, "")] * n)


def test_the_client_reads_every_reply_vector_like_the_generic_decoder():
    from ketch.client import _parse

    for twin in VECTORS:
        expected = json.loads(twin.read_text("utf-8"))
        if expected["type"] != "Reply":
            continue
        frames = [twin.with_suffix(".bin").read_bytes(), *map(base64.b64decode, expected["payloads"])]
        parsed = _parse(frames)
        items = expected["body"]["items"]
        assert [rid for rid, _ in parsed] == [i["request_id"] for i in items]
        for (_, answer), item in zip(parsed, items, strict=True):
            if item["status"] == "ERROR":
                assert answer.code_name == item["error"] and answer.message == item["message"]
            else:
                assert answer.default == (item["status"] == "DEFAULT")
                assert answer.model == item["model"] and answer.version == item["model_version"]
                assert list(answer.models_missing) == item["models_missing"]
                assert answer.confidence == pytest.approx(item["confidence"])


def test_fast_readers_fail_only_cleanly_on_corrupt_replies():
    import random

    from ketch import errors as _errors
    from ketch.client import _parse

    rng = random.Random(5)
    frames = [
        p.with_suffix(".bin").read_bytes() for p in VECTORS if json.loads(p.read_text())["type"] == "Reply"
    ]
    for _ in range(3000):
        buf = bytearray(rng.choice(frames))
        for _ in range(rng.randrange(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        for _, answer in _parse([bytes(buf), b"", b"", b""]):  # raises nothing at all
            assert isinstance(answer, ketch.Prediction | _errors.RequestError)


def test_template_match_reads_back_what_render_wrote_and_nothing_else():
    t = proto.reply_ok_many_template("m", "1", proto.FLOAT64, (2,), 2)
    data = t.render(11, 22, 33, 44)
    assert t.match(data) == [11, 22, 33, 44]
    assert t.match(data[:-1]) is None
    other = proto.reply_ok_many_template("n", "1", proto.FLOAT64, (2,), 2)  # same length, other model
    assert len(other.data) == len(t.data) and t.match(other.render(11, 22, 33, 44)) is None
    q = proto.query_template("app", proto.FLOAT64, (4,), 0, 0, "")
    assert q.match(q.render(7)) == [7]
    assert q.match(proto.query_template("app", proto.FLOAT64, (5,), 0, 0, "").render(7)) is None


def test_client_reads_a_templated_reply_as_it_parses_one(monkeypatch):
    from ketch import client

    payloads = [np.float64(i).tobytes() for i in range(3)]
    header = proto.reply_ok_many_template("m", "2", proto.FLOAT64, (), 3).render(5, 1500, 6, 1600, 7, 1700)
    sent_at = {5: 0.0, 6: 0.0, 7: 0.0}
    monkeypatch.setattr(client, "_PLAIN", proto.PlainReplies(total=256))  # none learnt yet
    assert client._plain_reply([header, *payloads], sent_at) is None
    parsed = client._parse([header, *payloads], sent_at)  # the long way; learns the template
    assert client._PLAIN
    fast = client._plain_reply([header, *payloads], sent_at)
    assert fast is not None
    for (rid_a, a), (rid_b, b) in zip(parsed, fast, strict=True):
        assert rid_a == rid_b and a.output == b.output and type(a.output) is type(b.output)
        for name in ("default", "model", "version", "broker_latency_ms", "confidence", "models_answered"):
            assert getattr(a, name) == getattr(b, name), name
    # an error reply of the same length is not mistaken for it
    assert client._plain_reply([b"x" * len(header), *payloads], sent_at) is None
    # a payload that does not fit the learnt shape is a ProtocolError for that item alone
    answers = client._parse([header, b"\x00" * 7, *payloads[1:]], sent_at)
    assert [rid for rid, _ in answers] == [5, 6, 7]
    assert isinstance(answers[0][1], ketch.ProtocolError) and answers[0][1].request_id == 5
    assert [a.output for _, a in answers[1:]] == [1.0, 2.0]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.data())
def test_template_match_sees_any_change_outside_the_slots(rid, latency, data):
    """A receiver reads a matching message from the slots alone: so a message that differs
    from the template in any other byte must not match."""
    t = proto.reply_ok_many_template("m", "1", proto.FLOAT64, (3,), 1)
    rendered = t.render(rid, latency)
    assert t.match(rendered) == [rid, latency]
    slot_bytes = {p + i for p, fmt in t.slots for i in range(struct.calcsize(fmt))}
    at = data.draw(st.integers(0, len(rendered) - 1))
    flipped = bytearray(rendered)
    flipped[at] ^= data.draw(st.integers(1, 255))
    got = t.match(bytes(flipped))
    if at in slot_bytes:
        assert got is not None and got != [rid, latency]
    else:
        assert got is None


def test_learnt_templates_keep_only_what_a_message_proves_and_stay_bounded():
    book = proto.LearntTemplates(total=3, per_length=2)
    shapes = [(i,) for i in range(1, 5)]  # one-dimensional: Query headers of one length
    templates = [proto.query_template("app", proto.FLOAT64, shape, 0, 0, "") for shape in shapes]
    assert not book and book.match(templates[0].render(1)) is None
    assert not book.learn(templates[1].render(1), templates[0], "no")  # not that template rendered
    assert book.learn(templates[0].render(1), templates[0], shapes[0])
    assert not book.learn(templates[0].render(2), templates[0], shapes[0])  # known already
    assert book.learn(templates[1].render(1), templates[1], shapes[1])
    assert not book.learn(templates[2].render(1), templates[2], shapes[2])  # two of that length
    assert book.match(templates[1].render(9)) == ([9], shapes[1])
    assert book.match(templates[2].render(9)) is None
    other = proto.query_template("application", proto.FLOAT64, (4,), 0, 0, "")
    assert book.learn(other.render(1), other, "other") and book.full
    last = proto.query_template("a-third-length", proto.FLOAT64, (4,), 0, 0, "")
    assert not book.learn(last.render(1), last, "full")


def _plain_items(n: int, **change) -> list[proto.ReplyFields]:
    """n plain predictions; ``change`` sets fields of the second one."""
    items = []
    for i in range(n):
        fields = {"model": "m", "model_version": "1", "latency_us": 500 + i, "models_answered": ("m",)}
        status, dtype, shape, rid = Status.OK, proto.FLOAT64, (2,), 100 + i
        if i == 1:
            status = change.pop("status", status)
            dtype = change.pop("dtype", dtype)
            shape = change.pop("shape", shape)
            rid = change.pop("request_id", rid)
            fields.update(change)
        items.append(proto.ReplyFields(rid, status, dtype, shape, **fields))
    return items


def test_a_plain_reply_is_a_template_of_itself():
    data = proto.build_reply(_plain_items(3))
    template, meaning = proto.plain_reply_template(data)
    assert meaning == ("m", "1", proto.FLOAT64, (2,))
    assert template.match(data) == [100, 500, 101, 501, 102, 502]
    # what the broker renders for these answers has the same bytes outside the slots
    rendered = proto.reply_ok_many_template("m", "1", proto.FLOAT64, (2,), 3).render(7, 8, 9, 10, 11, 12)
    assert template.match(rendered) == [7, 8, 9, 10, 11, 12]
    assert template.match(proto.build_reply(_plain_items(4))) is None


@pytest.mark.parametrize(
    "change",
    [
        {"status": Status.DEFAULT, "message": "deadline"},
        {"status": Status.ERROR, "error": proto.ErrorCode.MODEL_ERROR, "dtype": None},
        {"message": "a note"},
        {"confidence": 0.5},
        {"models_missing": ("n",)},
        {"models_answered": ("m", "n")},
        {"model": "n", "models_answered": ("n",)},
        {"model_version": "2"},
        {"shape": (3,)},
        {"dtype": proto.dtype_code("float32")},
        {"latency_us": 0},  # not written: no slot for it
        {"request_id": 0},
        {"retry_after_ms": 5},
    ],
    ids=lambda c: ",".join(c),
)
def test_a_reply_with_an_item_that_is_not_plain_is_not_learnt(change):
    assert proto.plain_reply_template(proto.build_reply(_plain_items(3, **change))) is None


def test_only_replies_are_learnt_as_replies():
    query = proto.build_query("a", proto.FLOAT64, (2,), [1, 2])
    assert proto.plain_reply_template(query) is None
    assert proto.plain_reply_template(b"\x00" * 40) is None
    assert proto.plain_reply_template(proto.build_reply([])) is None


def test_prebuilds_queue_each_family_once_and_build_one_per_step():
    built = []

    def build(*args):
        built.append(args)

    pre = proto.Prebuilds(limit=2)
    assert not pre
    pre.want(build, ("a",), range(1, 4))
    pre.want(build, ("a",), range(1, 4))  # queued already
    pre.want(build, ("b",), range(1, 2))
    pre.want(build, ("c",), range(1, 2))  # over the limit of families
    steps = 0
    while pre:
        pre.step()
        steps += 1
    assert built == [("a", 1), ("a", 2), ("a", 3), ("b", 1)] and steps == 4
