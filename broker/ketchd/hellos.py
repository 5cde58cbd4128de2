"""Who may register: the rules a valid Hello must also meet, against what the broker holds.

``ketch.protocol.limits.check_hello`` checks a Hello's fields alone (``INVALID`` beyond).
``conflict`` checks it against the broker: a Hello that breaks one of these is refused with
``CONFLICT`` ("not now": each holds only while the others are there, and the replica says
Hello again later):

- the broker holds ``max_models`` models and this one is new, or ``max_replicas`` replicas,
  or the model ``MAX_VERSIONS`` versions and this one is new;
- its replica id is in use by another connection heard from within ``dead_after_ms`` (a
  connection never takes over another's work);
- the model's live replicas take another input type (a batch is never sent to a replica
  that cannot read it);
- the live replicas of its model version announce another fingerprint (two codes never
  answer under one name).

``note_fingerprint`` records what a version's replicas serve once one is let in: a version
that comes back with other code (none of the old left) is logged and counted, and the
cache, keyed on the fingerprint, never answers from the old code's entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
from ketch import protocol as proto

from ketchd.answers import shape_text
from ketchd.registry import Model, ReplicaState

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd")

MAX_VERSIONS = 1024  # versions a model may have known


def conflict(
    b: Broker,
    identity: bytes,
    replica_id: str,
    name: str,
    version: str,
    input_type: tuple[int, tuple[int, ...]],
    fingerprint: str,
    now: float,
) -> str:
    """Why a valid Hello cannot be let in now ('' when it can); see the module docstring."""
    cfg = b.config
    if name not in b.models and len(b.models) >= cfg.max_models:
        return f"the broker knows {len(b.models)} models (at most {cfg.max_models}); model {name!r} is new"
    if identity not in b.replicas and len(b.replicas) >= cfg.max_replicas:
        return f"the broker has {len(b.replicas)} replicas connected (at most {cfg.max_replicas})"
    holder = b.replicas.get(b.replica_ids.get(replica_id, b""))
    if (
        holder is not None
        and holder.identity != identity
        and now - holder.last_seen <= cfg.dead_after_ms / 1000
    ):
        return (
            f"replica id {replica_id!r} is in use by a live connection (heard from"
            f" {(now - holder.last_seen) * 1000:.0f} ms ago); a replica that restarted is let in"
            f" once the old connection is dead ({cfg.dead_after_ms} ms of silence)"
        )
    model = b.models.get(name)
    if model is None:
        return ""
    if version not in model.known_versions and len(model.known_versions) >= MAX_VERSIONS:
        return f"model {name!r} has known {len(model.known_versions)} versions (at most {MAX_VERSIONS})"
    others = [
        r for r in model.replicas.values() if r.identity != identity and r.state is not ReplicaState.DEAD
    ]
    for r in others:
        if (r.input_dtype, r.input_shape) != input_type:
            return (
                f"model {name!r} takes {_input_text(r.input_dtype, r.input_shape)} inputs (replica"
                f" {r.replica_id}), this replica {_input_text(*input_type)}: serve another input type"
                f" under another model name"
            )
    for r in others:
        if r.version == version and r.fingerprint != fingerprint:
            theirs, mine = r.fingerprint or "none", fingerprint or "none"
            return (
                f"model {name!r} version {version!r} is served with fingerprint {theirs!r} (replica"
                f" {r.replica_id}), this replica's is {mine!r}: other code needs another version"
                f" (ketch model serve --version), or the old replicas gone first"
            )
    return ""


def note_fingerprint(model: Model, version: str, fingerprint: str) -> None:
    """What ``version``'s replicas serve, now that one announcing ``fingerprint`` is let in."""
    before = model.fingerprints.get(version)
    if before == fingerprint:
        return
    if before is not None:
        model.fingerprint_changes += 1
        log.warning(
            "model version serves other code",
            model=model.name,
            version=version,
            fingerprint=fingerprint,
            was=before,
            note="no replica of the old code is left; its cached answers no longer serve",
        )
    model.fingerprints[version] = fingerprint


def _input_text(dtype: int, shape: tuple[int, ...]) -> str:
    return f"{proto.dtype_name(dtype)} of shape {shape_text(shape)}"
