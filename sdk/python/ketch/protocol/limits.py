"""The protocol's limits on names, strings, shapes and counts, checked alike by every peer.

A broker refuses what breaks them with an explicit error (docs/protocol.md section 8); a
replica checks its own Hello with the same rules before it says it (``check_hello``), so a
mistake in a model's name is a ``ValueError`` at construction, not a refusal loop.

    names          models and apps: 1-128 letters, digits, '-', '_', '.'
    versions       1-64 of the same characters and '+'
    replica ids    1-256 printable ASCII characters, no space
    sdk            0-64 printable ASCII characters
    fingerprint    0-128 printable ASCII characters, no space
    shapes         rank 0-32; each dimension -1 (any, in an input schema) or 0 to 2**31-1
    credits        0-1024 batches held at once;  max_batch 0-65536 (0: no limit)
    uint32 fields  latencies, budgets, compute times saturate at 4294967295 (``U32_MAX``)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ketch.protocol.codec import DTYPE_NAMES
from ketch.protocol.values import TEXT_DTYPES

U32_MAX = 0xFFFFFFFF  # a uint32 field saturates here: latency_us, budgets_us, compute_us
MAX_NAME = 128
MAX_VERSION = 64
MAX_REPLICA_ID = 256
MAX_SDK = 64
MAX_FINGERPRINT = 128
MAX_RANK = 32
MAX_DIM = 2**31 - 1
MAX_CREDITS = 1024
MAX_BATCH = 65536
MAX_VERSIONS = 16  # protocol versions one Hello may offer

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
_VERSION_CHARS = _NAME_CHARS | {"+"}
_PRINTABLE = frozenset(chr(c) for c in range(0x20, 0x7F))
_TOKEN = _PRINTABLE - {" "}


def name_problem(kind: str, name: Any) -> str:
    """Why ``name`` is not a valid model or app name ('' when it is)."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME or not _NAME_CHARS.issuperset(name):
        return f"{kind} name {_shown(name)} must be 1-{MAX_NAME} letters, digits, '-', '_' or '.'"
    return ""


def version_problem(version: Any) -> str:
    if (
        not isinstance(version, str)
        or not 0 < len(version) <= MAX_VERSION
        or not _VERSION_CHARS.issuperset(version)
    ):
        return f"version {_shown(version)} must be 1-{MAX_VERSION} letters, digits, '-', '_', '.' or '+'"
    return ""


def shape_problem(shape: Sequence[int], schema: bool = False) -> str:
    """Why ``shape`` is not a valid shape ('' when it is); ``schema``: -1 (any size) allowed."""
    if len(shape) > MAX_RANK:
        return f"shape of rank {len(shape)}: at most {MAX_RANK} dimensions"
    low = -1 if schema else 0
    for d in shape:
        if not low <= d <= MAX_DIM:
            return f"dimension {d} in shape: each is {'-1 (any) or ' if schema else ''}0 to {MAX_DIM}"
    return ""


def check_hello(h: Mapping[str, Any]) -> str:
    """What is wrong with a Hello's fields (as ``read_fields`` gives them) ('' when nothing)."""
    problem = name_problem("model", h.get("model"))
    if problem:
        return problem
    problem = version_problem(h.get("model_version"))
    if problem:
        return f"model {h['model']!r}: {problem}"
    tensor = h.get("input")
    if tensor is None:
        return "hello needs an input type (input: {dtype, shape})"
    dtype, shape = tensor.get("dtype"), tensor.get("shape") or ()
    if dtype not in DTYPE_NAMES:
        return f"hello names unknown input dtype {dtype!r}"
    if dtype in TEXT_DTYPES and shape:
        return f"{DTYPE_NAMES[dtype].lower()} inputs take no shape, got {list(shape)[: MAX_RANK + 1]}"
    problem = shape_problem(shape, schema=True)
    if problem:
        return f"input {problem}"
    for key, limit, chars, least in (
        ("replica_id", MAX_REPLICA_ID, _TOKEN, 0),  # '' is allowed: the broker names it
        ("sdk", MAX_SDK, _PRINTABLE, 0),
        ("fingerprint", MAX_FINGERPRINT, _TOKEN, 0),
    ):
        value = h.get(key) or ""
        if not isinstance(value, str) or not least <= len(value) <= limit or not chars.issuperset(value):
            kind = "printable ASCII" if chars is _PRINTABLE else "printable ASCII without spaces"
            return f"{key} {_shown(value)} must be at most {limit} characters of {kind}"
    versions = h.get("versions") or ()
    if len(versions) > MAX_VERSIONS:
        return f"versions: at most {MAX_VERSIONS} protocol versions may be offered, got {len(versions)}"
    credits, max_batch = h.get("credits", 2), h.get("max_batch", 0)
    if not isinstance(credits, int) or not 0 <= credits <= MAX_CREDITS:
        return f"credits {credits!r} must be 0 to {MAX_CREDITS}"
    if not isinstance(max_batch, int) or not 0 <= max_batch <= MAX_BATCH:
        return f"max_batch {max_batch!r} must be 0 (no limit) to {MAX_BATCH}"
    return ""


def _shown(value: Any) -> str:
    """A value for an error message, cut to a readable length (a name may be megabytes)."""
    if isinstance(value, str) and len(value) > 60:
        return f"{value[:40]!r}... ({len(value)} characters)"
    return repr(value)
