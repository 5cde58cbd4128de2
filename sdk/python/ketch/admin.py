"""``ketch.Admin``: the broker's control API (JSON over the admin socket)."""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import zmq

from ketch import addresses, errors
from ketch.curve import PeerKeys
from ketch.protocol.multipart import CONNECT_TIMEOUT_MS

DEFAULT_ADMIN = addresses.ADMIN


class Admin:
    """Create and inspect apps, models and replicas. ``Admin(address)``; default ``$KETCH_ADMIN``."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout_ms: float = 5000,
        context: zmq.Context | None = None,
        curve: PeerKeys | None = None,
    ):
        self.address = address or os.environ.get("KETCH_ADMIN") or DEFAULT_ADMIN
        self._curve = curve or PeerKeys.load()
        self.timeout_ms = timeout_ms
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.linger = 0
            self._sock.connect_timeout = CONNECT_TIMEOUT_MS
            if self._curve is not None:
                self._curve.apply(self._sock)
            self._sock.connect(self.address)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, op: str, **args: Any) -> Any:
        """Run one admin op; raises the op's RequestError, or Unavailable when nobody answers."""
        sock = self._socket()
        req_id = next(self._ids)
        # a DEALER with no peer (none listens, or a Curve handshake was refused) blocks on
        # send: wait for room as long as for the answer, then say nobody answers
        try:
            if not sock.poll(self.timeout_ms, zmq.POLLOUT):
                raise zmq.Again
            sock.send(json.dumps({"id": req_id, "op": op, "args": args}).encode("utf-8"), zmq.NOBLOCK)
        except zmq.Again:
            self.close()
            raise errors.Unavailable(f"no answer from the broker's admin socket at {self.address}") from None
        while True:
            if not sock.poll(self.timeout_ms):
                # a lost reply would desynchronise the socket: start afresh next time
                self.close()
                raise errors.Unavailable(f"no answer from the broker's admin socket at {self.address}")
            reply = json.loads(sock.recv())
            if reply.get("id") == req_id:
                break
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        raise errors.raise_for(
            errors.code_of_name(err.get("code", "INTERNAL")), err.get("message", "admin op failed")
        )

    # convenience wrappers, one per op
    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def create_app(
        self,
        name: str,
        *,
        input_type: str,
        input_shape: list[int] | tuple[int, ...] = (),
        slo_ms: float | None = None,
        default: Any = None,
        models: list[str] | None = None,
        cache: bool = True,
        finite_only: bool = False,
    ) -> dict[str, Any]:
        return self.call(
            "app.create",
            name=name,
            input_type=input_type,
            input_shape=list(input_shape),
            slo_ms=slo_ms,
            default=default,
            models=models or [],
            cache=cache,
            finite_only=finite_only,
        )

    def configure_app(
        self, name: str, *, cache: bool | None = None, slo_ms: float | None = None
    ) -> dict[str, Any]:
        return self.call("app.configure", name=name, cache=cache, slo_ms=slo_ms)

    def list_apps(self) -> list[dict[str, Any]]:
        return self.call("app.list")

    def show_app(self, name: str) -> dict[str, Any]:
        return self.call("app.show", name=name)

    def delete_app(self, name: str) -> dict[str, Any]:
        return self.call("app.delete", name=name)

    def link(self, app: str, model: str) -> dict[str, Any]:
        return self.call("app.link", app=app, model=model)

    def unlink(self, app: str, model: str) -> dict[str, Any]:
        return self.call("app.unlink", app=app, model=model)

    def set_policy(self, app: str, policy: str, **options: Any) -> dict[str, Any]:
        """How ``app`` uses its models: "single", "weighted", "shadow", "exp3", "exp4"/"ensemble"."""
        return self.call("app.set_policy", name=app, policy=policy, options=options)

    def list_models(self) -> list[dict[str, Any]]:
        return self.call("model.list")

    def show_model(self, name: str) -> dict[str, Any]:
        return self.call("model.show", name=name)

    def delete_model(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """Forget a model with no live replica; ``force`` unlinks it from the apps linking it."""
        return self.call("model.delete", name=name, force=force)

    def register_gateway(self, url: str) -> dict[str, Any]:
        """Tell the broker an HTTP gateway serves at ``url`` (``status`` lists it for a minute)."""
        return self.call("gateway.register", url=url)

    def set_version(self, name: str, version: str) -> dict[str, Any]:
        return self.call("model.set_version", name=name, version=str(version))

    def rollback(self, name: str) -> dict[str, Any]:
        return self.call("model.rollback", name=name)

    def configure_model(
        self,
        name: str,
        *,
        max_batch: int | None = None,
        max_queue: int | None = None,
        batching: str | None = None,
        batch_delay_ms: float | None = None,
        create: bool = False,
    ) -> dict[str, Any]:
        """Set a model's queue policy; ``batching`` is "model", "aimd" or "fixed".

        ``create``: register the model first if the broker does not know it yet.
        """
        return self.call(
            "model.configure",
            name=name,
            max_batch=max_batch,
            max_queue=max_queue,
            batching=batching,
            batch_delay_ms=batch_delay_ms,
            create=create,
        )

    def drain(self, model: str, replica: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Ask the replicas of ``model`` (or one, or those of one version) to finish what they
        hold and leave."""
        if version is None:
            return self.call("model.drain", name=model, replica=replica)
        return self.call("model.drain", name=model, replica=replica, version=version)

    def replicas(self, model: str | None = None) -> list[dict[str, Any]]:
        return self.call("replica.list", model=model)

    def stats(self) -> dict[str, Any]:
        return self.call("stats")

    def stop_broker(self) -> dict[str, Any]:
        return self.call("broker.stop")
