"""CurveZMQ keys: encryption and authentication on all three broker sockets.

Keys are pyzmq certificate files (``zmq.auth.create_certificates``): ``NAME.key`` holds the
public key, ``NAME.key_secret`` both. The broker has one key pair; each role (clients,
containers, admins) has a folder of the public keys it lets in. A peer names the broker's
public key file and its own secret key file, by argument or by ``KETCH_CURVE_SERVER_KEY``
and ``KETCH_CURVE_SECRET``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth


def generate(directory: str, name: str) -> tuple[Path, Path]:
    """Create ``NAME.key`` and ``NAME.key_secret`` in ``directory``; returns both paths."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return Path(public), Path(secret)


@dataclass(frozen=True)
class PeerKeys:
    """What a client, container or admin needs to reach a Curve broker."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def load(cls, server_key_file: str | None = None, secret_file: str | None = None) -> PeerKeys | None:
        server_key_file = server_key_file or os.environ.get("KETCH_CURVE_SERVER_KEY")
        secret_file = secret_file or os.environ.get("KETCH_CURVE_SECRET")
        if not server_key_file and not secret_file:
            return None
        if not (server_key_file and secret_file):
            raise ValueError("Curve needs both the broker's public key file and this peer's secret key file")
        server_public, _ = zmq.auth.load_certificate(server_key_file)
        public, secret = zmq.auth.load_certificate(secret_file)
        if secret is None:
            raise ValueError(f"{secret_file} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    def apply(self, sock: zmq.Socket) -> None:
        """Make ``sock`` a Curve client of the broker (before it connects)."""
        sock.curve_serverkey = self.server_public
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret


def apply_from_env(sock: zmq.Socket, keys: PeerKeys | None = None) -> None:
    keys = keys or PeerKeys.load()
    if keys is not None:
        keys.apply(sock)
