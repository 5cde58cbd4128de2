"""Property-based tests of the decoder: whatever bytes arrive, it either decodes or raises
DecodeError; nothing else escapes."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ketch import protocol as proto

VECTORS = [
    p.read_bytes()
    for p in sorted((Path(__file__).resolve().parents[2] / "schemas" / "vectors").glob("*.bin"))
]


def read_everything(frame: bytes) -> None:
    """Decode every field; only DecodeError may come out."""
    with contextlib.suppress(proto.DecodeError):
        proto.to_dict(frame)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_decode(frame: bytes):
    with contextlib.suppress(proto.DecodeError):
        proto.decode(frame)


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(VECTORS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
)
def test_mutated_vectors_decode_or_fail_cleanly(frame: bytes, flips: list[tuple[int, int]]):
    buf = bytearray(frame)
    for pos, value in flips:
        buf[pos % len(buf)] = value
    try:
        proto.decode(bytes(buf))
    except proto.DecodeError:
        return
    read_everything(bytes(buf))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(VECTORS), st.integers(0, 200))
def test_truncated_vectors_fail_cleanly(frame: bytes, cut: int):
    read_everything(frame[: max(0, len(frame) - cut)])


@settings(max_examples=100, deadline=None)
@given(
    app=st.text(max_size=40),
    ids=st.lists(st.integers(0, 2**63), min_size=1, max_size=20),
    shape=st.lists(st.integers(-1, 1000), max_size=4),
    timeout=st.integers(0, 2**32 - 1),
    priority=st.integers(-128, 127),
)
def test_any_query_round_trips(app, ids, shape, timeout, priority):
    frame = proto.build_query(app, proto.FLOAT64, shape, ids, timeout, priority)
    body = proto.to_dict(frame)["body"]
    assert (body["app"], body["request_ids"], body["shape"], body["timeout_us"], body["priority"]) == (
        app,
        ids,
        shape,
        timeout,
        priority,
    )
    json.dumps(body)
