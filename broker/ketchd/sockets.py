"""The broker's three ROUTER sockets, with CurveZMQ when keys are configured."""

from __future__ import annotations

from typing import Any

import structlog
import zmq

from ketchd.config import BrokerConfig

log = structlog.get_logger("ketchd")


class Sockets:
    """Creates and binds the frontend, backend and admin sockets; owns the authenticator."""

    def __init__(self, config: BrokerConfig, ctx: zmq.Context[Any]) -> None:
        self.config, self.ctx = config, ctx
        self.endpoints: dict[str, str] = {}
        self._roles: dict[zmq.Socket[Any], str] = {}
        self._auth: Any = None  # zmq.auth.thread.ThreadAuthenticator when Curve is on
        self._keys: tuple[bytes, bytes] | None = None

    def start_curve(self) -> None:
        cfg = self.config
        if not cfg.curve_secret:
            return
        import zmq.auth
        from zmq.auth.thread import ThreadAuthenticator

        folders = {"frontend": cfg.curve_clients, "backend": cfg.curve_containers, "admin": cfg.curve_admins}
        flags = {"frontend": "--curve-clients", "backend": "--curve-containers", "admin": "--curve-admins"}
        missing = [flags[role] for role, folder in folders.items() if not folder]
        if missing:
            raise ValueError(f"Curve is on: {', '.join(missing)} must name folders of allowed public keys")
        public, secret = zmq.auth.load_certificate(cfg.curve_secret)
        if secret is None:
            raise ValueError(f"{cfg.curve_secret} holds no secret key (use the .key_secret file)")
        self._keys = (public, secret)
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        for role, folder in folders.items():
            self._auth.configure_curve(domain=role, location=folder)
        log.info("curve on", **folders)

    def router(self, address: str, role: str) -> zmq.Socket[Any]:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        if self._keys is not None:
            sock.zap_domain = role.encode()
            sock.curve_publickey, sock.curve_secretkey = self._keys
            sock.curve_server = True
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.sndhwm = 100_000
        sock.rcvhwm = 100_000
        sock.bind(address)
        self.endpoints[role] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._roles[sock] = role
        return sock

    def role(self, sock: zmq.Socket[Any]) -> str:
        """``frontend``, ``backend`` or ``admin`` (``internal`` for the broker's own)."""
        return self._roles.get(sock, "internal")

    def stop_curve(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
