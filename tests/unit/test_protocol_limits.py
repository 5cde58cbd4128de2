"""ketch.protocol's limits and the readers' answers to extreme input: names, Hellos, body
types, nesting depth, uint32 saturation, frame counts."""

from __future__ import annotations

import pytest
import zmq
from ketch import protocol as proto
from ketch.protocol import limits

GOOD = {
    "model": "iris-svm_2.b",
    "model_version": "2.0+build",
    "input": {"dtype": proto.FLOAT64, "shape": [-1, 4]},
    "sdk": "python/0.1.0",
    "replica_id": "host-a/iris-svm/0",
    "credits": 2,
    "max_batch": 0,
    "fingerprint": "sha256:00ff",
}


def test_a_good_hello_passes_and_each_field_has_its_limit():
    assert limits.check_hello(GOOD) == ""
    assert limits.check_hello({**GOOD, "replica_id": "", "fingerprint": "", "sdk": ""}) == ""
    bad = {
        "model": ["", "a" * 129, "a b", "x/y", "é", None, 5],
        "model_version": ["", "1" * 65, "1 2", "1/2"],
        "input": [None, {"dtype": 99, "shape": []}, {"dtype": proto.STRING, "shape": [1]}],
        "replica_id": ["a b", "r" * 257, "tab\there"],
        "sdk": ["\n", "s" * 65],
        "fingerprint": ["sha 256", "f" * 129],
        "credits": [-1, 1025, "2"],
        "max_batch": [-1, 65537],
    }
    for key, values in bad.items():
        for value in values:
            assert limits.check_hello({**GOOD, key: value}), (key, value)
    for shape in ([1] * 33, [-2], [2**31]):
        assert "shape" in limits.check_hello({**GOOD, "input": {"dtype": proto.FLOAT64, "shape": shape}})


def test_a_huge_name_is_not_echoed_whole():
    problem = limits.check_hello({**GOOD, "model": "m" * 5_000_000})
    assert "5000000 characters" in problem and len(problem) < 200


def test_an_unknown_body_type_is_its_own_decode_error():
    header = bytearray(proto.encode("Heartbeat", {}))
    header[header.index(proto.BODY_CODES["Heartbeat"].to_bytes(1, "little"), 8)] = 99
    with pytest.raises(proto.UnknownMessage) as caught:
        proto.decode_current(bytes(header))
    assert caught.value.body_type == 99 and caught.value.version == 1
    later = bytearray(proto.encode("Heartbeat", {}, version=max(proto.PROTOCOL_VERSIONS) + 1))
    later[later.index(proto.BODY_CODES["Heartbeat"].to_bytes(1, "little"), 8)] = 99
    with pytest.raises(proto.UnsupportedVersion):  # the version first
        proto.decode_current(bytes(later))


def test_json_nested_too_deep_is_a_decode_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(proto.DecodeError, match="nested too deep"):
        proto.payload_to_value(proto.JSON, (), deep)
    assert proto.payload_to_value(proto.JSON, (), b"[" * 50 + b"]" * 50) is not None


def test_uint32_fields_of_a_reply_saturate():
    item = proto.ReplyFields(1, proto.Status.ERROR, latency_us=2**40, retry_after_ms=2**33)
    assert item.latency_us == limits.U32_MAX and item.retry_after_ms == limits.U32_MAX
    view = proto.read_reply(proto.decode(proto.build_reply([item]))[2])[0]
    assert view.latency_us == limits.U32_MAX and view.retry_after_ms == limits.U32_MAX


def test_long_query_texts_are_never_kept_in_the_template_cache():
    proto.query_template.cache_clear()
    proto.query_header("app", proto.FLOAT64, (1,), [1, 2], context="c" * 10_000)
    assert proto.query_template.cache_info().currsize == 0
    proto.query_header("app", proto.FLOAT64, (1,), [1, 2], context="user-7")
    assert proto.query_template.cache_info().currsize == 1


def test_a_bounded_receive_keeps_at_most_limit_plus_one_frames():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.linger = b.linger = 0
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")
    try:
        b.send_multipart([b"h", *[b"x"] * 1000, b"last"])
        b.send_multipart([b"next"])
        assert a.poll(5000)
        frames = proto.multipart.recv(a, 0, 10)
        assert len(frames) == 11 and frames[0].bytes == b"h"  # one more than the limit: truncated
        assert [f.bytes for f in proto.multipart.recv(a)] == [b"next"]  # the rest was taken
    finally:
        a.close()
        b.close()
