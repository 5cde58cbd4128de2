"""``GET /metrics``: Prometheus text of the broker's figures and the gateway's own.

Broker figures are read from the admin socket at each scrape (``stats``, ``status``) and
turned into metric families by ``ketch.broker_metrics`` (the series listed there, the same
as the broker's own ``/metrics``); nothing of them is kept here. The gateway measures its own
HTTP side with real histograms: request latency and queries per request, per route and
app. With several workers, those live in prometheus-client's multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, set up by ``ketch gateway``), so any worker's scrape shows
the sum over all workers.

    ketch_http_requests_total{route,app,code}
    ketch_http_request_duration_seconds{route,app}   histogram
    ketch_http_queries_per_request{route,app}        histogram
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from ketch.broker_metrics import CONTENT_TYPE, BrokerFigures

__all__ = ["CONTENT_TYPE", "BrokerFigures", "GatewayMetrics"]
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
QUERY_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class GatewayMetrics:
    """The gateway's own figures, and the text of a scrape."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        disable_created_metrics()  # no *_created series: they double the text and say little here
        self.multiprocess_dir = multiprocess_dir or os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.requests = Counter(
            "ketch_http_requests",
            "HTTP requests answered, by route, app and status code.",
            ["route", "app", "code"],
            registry=None,
        )
        self.latency = Histogram(
            "ketch_http_request_duration_seconds",
            "Time from the request's arrival at the gateway to its answer.",
            ["route", "app"],
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        self.queries = Histogram(
            "ketch_http_queries_per_request",
            "Queries carried by one HTTP request (a batch or a KServe tensor's first dimension).",
            ["route", "app"],
            buckets=QUERY_BUCKETS,
            registry=None,
        )

    def observe(self, route: str, app: str, status: int, seconds: float, queries: int) -> None:
        self.requests.labels(route, app, str(status)).inc()
        self.latency.labels(route, app).observe(seconds)
        if queries:
            self.queries.labels(route, app).observe(queries)

    def render(self, figures: dict[str, Any] | None) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        if self.multiprocess_dir:
            MultiProcessCollector(registry, path=self.multiprocess_dir)
        else:
            for metric in (self.requests, self.latency, self.queries):
                registry.register(metric)
        registry.register(BrokerFigures(figures))
        return generate_latest(registry)
