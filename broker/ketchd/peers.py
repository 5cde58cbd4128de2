"""Replica connections: a replica whose connection closes is gone at once.

A replica killed with SIGKILL (or whose machine drops it) is closed by its kernel, and
the broker's end of the TCP connection hears so at once. ZeroMQ hides connections behind
the ROUTER socket but reports them to a socket monitor: ``EVENT_DISCONNECTED`` names the
connection by its file descriptor. The broker learns which descriptor carries which
replica from the replica's Hello (the ``zmq.SRCFD`` of the frame it came in), and when
that descriptor disconnects, the replica is gone: its queries in flight are re-queued
(``Containers.replica_gone``) within a turn of the loop instead of after
``dead_after_ms`` of silence. This holds whatever the replica's language: it is the
connection, not the SDK, that closes.

Heartbeats stay for what TCP cannot see: a replica that hangs keeps its connection open,
and only its silence (``dead_after_ms``) ends it.

Why not ``ZMQ_ROUTER_NOTIFY`` (the ROUTER itself delivering an empty message with the
peer's identity on disconnect): it is a draft option of libzmq, and the libzmq that
pyzmq's wheels bundle is built without draft options (setting it fails with EINVAL).

Order: the I/O thread reports a connection closed before its descriptor can be reused,
and a new connection's Hello arrives only after it was accepted; the events waiting on
the monitor are read before a Hello's descriptor is learnt (``learn``), so an event
about an old connection never ends the new one that took its descriptor.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd")


class Connections:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.identities: dict[int, bytes] = {}  # file descriptor -> identity of its replica
        self.monitor: zmq.Socket[Any] | None = None

    def start(self, backend: zmq.Socket[Any]) -> zmq.Socket[Any]:
        """Monitor ``backend``'s connections; returns the socket the events come on."""
        self.monitor = backend.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.monitor.linger = 0
        return self.monitor

    def learn(self, identity: bytes, frame: zmq.Frame) -> None:
        """``frame`` came from the replica ``identity``: remember its connection."""
        self.take_events()  # earlier events concern connections closed before this one spoke
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:  # a transport without descriptors (inproc)
            return
        if isinstance(fd, int) and fd >= 0:
            self.identities[fd] = identity

    def take_events(self) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        while True:
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.on_event(frames)

    def on_monitor(self, frames: list[zmq.Frame]) -> None:
        """The broker loop's handler for the monitor socket."""
        self.on_event([f.bytes for f in frames])

    def on_event(self, frames: list[bytes]) -> None:
        try:
            event = parse_monitor_message(frames)
        except (ValueError, IndexError, TypeError):  # pragma: no cover - libzmq's own format
            return
        if event["event"] != zmq.EVENT_DISCONNECTED:
            return
        identity = self.identities.pop(int(event["value"]), None)
        b = self.broker
        replica = b.replicas.get(identity) if identity is not None else None
        if replica is None:
            return  # said goodbye, or replaced, before its connection closed
        b.counters["replicas_disconnected"] += 1
        b.containers.replica_gone(replica, "connection closed", time.monotonic())

    def close(self, backend: zmq.Socket[Any] | None) -> None:
        if self.monitor is not None:
            if backend is not None and not backend.closed:
                backend.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
