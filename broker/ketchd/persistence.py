"""What the broker keeps across restarts, and the admin socket whose changes it keeps.

Apps, models and the policies' learned state live in SQLite (``StateStore``), written on
the store's own thread. An admin change is acknowledged only once the writer reports (over
an inproc PAIR socket) that it is committed; when it reports the write failed, the change
is answered with an error instead (``not_saved``).
"""

from __future__ import annotations

import itertools
import json
from typing import TYPE_CHECKING, Any

import structlog
import zmq

from ketchd.policies import Policy
from ketchd.registry import App, Model
from ketchd.store import StateStore

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd")


class Persistence:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.store: StateStore | None = None
        self.durable: zmq.Socket[Any] | None = None  # the store's notifications of commits
        self._held_admin: dict[int, tuple[bytes, bytes]] = {}  # admin replies held until committed
        self._seq = itertools.count()

    def load(self) -> None:
        """Open the store and load apps, models and policy state."""
        b = self.broker
        self.durable = b.ctx.socket(zmq.PAIR)
        self.durable.linger = 0
        address = f"inproc://ketchd-store-{id(b)}"
        self.durable.bind(address)
        self.store = StateStore(b.config.state_path, b.ctx, address)
        for doc in self.store.load("models"):
            model = Model.from_json(doc)
            model.queue = type(model.queue)()
            b.models[model.name] = model
        states = {doc["app"]: doc["state"] for doc in self.store.load("policies")}
        for doc in self.store.load("apps"):
            app = App.from_json(doc)
            if app.name in states:
                try:
                    app.policy = Policy.from_state(states[app.name])
                except ValueError as exc:
                    log.warning("policy state not loaded", app=app.name, error=str(exc))
            b.apps[app.name] = app
        log.info("state loaded", path=b.config.state_path, apps=len(b.apps), models=len(b.models))

    def on_admin(self, frames: list[zmq.Frame]) -> None:
        identity = frames[0].bytes
        store = self.store
        writes = store.writes_queued if store is not None else 0
        request = frames[-1].bytes if len(frames) > 1 else b""
        reply = json.dumps(self.broker.admin_ops.handle(request)).encode("utf-8")
        if store is not None and store.writes_queued != writes:
            # acknowledge a change only once it is on disk
            token = next(self._seq)
            self._held_admin[token] = (identity, reply)
            store.notify(token)
        else:
            self.broker.admin.send_multipart([identity, reply])

    def refuse(self, identity: bytes, code: str, message: str) -> None:
        """An admin message refused before it was read (no id to echo)."""
        reply = {"id": None, "ok": False, "error": {"code": code, "message": message}}
        self.broker.admin.send_multipart([identity, json.dumps(reply).encode("utf-8")])

    def on_durable(self, frames: list[zmq.Frame]) -> None:
        held = self._held_admin.pop(int.from_bytes(frames[0].bytes, "little"), None)
        if held is not None:
            identity, reply = held
            if len(frames) > 1:  # the write failed (store.py): an error, not an acknowledgement
                reply = self.not_saved(reply, frames[1].bytes)
            self.broker.admin.send_multipart([identity, reply])

    def not_saved(self, reply: bytes, reason: bytes) -> bytes:
        """The answer to an admin change whose write to the state file failed, for ``reply``."""
        try:
            req_id = json.loads(reply).get("id")
        except ValueError:
            req_id = None
        message = (
            f"the change was not saved to the state file {self.broker.config.state_path}: "
            f"{reason.decode('utf-8', 'replace')}. It is in effect in this broker but would not "
            "survive a restart; the broker keeps trying to save it (ketch broker status --json: "
            "state_unsaved)"
        )
        error = {"code": "INTERNAL", "message": message}
        return json.dumps({"id": req_id, "ok": False, "error": error}).encode("utf-8")

    def persist_app(self, app: App) -> None:
        if self.store is not None:
            self.store.put("apps", app.name, app.to_json())

    def persist_model(self, model: Model) -> None:
        if self.store is not None:
            self.store.put("models", model.name, model.to_json())

    def forget_app(self, name: str) -> None:
        """Delete an app and its learned state: an app created later under its name starts afresh."""
        if self.store is not None:
            self.store.delete("apps", name)
            self.store.delete("policies", name)

    def forget_model(self, name: str) -> None:
        if self.store is not None:
            self.store.delete("models", name)

    def save_policies(self, everything: bool = False) -> None:
        """Write the learned state of the policies that changed (at most once a second)."""
        if self.store is None:
            return
        for app in self.broker.apps.values():
            if app.policy_dirty or everything:
                app.policy_dirty = False
                self.store.put("policies", app.name, {"app": app.name, "state": app.policy.state()})

    def close(self) -> None:
        if self.store is not None:
            self.save_policies()
            self.store.close()
            self.store = None
        if self.durable is not None and not self.durable.closed:
            self.durable.close(linger=0)
