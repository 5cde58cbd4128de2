"""``ketch demo``: the main job in one command.

Starts a broker, serves a scikit-learn logistic regression (iris) with N replica
processes, creates an app, sends real queries (one at a time for latency, then
pipelined for throughput), checks every answer against the model computed here, prints
a summary, and stops everything it started.
"""

from __future__ import annotations

import time

import click
import numpy as np

from ketch import errors
from ketch.client import Client
from ketch.local import LocalBroker, LocalModel


def _quantiles(ms: list[float]) -> dict[str, float]:
    arr = np.asarray(ms)
    return {f"p{q}": float(np.percentile(arr, q)) for q in (50, 90, 99)}


def run_demo(queries: int = 5000, replicas: int = 2, slo_ms: float = 50.0) -> int:
    from ketch.examples import iris

    # every query is a distinct input (iris rows plus a little noise), so each one reaches
    # a replica rather than the prediction cache; answers are checked against the model here
    rng = np.random.default_rng(0)
    base = iris.features()
    rows = base[rng.integers(0, len(base), size=queries + 1200)] + rng.normal(
        0, 0.05, size=(queries + 1200, 4)
    )
    expected = iris.estimator().predict(rows)
    click.echo(f"starting a broker and {replicas} replicas of a scikit-learn model (iris) ...")
    with LocalBroker() as broker:
        model = LocalModel(
            "ketch.examples.iris:model",
            "iris",
            backend=broker.backend,
            version="1",
            replicas=replicas,
            input_shape="4",
        )
        with model, broker.admin_client() as admin:
            admin.create_app(
                "iris", input_type="float64", input_shape=[4], slo_ms=slo_ms, default=-1, models=["iris"]
            )
            model.wait_ready(admin, timeout_s=60)
            click.echo(f"broker {broker.frontend}, app 'iris' (SLO {slo_ms:g} ms), {replicas} replicas ready")
            with Client(broker.frontend) as client:
                for i in range(200):  # warm-up
                    client.predict("iris", rows[i])
                # latency: one query at a time
                n_single = min(1000, queries)
                single_ms, wrong, defaults, failed = [], 0, 0, 0
                for i in range(n_single):
                    j = 200 + i
                    try:
                        pred = client.predict("iris", rows[j])
                    except errors.RequestError:
                        failed += 1
                        continue
                    single_ms.append(pred.latency_ms)
                    defaults += pred.default
                    wrong += (not pred.default) and int(pred.output) != int(expected[j])
                # throughput: pipelined
                idx = np.arange(queries) + 1200
                t0 = time.perf_counter()
                preds = client.predict_many("iris", [rows[j] for j in idx], window=64, return_exceptions=True)
                elapsed = time.perf_counter() - t0
                # a busy machine can make admission refuse what it reckons cannot finish inside
                # the SLO (OVERLOADED, with a retry_after_ms): asked again after that, as a
                # client should; the refusals are counted and shown
                refused = [k for k, p in enumerate(preds) if isinstance(p, errors.Overloaded)]
                if refused:
                    pause_ms = max(getattr(preds[k], "retry_after_ms", 0) for k in refused)
                    time.sleep(min(pause_ms, 1000) / 1000)
                    again = client.predict_many(
                        "iris", [rows[idx[k]] for k in refused], window=64, return_exceptions=True
                    )
                    for k, pred in zip(refused, again, strict=True):
                        preds[k] = pred
            many_ms, bad = [], set()
            for k, (j, pred) in enumerate(zip(idx, preds, strict=True)):
                if isinstance(pred, Exception):
                    failed += 1
                    bad.add(k)
                    continue
                many_ms.append(pred.broker_latency_ms)
                defaults += pred.default
                wrong += (not pred.default) and int(pred.output) != int(expected[j])
            stats = admin.stats()
    single = _quantiles(single_ms)
    many = _quantiles(many_ms)
    mstats = stats["models"]["iris"]
    total = n_single + queries
    click.echo("")
    click.echo(f"{'phase':34} {'queries':>8} {'q/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    click.echo(
        f"{'one at a time (round trip)':34} {n_single:8d} {n_single / (sum(single_ms) / 1000):9.0f} "
        f"{single['p50']:8.3f} {single['p90']:8.3f} {single['p99']:8.3f}"
    )
    click.echo(
        f"{'pipelined (time in broker)':34} {queries:8d} {queries / elapsed:9.0f} "
        f"{many['p50']:8.3f} {many['p90']:8.3f} {many['p99']:8.3f}"
    )
    click.echo("")
    click.echo(
        f"answers: {total - failed} of {total}, defaults {defaults}, errors {failed}, "
        f"refused while busy and answered when asked again {len(refused) - sum(k in bad for k in refused)}, "
        f"wrong vs local model {wrong}; mean batch {mstats['mean_batch']}, batches {mstats['batches']},"
        f" cache hits {mstats['cache_hits']}"
    )
    click.echo("stopped the broker and the replicas")
    if defaults == total - failed:
        click.echo("no answer came from the model (each was the default): see the broker's log", err=True)
    return 0 if failed == 0 and wrong == 0 and defaults < total - failed else 1
