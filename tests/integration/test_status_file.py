"""The Python runtime's status file (``KETCH_STATUS_FILE``, read by ``docker/ketch-probe``):
"connecting" before the broker's Welcome, "ready" after it, refreshed while a long batch
computes, "connecting" again when the broker is gone, and removed when the replica stops."""

from __future__ import annotations

import os
import threading
import time

import pytest
from ketch import Client
from ketch.admin import Admin
from ketch.local import wait_for

from tests.conftest import ThreadBroker

pytestmark = pytest.mark.timeout(60)


def slow(xs):
    time.sleep(2.5)
    return [float(x.sum()) for x in xs]


def test_ready_while_registered_fresh_while_busy_removed_at_exit(tmp_path, thread_broker, replica_threads):
    status = tmp_path / "status"
    replica = replica_threads(slow, backend=thread_broker.backend, name="slow", status_file=str(status))
    wait_for(lambda: status.exists() and status.read_text() == "ready\n", 10, "ready")
    with Client(thread_broker.frontend) as client:
        with Admin(thread_broker.admin) as admin:
            admin.create_app("s", input_type="float64", input_shape=[-1], slo_ms=20_000, models=["slow"])
        done = threading.Event()
        threading.Thread(target=lambda: (client.predict("s", [1.0, 2.0]), done.set()), daemon=True).start()
        time.sleep(1.0)
        # mid-batch: the heartbeat thread still rewrites the file
        before = os.stat(status).st_mtime
        wait_for(lambda: os.stat(status).st_mtime > before, 3, "a refresh during the batch")
        assert status.read_text() == "ready\n"
        assert done.wait(10)
    replica.stop()
    wait_for(lambda: not status.exists(), 10, "the status file to go")


def test_connecting_when_the_broker_is_gone(tmp_path, replica_threads):
    broker = ThreadBroker(heartbeat_ms=100, dead_after_ms=500)
    status = tmp_path / "status"
    try:
        replica_threads(lambda xs: xs, backend=broker.backend, name="m", status_file=str(status))
        wait_for(lambda: status.exists() and status.read_text() == "ready\n", 10, "ready")
    finally:
        broker.stop()
    wait_for(lambda: status.read_text() == "connecting\n", 10, "connecting once the broker is silent")
