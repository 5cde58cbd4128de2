"""Run the gateway: uvicorn with N worker processes sharing one listening socket.

The socket is bound here, before any worker starts, so ``--listen 127.0.0.1:0`` works and
the bound address can be written to a ready file. With one worker the server runs in this
process; with more, uvicorn's supervisor spawns them (each imports ``app_from_env`` and
opens its own connections to the broker) and prometheus-client keeps their figures in a
temporary multiprocess directory, removed at exit. The gRPC port is reserved here as well
(``reserve_grpc``) and each worker serves gRPC on it (``grpc_server.py``).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import structlog

from ketch import logs
from ketch.gateway.app import CONFIG_ENV, GatewayConfig
from ketch.gateway.protocol import ConnectionLimits, GuardedProtocol, connection_cap, raise_open_file_limit

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default, said here)
log = structlog.get_logger("ketch.gateway")


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket for uvicorn's workers.

    Made with ``IPPROTO_TCP`` rather than uvicorn's protocol 0: asyncio turns Nagle off
    (TCP_NODELAY) only on sockets that say they are TCP, and without that every response
    written in two parts waits for the client's delayed ACK (about 40 ms).
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def reserve_grpc(host: str, port: int) -> tuple[socket.socket, str]:
    """Hold the gRPC port for the workers: a bound, not listening ``SO_REUSEPORT`` socket.

    Each worker's ``grpc.aio`` server binds the same port with ``SO_REUSEPORT`` and the
    kernel spreads connections over the workers that listen; this socket only keeps the port
    (port 0: the one the system chose) for them and receives nothing. Returns it and the
    ``HOST:PORT`` the workers bind.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve gRPC on {host}:{port}: {exc.strerror or exc}") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot serve gRPC on {host}:{port}: {exc.strerror or exc}") from None
    bound_host, bound_port = sock.getsockname()[:2]
    return sock, (f"[{bound_host}]" if ":" in bound_host else bound_host) + f":{bound_port}"


def _shown_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)


class _Announcer(threading.Thread):
    """Tells the broker every few seconds where this gateway serves (``ketch status`` shows
    it); a broker that does not answer is simply tried again later."""

    def __init__(self, config: GatewayConfig, url: str, every_s: float = 10.0) -> None:
        super().__init__(name="ketch-gateway-announce", daemon=True)
        self.config, self.url, self.every_s = config, url, every_s

    def run(self) -> None:
        from ketch import errors
        from ketch.admin import Admin

        with Admin(self.config.admin, timeout_ms=2000) as admin:
            while True:
                with contextlib.suppress(errors.KetchError):
                    admin.register_gateway(self.url)
                time.sleep(self.every_s)


def serve(
    config: GatewayConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workers: int = 1,
    ready_file: str | None = None,
    log_level: str = "warning",
    grpc: tuple[str, int] | None = None,
    grpc_optional: bool = False,
) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code. ``grpc``: (host, port) to serve
    the Open Inference Protocol's gRPC service on too, in every worker; ``grpc_optional``
    (its port was a default, not asked for): a taken port is a warning, and HTTP is served
    without gRPC."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    grpc_hold = None
    if grpc is not None:
        try:
            grpc_hold, config.grpc = reserve_grpc(*grpc)
        except OSError as exc:
            if not grpc_optional:
                raise
            log.warning(
                "no gRPC: its default port is not free; give --grpc HOST:PORT, or --no-grpc",
                error=exc.strerror or str(exc),
            )
    os.environ[CONFIG_ENV] = config.to_env()
    metrics_dir = None
    if workers > 1 and not os.environ.get(MULTIPROC_ENV):
        metrics_dir = tempfile.mkdtemp(prefix="ketch-gateway-metrics-")
        os.environ[MULTIPROC_ENV] = metrics_dir
    uv_config = uvicorn.Config(
        "ketch.gateway.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        lifespan="on",
        access_log=False,  # the gateway writes its own access lines (access.py)
        log_config=logs.stdlib_config(["uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"]),
        log_level=log_level,
        server_header=False,
        timeout_graceful_shutdown=10,
        timeout_keep_alive=KEEP_ALIVE_S,
        http=GuardedProtocol,  # read times and connections bounded (protocol.py)
    )
    # read by GuardedProtocol in each worker (the config travels to spawned workers whole)
    uv_config.ketch_limits = ConnectionLimits(
        max_connections=config.max_connections,
        header_timeout_s=config.header_timeout_s,
        body_timeout_s=config.body_timeout_s,
        min_body_rate=config.min_body_rate,
        send_timeout_s=config.send_timeout_s,
    )
    open_files = raise_open_file_limit()
    try:
        sock = bind(host, port)
        bound_host, bound_port = sock.getsockname()[:2]
        log.info(
            "gateway listening",
            url=f"http://{host}:{bound_port}",
            grpc=config.grpc or None,
            workers=workers,
            broker=config.frontend,
            connections_per_worker=connection_cap(config.max_connections),
            open_files=open_files,
        )
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        _Announcer(config, f"http://{_shown_host(url_host)}:{bound_port}").start()
        if ready_file:
            path = Path(ready_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(
                json.dumps(
                    {
                        "pid": os.getpid(),
                        "url": f"http://{url_host}:{bound_port}",
                        "grpc": config.grpc or None,
                        "workers": workers,
                    }
                )
            )
            tmp.replace(path)
        # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again:
        # make that a clean exit rather than a traceback or a death by signal
        signal.signal(signal.SIGTERM, _exit_quietly)
        if workers > 1:
            # uvicorn before 0.36 wants the worker's entry point; later ones make it themselves
            wants_target = "target" in inspect.signature(Multiprocess.__init__).parameters
            extra = {"target": uvicorn.Server(uv_config).run} if wants_target else {}
            Multiprocess(uv_config, sockets=[sock], **extra).run()
            return 0
        server = uvicorn.Server(uv_config)
        with contextlib.suppress(KeyboardInterrupt):
            server.run(sockets=[sock])
        return 0 if server.started else 1
    finally:
        if grpc_hold is not None:
            grpc_hold.close()
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
