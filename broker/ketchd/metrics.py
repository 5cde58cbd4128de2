"""The broker's own ``/metrics`` (``ketchd --metrics HOST:PORT``): Prometheus text of its
figures, with no gateway needed (a broker run ``--no-http`` is scraped here).

The HTTP server (the standard library's WSGI server running prometheus-client's app, on
threads of its own) never reads the broker's
state: at each scrape it asks the loop over an ``inproc://`` socket, and the loop answers
with what the admin ops ``stats`` and ``status`` return, between two turns like any other
message. ``ketch.broker_metrics.BrokerFigures`` renders them, the collector the gateway's
``/metrics`` uses too, so the two show the same series. A loop that does not answer within
``SCRAPE_TIMEOUT_S`` gives ``ketch_broker_up 0``.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
import zmq

if TYPE_CHECKING:
    from ketchd.broker import Broker

log = structlog.get_logger("ketchd")

SCRAPE_TIMEOUT_S = 5.0
POLL_S = 0.05
_STATS = json.dumps({"op": "stats"}).encode()
_STATUS = json.dumps({"op": "status"}).encode()
_ids = itertools.count(1)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: one the system picks) as (host, port)."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:7003")
    return host, int(port)


class MetricsEndpoint:
    """The loop's side (an inproc ROUTER it polls) and the HTTP server that asks it."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.address = f"inproc://ketchd-metrics-{next(_ids)}"
        self.sock: zmq.Socket[Any] | None = None
        self.httpd: WSGIServer | None = None

    def start(self, listen: str) -> str:
        """Bind the inproc socket and serve HTTP on ``listen``; returns the URL scraped."""
        from prometheus_client import CollectorRegistry, make_wsgi_app

        host, port = parse_listen(listen)
        sock: zmq.Socket[Any] = self.broker.ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.bind(self.address)
        self.sock = sock
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Scrape(self.broker.ctx, self.address))
        self.httpd = _serve(host, port, make_wsgi_app(registry))
        bound = self.httpd.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{bound}/metrics"

    def on_request(self, frames: list[zmq.Frame]) -> None:
        """A scrape's question, answered with the figures of ``stats`` and ``status``."""
        assert self.sock is not None
        ops = self.broker.admin_ops
        stats, status = ops.handle(_STATS), ops.handle(_STATUS)
        figures = (
            {"stats": stats["result"], "status": status["result"]} if stats["ok"] and status["ok"] else None
        )
        self.sock.send_multipart([frames[0], json.dumps(figures).encode("utf-8")])

    def close(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold the broker's exit


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no line per scrape on stderr
        pass


def _serve(host: str, port: int, app: Any) -> WSGIServer:
    """A threaded WSGI server on a thread of its own. It checks for shutdown every
    ``POLL_S`` (the standard library's 0.5 s would hold the broker's stop that long)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server = type("Server", (_Server,), {"address_family": family})
    httpd: WSGIServer = make_server(host, port, app, server, handler_class=_Quiet)
    threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": POLL_S}, name="ketchd-metrics", daemon=True
    ).start()
    return httpd


class _Scrape:
    """A collector run on the HTTP server's thread: the figures from the loop, rendered."""

    def __init__(self, ctx: zmq.Context[Any], address: str) -> None:
        self.ctx, self.address = ctx, address

    def collect(self) -> Iterator[Any]:
        from ketch.broker_metrics import BrokerFigures

        yield from BrokerFigures(self.figures()).collect()

    def figures(self) -> dict[str, Any] | None:
        sock: zmq.Socket[Any] = self.ctx.socket(zmq.DEALER)
        sock.linger = 0
        try:
            sock.connect(self.address)
            sock.send(b"")
            if not sock.poll(int(SCRAPE_TIMEOUT_S * 1000)):
                log.warning("metrics scrape: the broker loop did not answer", timeout_s=SCRAPE_TIMEOUT_S)
                return None
            figures: dict[str, Any] | None = json.loads(sock.recv())
            return figures
        except zmq.ZMQError:  # the broker is closing
            return None
        finally:
            sock.close(linger=0)
