"""The broker's side of version negotiation on the backend (docs/protocol.md section 3).

A container's Hello offers the versions it speaks (``Hello.versions``; none named is a
version-1 container: ``[1]``). The broker chooses the highest one it speaks too, names it in
the Welcome, and keeps it on the replica (``Replica.protocol``); a Hello that shares no
version with the broker is refused with ``UNSUPPORTED_VERSION`` naming the broker's. What
the broker sends a replica then depends on that choice: only a replica that chose 2 gets a
``Paused`` when it offers no credits (a version-1 container would answer it
``UNKNOWN_MESSAGE``). Everything else goes out stamped with the version that brought its
body, the same bytes for every replica (``ketch.protocol.versions``).
"""

from __future__ import annotations

from typing import Any

from ketch import protocol as proto

from ketchd.registry import Replica

PAUSED_SINCE = proto.stamp("Paused")


def choose(hello: dict[str, Any]) -> tuple[int | None, str]:
    """The version chosen for a container's Hello (as ``proto.read_fields`` reads it), or
    ``(None, why)`` when the broker speaks none of those it offers."""
    offered = proto.offered_versions(hello.get("versions") or ())
    chosen = proto.choose_version(offered)
    if chosen is None:
        return None, (
            f"protocol versions {proto.versions.describe(offered)} are not supported"
            f" (this broker speaks {proto.versions.describe(proto.PROTOCOL_VERSIONS)})"
        )
    return chosen, ""


def welcome(heartbeat_ms: int, dead_after_ms: int, version: int) -> bytes:
    """The Welcome naming the chosen version (a version-1 container ignores the field)."""
    return proto.encode(
        "Welcome", {"heartbeat_ms": heartbeat_ms, "dead_after_ms": dead_after_ms, "version": version}
    )


def paused(replica: Replica) -> bytes | None:
    """The answer to a replica's ``Ready``: a ``Paused`` when it offers no credits and chose a
    version that has the message (every batch sent to it before arrives before this), else
    nothing."""
    if replica.credits != 0 or replica.protocol < PAUSED_SINCE:
        return None
    return proto.encode("Paused", {"inflight": len(replica.inflight)})
