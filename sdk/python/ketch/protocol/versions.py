"""Protocol versions (docs/protocol.md section 3): the ones this package speaks, the choice.

- Version 1 is the protocol as released (``schemas/released/ketch-v1.fbs``).
- Version 2 adds the negotiation itself (``Hello.versions``: what a container speaks;
  ``Welcome.version``: what the broker chose) and one message, ``Paused`` (broker to
  container, the answer to ``Ready{credits: 0}``: no batch follows it), which a broker sends
  only on a connection that chose 2.

A container offers every version it speaks in its Hello; the broker chooses the highest one
both speak (``choose_version``). A Hello without ``versions`` is a version-1 container's:
it offers ``[1]``. Each message is stamped (``Envelope.version``) with the version that
brought its body (``stamp``, from the schema's ``since`` attribute), not with the version
chosen: every message version 1 defines stays readable by a version-1 peer on any
connection, so the broker renders them from the same templates for every replica.
"""

from __future__ import annotations

from collections.abc import Iterable

from ketch.protocol import schema

PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)  # the versions this package speaks, oldest first
PROTOCOL_VERSION = 1  # the first version: what a peer that names none speaks


def offered_versions(versions: Iterable[int]) -> tuple[int, ...]:
    """The versions a Hello offers: its ``versions``, or ``(1,)`` when it names none."""
    offered = tuple(sorted({int(v) for v in versions}))
    return offered or (PROTOCOL_VERSION,)


def choose_version(offered: Iterable[int], speaks: Iterable[int] = PROTOCOL_VERSIONS) -> int | None:
    """The highest version both sides speak (``offered`` as a Hello's ``versions``: empty is
    ``[1]``), or None when they share none."""
    common = set(offered_versions(offered)) & set(speaks)
    return max(common) if common else None


def stamp(body: str) -> int:
    """The Envelope.version of a message with this body: the version that brought it."""
    return schema.BODY_SINCE[body]


def describe(versions: Iterable[int]) -> str:
    """``1, 2``: versions as a person reads them in an error message."""
    return ", ".join(str(v) for v in sorted(versions))
