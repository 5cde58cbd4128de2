"""Configuration that survives a broker restart: apps, models and learned policy state in SQLite.

Reads happen once, at start. Writes are handed to a writer thread through a queue so
the broker loop never waits on the disk; ``close`` flushes what is pending. ``notify``
asks the writer to report (on an inproc socket the broker polls) once everything queued
before it is committed, so an admin change is acknowledged only when it is durable:

    frames of a report      meaning
    [token]                 every write queued before the token is on disk
    [token, reason]         the transaction that held them failed (the file is locked by
                            another process, the disk is full, ...): the broker answers the
                            admin change with an error instead of acknowledging it

The file is in WAL mode, so readers of it (a backup, ``sqlite3`` in a shell) never block
the broker's writes, and every commit is synced (``synchronous=FULL``). A write that fails
is kept, newest document per row, and tried again with every later transaction and on
its own after a back-off (0.25 s doubling to 5 s), until it commits: what the broker holds
in memory reaches the disk once the disk takes it. ``unsaved`` and ``last_error`` say
what is waiting and why (``ketch broker status --json``).
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
BUSY_TIMEOUT_S = 2.0  # a locked file is waited for this long per transaction, then reported
RETRY_FIRST_S = 0.25
RETRY_MAX_S = 5.0


class StateStore:
    def __init__(
        self, path: str, ctx: zmq.Context[Any] | None = None, notify_address: str | None = None
    ) -> None:
        self.path = path
        self._ctx = ctx
        self._notify_address = notify_address
        self.writes_queued = 0
        self.unsaved = 0  # rows whose newest document failed to commit and waits for a retry
        self.last_error = ""
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=BUSY_TIMEOUT_S)
        self._journal(path)
        self._db.executescript(_SCHEMA)
        self._db.commit()
        self._writes: queue.Queue[Any] = queue.Queue()
        self._failed: dict[tuple[str, str], str | None] = {}  # (table, name) -> doc (None: delete)
        self._thread = threading.Thread(target=self._writer, name="ketchd-store", daemon=True)
        self._thread.start()

    def _journal(self, path: str) -> None:
        if path == ":memory:":
            return
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.Error as exc:  # another process holds the file: keep its journal mode
            mode = f"unchanged ({exc})"
        self._db.execute("PRAGMA synchronous=FULL")
        if mode != "wal":
            log.warning("state store not in WAL mode: readers of the file can delay writes", mode=mode)

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
        """Send ``token`` to the notify socket once every earlier write is committed (or failed)."""
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
        backoff = RETRY_FIRST_S
        while True:
            try:
                item = self._writes.get(timeout=backoff if self._failed else None)
            except queue.Empty:  # only failed writes wait: try them again on their own
                backoff = RETRY_FIRST_S if self._apply([], notify) else min(RETRY_MAX_S, backoff * 2)
                continue
            if item is _STOP:
                self._apply([], notify)
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
                    self._apply([], notify)
                    return
                batch.append(more)
            if self._apply(batch, notify):
                backoff = RETRY_FIRST_S

    def _apply(self, batch: list[tuple[str, Any, str | None]], notify: zmq.Socket[Any] | None) -> bool:
        """Commit the failed writes waiting and ``batch`` in one transaction; report its tokens."""
        rows = dict(self._failed)
        for table, name, doc in batch:
            if table:
                rows[(table, name)] = doc  # the newest document of a row wins
        error = ""
        if rows:
            try:
                with self._db:
                    for (table, name), doc in rows.items():
                        if doc is None:
                            self._db.execute(f"DELETE FROM {table} WHERE name = ?", (name,))
                        else:
                            self._db.execute(
                                f"INSERT INTO {table} (name, doc) VALUES (?, ?) "
                                "ON CONFLICT(name) DO UPDATE SET doc = excluded.doc",
                                (name, doc),
                            )
            except sqlite3.Error as exc:
                error = f"{type(exc).__name__}: {exc}"
        if error:
            if not self._failed:
                log.error("state store write failed; retrying", error=error, rows=len(rows), path=self.path)
            self._failed = rows
        elif self._failed:
            log.info("state store writes saved after failing", rows=len(self._failed), path=self.path)
            self._failed = {}
        self.unsaved = len(self._failed)
        self.last_error = error
        if notify is not None:
            for table, token, _ in batch:
                if not table:
                    frames = [token.to_bytes(8, "little")]
                    notify.send_multipart([*frames, error.encode("utf-8")] if error else frames)
        return not error

    def close(self) -> None:
        self._writes.put(_STOP)
        self._thread.join(timeout=10)
        if self._failed:
            log.error(
                "state store: changes not saved at close", rows=len(self._failed), error=self.last_error
            )
        self._db.close()
