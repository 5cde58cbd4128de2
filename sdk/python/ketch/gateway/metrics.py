"""``GET /metrics``: Prometheus text of the broker's figures and the gateway's own.

Broker figures are read from the admin socket at each scrape (``stats``, ``status``) and
turned into metric families; nothing of them is kept here. The gateway measures its own
HTTP side with real histograms: request latency and queries per request, per route and
app. With several workers, those live in prometheus-client's multiprocess files
(``PROMETHEUS_MULTIPROC_DIR``, set up by ``ketch gateway``), so any worker's scrape shows
the sum over all workers.

    ketch_broker_up                               1 when the broker's admin socket answered
    ketch_broker_uptime_seconds, ketch_broker_pending_queries
    ketch_broker_events_total{event}              the broker's counters (refusals, late replies, ...)
    ketch_app_{queries,answered,defaults,errors,cache_hits}_total{app}
    ketch_app_latency_milliseconds{app,quantile}  broker-side quantiles (the broker keeps no buckets)
    ketch_model_{queue_depth,replicas,replicas_all_versions,batch_size_mean}{model}
    ketch_model_{batches,errors,cache_hits,coalesced,dropped,refused}_total{model}
    ketch_model_queue_wait_milliseconds{model,quantile}
    ketch_model_batch_size{model}                 histogram, power-of-two buckets, summed over replicas
    ketch_replica_{batches,items,errors}_total{model,version,replica}
    ketch_replica_{inflight_batches,credits,batch_size_target}, ketch_replica_state{...,state}
    ketch_replica_{compute,rpc}_milliseconds{...,quantile}, ketch_replica_batch_size (histogram)
    ketch_cache_{hits,misses,coalesced,inserts,evictions,expired}_total, ketch_cache_{entries,bytes,max_bytes}
    ketch_http_requests_total{route,app,code}
    ketch_http_request_duration_seconds{route,app}   histogram
    ketch_http_queries_per_request{route,app}        histogram
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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


class BrokerFigures:
    """A one-scrape collector over the figures the broker's admin ops return.

    Every field is optional: a figure the broker does not report is left out, so the
    gateway keeps working against an older or newer broker.
    """

    def __init__(self, figures: dict[str, Any] | None) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ketch_broker_up", "1 when the broker's admin socket answered this scrape.")
        up.add_metric([], 1.0 if self.figures else 0.0)
        yield up
        if not self.figures:
            return
        stats = self.figures.get("stats") or {}
        yield from _broker(self.figures.get("status") or {}, stats.get("counters"))
        yield from _apps(stats.get("apps") or {})
        replicas = stats.get("replicas") or []
        yield from _models(stats.get("models") or {}, replicas)
        yield from _replicas(replicas)
        yield from _cache(stats.get("cache"))


def _counter(name: str, text: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, labels=labels)


def _fill(families: dict[str, Metric], doc: dict[str, Any], labels: list[str]) -> None:
    for key, family in families.items():
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            family.add_metric(labels, value)


def _quantiles(family: GaugeMetricFamily, summary: Any, labels: list[str]) -> None:
    if isinstance(summary, dict):
        for q, key in (("0.5", "p50_ms"), ("0.99", "p99_ms")):
            if key in summary:
                family.add_metric([*labels, q], summary[key])


def _broker(status: dict[str, Any], counters: dict[str, Any] | None) -> Iterator[Metric]:
    if "uptime_s" in status:
        yield GaugeMetricFamily(
            "ketch_broker_uptime_seconds", "Seconds since the broker started.", status["uptime_s"]
        )
    if "pending" in status:
        yield GaugeMetricFamily(
            "ketch_broker_pending_queries",
            "Queries the broker holds (queued or at a replica).",
            status["pending"],
        )
    events = _counter(
        "ketch_broker_events", "The broker's event counters (refusals, late replies, ...).", ["event"]
    )
    for name, value in sorted((counters or {}).items()):
        events.add_metric([name], value)
    yield events


def _apps(apps: dict[str, Any]) -> Iterator[Metric]:
    counters = {
        key: _counter(f"ketch_app_{key}", text, ["app"])
        for key, text in (
            ("queries", "Queries the app received."),
            ("answered", "Queries answered by a model (or the cache)."),
            ("defaults", "Queries answered with the app's default."),
            ("errors", "Queries answered with an error."),
            ("cache_hits", "Queries answered from the prediction cache."),
        )
    }
    latency = GaugeMetricFamily(
        "ketch_app_latency_milliseconds",
        "Broker-side latency quantiles over the app's recent queries.",
        labels=["app", "quantile"],
    )
    for name, a in sorted(apps.items()):
        _fill(counters, a, [name])
        _quantiles(latency, a, [name])
    yield from counters.values()
    yield latency


def _models(models: dict[str, Any], replicas: list[dict[str, Any]]) -> Iterator[Metric]:
    gauges = {
        key: GaugeMetricFamily(f"ketch_model_{metric}", text, labels=["model"])
        for key, metric, text in (
            ("queue_depth", "queue_depth", "Queries waiting in the model's queue."),
            ("replicas", "replicas", "Live replicas of the active version."),
            ("replicas_all_versions", "replicas_all_versions", "Live replicas of every version."),
            ("mean_batch", "batch_size_mean", "Mean batch size sent to the model's replicas."),
        )
    }
    counters = {
        key: _counter(f"ketch_model_{key}", text, ["model"])
        for key, text in (
            ("batches", "Batches sent to the model's replicas."),
            ("errors", "Queries the model failed."),
            ("cache_hits", "Queries for the model answered from the prediction cache."),
            ("coalesced", "Queries that waited for an identical query in flight instead of computing."),
            ("dropped", "Queries given up before dispatch (their deadline could not be met)."),
            ("refused", "Queries refused because the model's queue was full."),
        )
    }
    wait = GaugeMetricFamily(
        "ketch_model_queue_wait_milliseconds",
        "Quantiles of the time queries waited in the model's queue.",
        labels=["model", "quantile"],
    )
    for name, m in sorted(models.items()):
        _fill({**gauges, **counters}, m, [name])
        _quantiles(wait, m.get("queue_wait_ms"), [name])
    yield from gauges.values()
    yield from counters.values()
    yield wait
    sizes = HistogramMetricFamily(
        "ketch_model_batch_size",
        "Batch sizes sent to the model's replicas (power-of-two buckets); sum: items answered.",
        labels=["model"],
    )
    per_model: dict[str, tuple[dict[float, int], float]] = {}
    for r in replicas:
        counts, total = per_model.get(str(r.get("model", "")), ({}, 0.0))
        for upper, n in _size_buckets(r.get("batch_sizes")).items():
            counts[upper] = counts.get(upper, 0) + n
        per_model[str(r.get("model", ""))] = (counts, total + float(r.get("items") or 0))
    for name, (counts, total) in sorted(per_model.items()):
        if counts:
            sizes.add_metric([name], _cumulative(counts), total)
    yield sizes


def _replicas(replicas: list[dict[str, Any]]) -> Iterator[Metric]:
    labels = ["model", "version", "replica"]
    counters = {
        key: _counter(f"ketch_replica_{key}", text, labels)
        for key, text in (
            ("batches", "Batches the replica answered."),
            ("items", "Queries the replica answered."),
            ("errors", "Queries the replica failed."),
        )
    }
    gauges = {
        key: GaugeMetricFamily(f"ketch_replica_{metric}", text, labels=labels)
        for key, metric, text in (
            ("inflight", "inflight_batches", "Batches the replica holds."),
            ("credits", "credits", "Batches the replica takes at once."),
            ("batch_size", "batch_size_target", "The batch size the broker's controller aims at now."),
        )
    }
    timings = {
        key: GaugeMetricFamily(f"ketch_replica_{metric}", text, labels=[*labels, "quantile"])
        for key, metric, text in (
            ("compute_ms", "compute_milliseconds", "Quantiles of the time the model spent on a batch."),
            ("rpc_ms", "rpc_milliseconds", "Quantiles of a batch's round trip to the replica."),
        )
    }
    state = GaugeMetricFamily("ketch_replica_state", "1 for the replica's state.", labels=[*labels, "state"])
    sizes = HistogramMetricFamily(
        "ketch_replica_batch_size",
        "Batch sizes sent to the replica (power-of-two buckets); sum: items answered.",
        labels=labels,
    )
    for r in replicas:
        key = [str(r.get("model", "")), str(r.get("version", "")), str(r.get("replica_id", ""))]
        _fill({**counters, **gauges}, r, key)
        for name, family in timings.items():
            _quantiles(family, r.get(name), key)
        if "state" in r:
            state.add_metric([*key, str(r["state"])], 1.0)
        counts = _size_buckets(r.get("batch_sizes"))
        if counts:
            sizes.add_metric(key, _cumulative(counts), float(r.get("items") or 0))
    yield from counters.values()
    yield from gauges.values()
    yield from timings.values()
    yield state
    yield sizes


def _cache(cache: dict[str, Any] | None) -> Iterator[Metric]:
    if not isinstance(cache, dict):
        return
    counters = {
        key: _counter(f"ketch_cache_{key}", text, [])
        for key, text in (
            ("hits", "Lookups answered from the prediction cache."),
            ("misses", "Lookups not in the cache."),
            ("coalesced", "Queries that joined an identical query in flight."),
            ("inserts", "Answers stored."),
            ("evictions", "Entries evicted for room."),
            ("expired", "Entries dropped past their TTL."),
        )
    }
    gauges = {
        key: GaugeMetricFamily(f"ketch_cache_{key}", text)
        for key, text in (
            ("entries", "Entries in the cache."),
            ("bytes", "Bytes the cache holds."),
            ("max_bytes", "The cache's size limit in bytes."),
        )
    }
    _fill({**counters, **gauges}, cache, [])
    yield from counters.values()
    yield from gauges.values()


def _size_buckets(sizes: Any) -> dict[float, int]:
    """The broker's ``{"1": n, "2": n, "3-4": n, ...}`` as {upper bound: count}."""
    out: dict[float, int] = {}
    if not isinstance(sizes, dict):
        return out
    for label, count in sizes.items():
        try:
            upper = float(str(label).rpartition("-")[2])
        except ValueError:
            continue
        out[upper] = out.get(upper, 0) + int(count)
    return out


def _cumulative(counts: dict[float, int]) -> list[tuple[str, float]]:
    buckets, running = [], 0
    for upper in sorted(counts):
        running += counts[upper]
        buckets.append((floatToGoString(upper), float(running)))
    buckets.append(("+Inf", float(running)))
    return buckets
