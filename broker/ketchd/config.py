"""Broker settings, with the defaults a user gets from ``ketch broker start``."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ketch import addresses


def default_state_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ketch" / "ketch.db"


@dataclass
class BrokerConfig:
    frontend: str = addresses.FRONTEND
    backend: str = addresses.BACKEND
    admin: str = addresses.ADMIN
    # HOST:PORT of the broker's own Prometheus /metrics (HTTP; port 0: any); None: not served
    metrics: str | None = addresses.METRICS
    # SQLite file holding apps and models; ":memory:" keeps nothing across restarts
    state_path: str = field(default_factory=lambda: str(default_state_path()))
    heartbeat_ms: int = 1000
    dead_after_ms: int = 5000
    # a dead replica's queries go back one by one (each alone: a poison input then kills at
    # most two replicas) while that costs the pool about this long, else together as one
    # batch (Containers.replica_gone); 0: always together, a large value: always one by one
    requeue_alone_ms: float = 50.0
    max_batch: int = 64  # per model unless the model or replica asks for less
    max_queue: int = 10_000  # per model; past it queries are refused OVERLOADED
    max_message_bytes: int = 64 * 1024 * 1024  # a message, all its frames together (ketchd.limits)
    default_slo_ms: float = 100.0
    retry_after_ms: int = 50
    cache_bytes: int = 256 * 1024 * 1024  # prediction cache bound; 0 turns the cache off
    cache_ttl_s: float = 0.0  # 0: cached predictions do not expire
    max_client_outstanding: int = 10_000  # queries one client may have in the broker at once
    feedback_memory: int = 100_000  # answered multi-model queries kept for feedback
    # what one message, one client and all clients may cost (ketchd.limits, docs/reliability.md)
    max_message_items: int = 1024  # request ids in one Query
    max_context_bytes: int = 1024  # a Query's context (selection key)
    max_label_bytes: int = 64 * 1024  # a Feedback's label and input payloads
    max_client_bytes: int = 256 * 1024 * 1024  # payload bytes one client's held queries may hold
    max_held_bytes: int = 1024 * 1024 * 1024  # payload bytes all held queries may hold
    feedback_memory_bytes: int = 128 * 1024 * 1024  # answers kept for feedback, in bytes
    max_models: int = 1024  # models a Hello may make the broker know (each holds figures)
    max_replicas: int = 4096  # replicas connected at once
    # CurveZMQ: the broker's secret key file turns it on; each role lets in the public
    # keys found in its folder
    curve_secret: str | None = None
    curve_clients: str | None = None
    curve_containers: str | None = None
    curve_admins: str | None = None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP literal, ``localhost`` or a ZMQ interface name) is this machine only."""
    host = host.strip("[]")
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, an interface, '*': others may reach it


def exposed(endpoint: str) -> bool:
    """Whether a ZMQ bind ``endpoint`` can be reached from other machines.

    ``ipc://`` and ``inproc://`` never can; ``tcp://HOST:PORT`` can unless HOST is loopback
    (``*``, ``0.0.0.0``, an interface or a host name can); any other transport can.
    """
    scheme, sep, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return False
    if scheme != "tcp" or not sep:
        return True
    host = rest.rpartition(":")[0] or rest
    return not is_loopback(host)
