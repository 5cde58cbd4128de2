"""Configuration that survives a broker restart: apps and models in SQLite.

Reads happen once, at start. Writes are handed to a writer thread through a queue so
the broker loop never waits on the disk; ``close`` flushes what is pending. ``notify``
asks the writer to report (on an inproc socket the broker polls) once everything queued
before it is committed, so an admin change is acknowledged only when it is durable.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from pathlib import Path
from typing import Any

import structlog
import zmq

log = structlog.get_logger("ketchd.store")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS apps (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
"""
_TABLES = ("apps", "models", "policies")
_STOP = object()


class StateStore:
    def __init__(
        self, path: str, ctx: zmq.Context[Any] | None = None, notify_address: str | None = None
    ) -> None:
        self.path = path
        self._ctx = ctx
        self._notify_address = notify_address
        self.writes_queued = 0
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._db.commit()
        self._writes: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="ketchd-store", daemon=True)
        self._thread.start()

    def load(self, table: str) -> list[dict[str, Any]]:
        assert table in _TABLES
        rows = self._db.execute(f"SELECT doc FROM {table} ORDER BY name").fetchall()
        return [json.loads(doc) for (doc,) in rows]

    def put(self, table: str, name: str, doc: dict[str, Any]) -> None:
        assert table in _TABLES
        self.writes_queued += 1
        self._writes.put((table, name, json.dumps(doc)))

    def delete(self, table: str, name: str) -> None:
        assert table in _TABLES
        self.writes_queued += 1
        self._writes.put((table, name, None))

    def notify(self, token: int) -> None:
        """Send ``token`` to the notify socket once every earlier write is committed."""
        self._writes.put(("", token, None))

    def _writer(self) -> None:
        notify = None
        if self._ctx is not None and self._notify_address:
            notify = self._ctx.socket(zmq.PAIR)
            notify.linger = 0
            notify.connect(self._notify_address)
        try:
            self._write_loop(notify)
        finally:
            if notify is not None:
                notify.close()

    def _write_loop(self, notify: zmq.Socket[Any] | None) -> None:
        while True:
            item = self._writes.get()
            if item is _STOP:
                return
            batch = [item]
            # take whatever else is already waiting: one transaction for a burst
            while True:
                try:
                    more = self._writes.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._apply(batch, notify)
                    return
                batch.append(more)
            self._apply(batch, notify)

    def _apply(self, batch: list[tuple[str, Any, str | None]], notify: zmq.Socket[Any] | None) -> None:
        try:
            with self._db:
                for table, name, doc in batch:
                    if not table:
                        continue
                    if doc is None:
                        self._db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
                    else:
                        self._db.execute(
                            f"INSERT INTO {table} (name, doc) VALUES (?, ?) "
                            "ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
                            (name, doc),
                        )
        except sqlite3.Error as exc:
            log.error("state store write failed", error=str(exc), writes=len(batch))
        if notify is not None:
            for table, token, _ in batch:
                if not table:
                    notify.send(token.to_bytes(8, "little"))

    def close(self) -> None:
        self._writes.put(_STOP)
        self._thread.join(timeout=10)
        self._db.close()
