"""Multipart send and receive for the hot paths, without pyzmq's per-call Python layer.

``Socket.send_multipart`` type-checks every frame, goes through the Python-level
``Socket.send`` (routing-id and group handling) and combines flags as enums;
``recv_multipart`` asks ``getsockopt(RCVMORE)`` after every frame. For the three small
frames of a query that is about 3 us of Python per send and 2 us per receive (hot; more
on a cold cache), paid by client, broker and replica on every round trip. These call
pyzmq's compiled ``send``/``recv`` directly and read ``Frame.more``.

Copy rule: bytes and memoryviews under ``zmq.COPY_THRESHOLD`` are copied (cheaper than
tracking a zero-copy buffer), received ``Frame``s are forwarded as they are, anything
larger goes zero-copy, as ``send_multipart(copy=False)`` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
from zmq.backend import Socket as _Compiled

_send = _Compiled.send
_recv = _Compiled.recv
_get = _Compiled.get
SNDMORE = int(zmq.SNDMORE)
NOBLOCK = int(zmq.NOBLOCK)
EVENTS = int(zmq.EVENTS)
POLLIN = int(zmq.POLLIN)
_SMALL = zmq.COPY_THRESHOLD

# How long one TCP connect may wait for an answer (ZMQ_CONNECT_TIMEOUT; the system's default
# is about two minutes). A peer that reconnects at the moment its broker goes away can send
# its SYN to an address nobody answers any more (a Kubernetes Service still routing to the
# deleted pod): without a bound, that one attempt holds the socket for minutes before
# ZeroMQ tries again, reaching the new broker. Set on every socket that connects.
CONNECT_TIMEOUT_MS = 2000


def _copy(frame: Any) -> bool:
    kind = type(frame)
    if kind is bytes:
        return len(frame) < _SMALL
    if kind is memoryview:
        nbytes: int = frame.nbytes
        return nbytes < _SMALL
    return False  # a Frame (sent as it is) or another buffer (zero-copy unless small)


def send(sock: zmq.Socket[Any], frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` as one multipart message (``flags``: 0 or NOBLOCK)."""
    last = len(frames) - 1
    more = SNDMORE | flags
    for i in range(last):
        frame = frames[i]
        _send(sock, frame, more, _copy(frame))
    frame = frames[last]
    _send(sock, frame, flags, _copy(frame))


def recv(sock: zmq.Socket[Any], flags: int = 0, limit: int = 0) -> list[zmq.Frame]:
    """One multipart message as Frames (``flags``: 0 or NOBLOCK; raises zmq.Again).

    With ``limit``, at most ``limit + 1`` frames are kept: the frames of a longer message
    past those are received and dropped at once, so a message of a million frames costs
    the time to take them but not the memory to hold them (one frame more than ``limit``
    says the message was longer)."""
    frame = _recv(sock, flags, False)
    frames = [frame]
    if limit:
        while frame.more:
            frame = _recv(sock, flags, False)
            if len(frames) <= limit:
                frames.append(frame)
        return frames
    while frame.more:
        frame = _recv(sock, flags, False)
        frames.append(frame)
    return frames


def waiting(sock: zmq.Socket[Any]) -> bool:
    """Whether a message can be received now, without blocking."""
    events: Any = _get(sock, EVENTS)  # an int for EVENTS
    return bool(events & POLLIN)
