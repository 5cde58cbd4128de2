"""The broker's figures as Prometheus metric families: one collector, ``BrokerFigures``,
over what the broker's admin ops ``stats`` and ``status`` return. The gateway's ``/metrics``
and the broker's own (``ketchd --metrics``) both render it, so both show the same series.

    ketch_broker_up                               1 when the broker answered this scrape
    ketch_broker_uptime_seconds, ketch_broker_pending_queries
    ketch_broker_events_total{event}              the broker's counters (refusals, late replies, ...)
    ketch_app_{queries,answered,defaults,errors,cache_hits}_total{app}
    ketch_app_query_duration_seconds{app,model,version}     histogram: arrival to answer
    ketch_model_{queue_depth,replicas,replicas_all_versions,batch_size_mean}{model}
    ketch_model_{batches,errors,cache_hits,coalesced,dropped,refused}_total{model}
    ketch_model_queue_wait_seconds{model,version}           histogram: each query's wait in the queue
    ketch_model_rpc_duration_seconds{model,version}         histogram: a batch's round trip less compute
    ketch_model_compute_duration_seconds{model,version}     histogram: the replica's compute_us
    ketch_model_queue_wait_p99_seconds{model}     p99 over the model's recent queries (for autoscaling)
    ketch_model_batch_size{model}                 histogram, power-of-two buckets, summed over replicas
    ketch_replica_{batches,items,errors}_total{model,version,replica}
    ketch_replica_{inflight_batches,credits,batch_size_target}, ketch_replica_state{...,state}
    ketch_replica_batch_size{model,version,replica}         histogram
    ketch_cache_{hits,misses,coalesced,inserts,evictions,expired}_total, ketch_cache_{entries,bytes,max_bytes}
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class BrokerFigures:
    """A one-scrape collector over the figures the broker's admin ops return.

    Every field is optional: a figure the broker does not report is left out, so the
    gateway keeps working against an older or newer broker.
    """

    def __init__(self, figures: dict[str, Any] | None) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ketch_broker_up",
            "1 when the broker answered this scrape (its admin socket; its loop, on its own /metrics).",
        )
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
        yield from _histograms(stats.get("histograms"))


def _counter(name: str, text: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, labels=labels)


def _fill(families: dict[str, Metric], doc: dict[str, Any], labels: list[str]) -> None:
    for key, family in families.items():
        value = doc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            family.add_metric(labels, value)


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
    for name, a in sorted(apps.items()):
        _fill(counters, a, [name])
    yield from counters.values()


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
        "ketch_model_queue_wait_p99_seconds",
        "The 99th percentile of the wait in the model's queue over its recent queries (a gauge "
        "an autoscaler reads as is; charts use ketch_model_queue_wait_seconds).",
        labels=["model"],
    )
    for name, m in sorted(models.items()):
        _fill({**gauges, **counters}, m, [name])
        p99 = (m.get("queue_wait_ms") or {}).get("p99_ms")
        if isinstance(p99, int | float):
            wait.add_metric([name], p99 / 1000)
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
    state = GaugeMetricFamily("ketch_replica_state", "1 for the replica's state.", labels=[*labels, "state"])
    sizes = HistogramMetricFamily(
        "ketch_replica_batch_size",
        "Batch sizes sent to the replica (power-of-two buckets); sum: items answered.",
        labels=labels,
    )
    for r in replicas:
        key = [str(r.get("model", "")), str(r.get("version", "")), str(r.get("replica_id", ""))]
        _fill({**counters, **gauges}, r, key)
        if "state" in r:
            state.add_metric([*key, str(r["state"])], 1.0)
        counts = _size_buckets(r.get("batch_sizes"))
        if counts:
            sizes.add_metric(key, _cumulative(counts), float(r.get("items") or 0))
    yield from counters.values()
    yield from gauges.values()
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


HISTOGRAMS = (
    (
        "query_duration",
        "ketch_app_query_duration_seconds",
        "Time from a query's arrival at the broker to its answer, by the model and version that "
        'answered (both "" for a default, an error, or an ensemble\'s combined answer).',
        ("app", "model", "version"),
    ),
    (
        "queue_wait",
        "ketch_model_queue_wait_seconds",
        "Time each query waited in the model's queue, by the version of the replica that took it.",
        ("model", "version"),
    ),
    (
        "rpc",
        "ketch_model_rpc_duration_seconds",
        "A batch's round trip to its replica (send to reply) less the replica's compute time.",
        ("model", "version"),
    ),
    (
        "compute",
        "ketch_model_compute_duration_seconds",
        "Time the replica spent computing a batch, as it reports (compute_us).",
        ("model", "version"),
    ),
)


def _histograms(doc: Any) -> Iterator[Metric]:
    """The broker's latency histograms: bounds in seconds and, per label set, counts per
    bucket (the last one +Inf) and their sum."""
    if not isinstance(doc, dict) or not isinstance(doc.get("buckets_s"), list):
        return
    bounds = [floatToGoString(b) for b in doc["buckets_s"]] + ["+Inf"]
    for key, name, text, labels in HISTOGRAMS:
        family = HistogramMetricFamily(name, text, labels=list(labels))
        for row in doc.get(key) or []:
            counts = row.get("counts")
            if not isinstance(counts, list) or len(counts) != len(bounds):
                continue  # a broker with other buckets than it says: left out, not misread
            running, buckets = 0.0, []
            for bound, n in zip(bounds, counts, strict=True):
                running += n
                buckets.append((bound, running))
            values = [str(row.get(label, "")) for label in labels]
            family.add_metric(values, buckets, float(row.get("sum_s") or 0.0))
        yield family


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
