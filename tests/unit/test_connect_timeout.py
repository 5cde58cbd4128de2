"""Every socket that connects bounds a TCP connect that nobody answers (see
``ketch.protocol.multipart.CONNECT_TIMEOUT_MS``): after a broker's pod is replaced, a reconnect may
go to the old, silent address, and must give up in seconds, not the system's two minutes."""

from __future__ import annotations

import asyncio

import zmq
import zmq.asyncio
from ketch import AsyncClient, Client, Replica
from ketch.admin import Admin
from ketch.gateway.backend import AsyncAdmin
from ketch.protocol.multipart import CONNECT_TIMEOUT_MS

ADDRESS = "tcp://127.0.0.1:9"  # nothing listens: no connection is ever made


def test_the_bound_is_seconds():
    assert 0 < CONNECT_TIMEOUT_MS <= 5000


def test_clients_admins_and_replicas_set_it():
    with Client(ADDRESS) as client:
        assert client._sock.connect_timeout == CONNECT_TIMEOUT_MS
    admin = Admin(ADDRESS)
    try:
        assert admin._socket().connect_timeout == CONNECT_TIMEOUT_MS
    finally:
        admin.close()
    replica = Replica(lambda xs: xs, name="m", broker=ADDRESS)
    sock = replica._connect()
    try:
        assert sock.connect_timeout == CONNECT_TIMEOUT_MS
    finally:
        sock.close(linger=0)


def test_async_client_and_the_gateways_admin_set_it():
    async def check() -> None:
        ctx = zmq.asyncio.Context()
        try:
            async with AsyncClient(ADDRESS, context=ctx) as client:
                assert client._sock.connect_timeout == CONNECT_TIMEOUT_MS
            admin = AsyncAdmin(ADDRESS, context=ctx)
            assert admin._sock.connect_timeout == CONNECT_TIMEOUT_MS
            await admin.close()
        finally:
            ctx.term()

    asyncio.run(check())
