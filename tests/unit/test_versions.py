"""Version negotiation (docs/protocol.md section 3) and the messages of a newer peer.

``schemas/vectors/newer/`` holds messages written as a peer of a version-3 protocol would
write them (fields appended to tables, a body type past the last union member): the
generic decoder and the typed views read what this schema knows and skip the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ketch import protocol as proto

ROOT = Path(__file__).resolve().parents[2]
NEWER = sorted((ROOT / "schemas" / "vectors" / "newer").glob("*.json"))


def test_the_choice_is_the_highest_version_both_speak():
    assert proto.PROTOCOL_VERSIONS == (1, 2)
    assert proto.choose_version([]) == 1  # a version-1 container names none
    assert proto.choose_version([1]) == 1
    assert proto.choose_version([1, 2]) == 2
    assert proto.choose_version([2, 1, 3, 9]) == 2
    assert proto.choose_version([2]) == 2
    assert proto.choose_version([3, 4]) is None
    assert proto.choose_version([1, 3], speaks=[2, 3]) == 3
    assert proto.offered_versions([]) == (1,)
    assert proto.offered_versions([3, 1, 1]) == (1, 3)


def test_each_body_is_stamped_with_the_version_that_brought_it():
    assert proto.stamp("Paused") == 2
    assert {proto.stamp(b) for b in proto.BODY_CODES if b != "Paused"} == {1}
    for body in proto.BODY_CODES:
        assert proto.to_dict(proto.encode(body, {}))["version"] == proto.stamp(body)
    assert proto.to_dict(proto.encode("Ready", {}, version=2))["version"] == 2  # when asked


def test_newer_vectors_exist():
    assert {p.stem for p in NEWER} >= {"hello", "welcome", "predict_request", "predict_reply", "unknown_body"}


@pytest.mark.parametrize("twin", NEWER, ids=lambda p: p.stem)
def test_a_newer_peers_message_decodes_to_what_this_schema_knows(twin: Path):
    expected = json.loads(twin.read_text("utf-8"))
    frame = twin.with_suffix(".bin").read_bytes()
    if "error" in expected:  # a message type this schema does not know
        with pytest.raises(proto.UnknownMessage) as caught:
            proto.decode(frame)
        assert (caught.value.body_type, caught.value.version) == (expected["body_type"], expected["version"])
        assert expected["error"] == "UNKNOWN_MESSAGE"
        with pytest.raises(proto.UnknownMessage):  # a version spoken: the type is the problem
            proto.decode_current(frame)
        return
    assert proto.to_dict(frame) == {k: expected[k] for k in ("type", "version", "body")}
    name, body = proto.decode_current(frame)
    ours = proto.decode(proto.from_dict(expected))[2]  # the same message as this schema writes it
    assert proto.read_fields(name, body) == proto.read_fields(name, ours)


def test_the_typed_views_skip_appended_fields():
    frame = (ROOT / "schemas" / "vectors" / "newer" / "predict_request.bin").read_bytes()
    _, _, body = proto.decode(frame)
    view = proto.read_predict_request(body)
    assert (view.batch_id, view.dtype, view.ndim, list(view.shapes), list(view.budgets_us)) == (
        42, proto.FLOAT64, 1, [2, 1], [500000, 500000]
    )  # fmt: skip
    frame = (ROOT / "schemas" / "vectors" / "newer" / "predict_reply.bin").read_bytes()
    _, _, body = proto.decode(frame)
    reply = proto.read_predict_reply(body)
    assert (proto.read_batch_id(body), reply.compute_us, len(reply.outputs)) == (42, 120, 2)


def test_an_unknown_type_of_an_unknown_version_is_a_version_problem(make_vectors):
    frame = make_vectors.encode_newer("Heartbeat", {}, version=3, body_type=200)
    with pytest.raises(proto.UnsupportedVersion) as caught:
        proto.decode_current(frame)
    assert caught.value.version == 3
    with pytest.raises(proto.UnknownMessage):
        proto.decode(frame)
