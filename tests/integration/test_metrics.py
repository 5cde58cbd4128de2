"""The broker's Prometheus histograms, its own ``/metrics``, and the tools that read them.

A real broker process (``ketchd``, its /metrics on a free port) and a real replica process
(``ketch model serve``) answer real queries; ``promtool check metrics`` reads the broker's
and the gateway's text, a real ``prometheus`` scrapes the broker every second and charts
p99 by model from the histograms, and every expression of the shipped Grafana dashboard
names series the broker exports. prometheus and promtool are Debian's (scripts/setup.sh
unpacks them into .tools/prometheus); without them these tests skip, unless
KETCH_REQUIRE_PROMTOOL=1 (set by scripts/test.sh) or KETCH_REQUIRE_DEPLOY_TOOLS=1.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import httpx
import ketch
import pytest
from ketch.local import LocalBroker, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
E2E = "ketch_app_query_duration_seconds"
HISTOGRAMS = (
    (E2E, {"app", "model", "version"}),
    ("ketch_model_queue_wait_seconds", {"model", "version"}),
    ("ketch_model_rpc_duration_seconds", {"model", "version"}),
    ("ketch_model_compute_duration_seconds", {"model", "version"}),
)


def tool(name: str) -> str:
    found = shutil.which(name) or next(
        (str(p) for p in [ROOT / ".tools" / "prometheus" / name] if os.access(p, os.X_OK)), None
    )
    if found is None:
        if "1" in (os.environ.get("KETCH_REQUIRE_PROMTOOL"), os.environ.get("KETCH_REQUIRE_DEPLOY_TOOLS")):
            pytest.fail(f"{name} is missing (scripts/setup.sh --test unpacks it into .tools/prometheus)")
        pytest.skip(f"{name} is missing (scripts/setup.sh --test unpacks it into .tools/prometheus)")
    return found


def promtool_clean(text: str) -> None:
    """``promtool check metrics`` finds nothing to say of ``text``."""
    check = subprocess.run(
        [tool("promtool"), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr


def samples(text: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def served(broker_process, start_model):
    """A broker process, one replica process of model ``total`` version 3, and queries
    answered through it: (broker, client)."""
    with broker_process.admin_client() as admin, ketch.Client(broker_process.frontend) as client:
        admin.create_app(
            "sum", input_type="float64", input_shape=[-1], slo_ms=5000, default=0, models=["total"]
        )
        admin.create_app("ghostly", input_type="float64", input_shape=[-1], slo_ms=50, default=-1)
        start_model("ketch.examples.basic:total", "total", version="3").wait_ready(admin, timeout_s=60)
        yield broker_process, client


def scrape(url: str) -> str:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def test_broker_serves_latency_histograms_on_its_own_port(served):
    broker, client = served
    url = broker.endpoints["metrics"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url) and not url.endswith(":0/metrics")
    for i in range(20):  # distinct inputs: each computed, none from the cache
        assert client.predict("sum", [float(i), 1.0]).output == i + 1
    assert client.predict("ghostly", [1.0]).default  # no model: the app's default
    m = samples(scrape(url))
    assert m["ketch_broker_up"][()] == 1
    for name, labels in HISTOGRAMS:
        rows = m[f"{name}_count"]
        assert rows and all({k for k, _ in key} == labels for key in rows), name
        for key, count in rows.items():  # buckets are cumulative and end at the count
            buckets = sorted(
                (float(dict(k)["le"]), v)
                for k, v in m[f"{name}_bucket"].items()
                if {x for x in k if x[0] != "le"} == set(key)
            )
            assert buckets[-1] == (math.inf, count)
            assert all(a[1] <= b[1] for a, b in itertools.pairwise(buckets))
            assert m[f"{name}_sum"][key] >= 0
    answered = (("app", "sum"), ("model", "total"), ("version", "3"))
    assert m[f"{E2E}_count"][answered] == 20
    assert m[f"{E2E}_count"][(("app", "ghostly"), ("model", ""), ("version", ""))] == 1
    per_version = (("model", "total"), ("version", "3"))
    batches = m["ketch_model_batches_total"][(("model", "total"),)]
    assert m["ketch_model_compute_duration_seconds_count"][per_version] == batches  # one per batch
    assert m["ketch_model_rpc_duration_seconds_count"][per_version] == batches
    assert m["ketch_model_queue_wait_seconds_count"][per_version] == 20  # one per query
    # the same histograms through the admin socket (what the gateway renders)
    with broker.admin_client() as admin:
        stats = admin.stats()
        assert admin.status()["endpoints"]["metrics"] == url  # where its other addresses are
    (row,) = [r for r in stats["histograms"]["query_duration"] if r["app"] == "sum"]
    assert (row["model"], row["version"]) == ("total", "3")
    assert sum(row["counts"]) == 20 and len(row["counts"]) == len(stats["histograms"]["buckets_s"]) + 1


def test_promtool_finds_the_broker_and_gateway_metrics_clean(served):
    from ketch.gateway.local import LocalGateway

    broker, client = served
    client.predict_many("sum", [[float(i)] for i in range(10)])
    client.predict("ghostly", [1.0])
    broker_text = scrape(broker.endpoints["metrics"])
    promtool_clean(broker_text)
    with LocalGateway(broker.frontend, broker.admin) as gw:
        assert httpx.post(f"{gw.url}/sum/predict", json={"input": [1.0, 2.0]}, timeout=10).status_code == 200
        gateway_text = scrape(f"{gw.url}/metrics")
    promtool_clean(gateway_text)
    # the gateway shows the broker's histogram series, as the broker's own /metrics does
    ours = {n for n in samples(broker_text) if n.startswith(tuple(name for name, _ in HISTOGRAMS))}
    assert ours and ours <= set(samples(gateway_text))


def test_a_broker_without_metrics_serves_none(tmp_path):
    with LocalBroker(str(tmp_path / "s.db"), extra_args=["--no-metrics"]) as broker:
        assert "metrics" not in broker.endpoints
        with broker.admin_client() as admin:
            assert "metrics" not in admin.status()["endpoints"]


def test_a_metrics_port_in_use_is_one_clear_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = LocalBroker(str(tmp_path / "s.db"), extra_args=["--metrics", f"127.0.0.1:{port}"])
        with pytest.raises(RuntimeError) as failed:
            broker.start()
    assert f"cannot serve metrics on 127.0.0.1:{port}: the address is in use" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def test_prometheus_charts_p99_by_model_from_the_histograms(served, tmp_path):
    broker, client = served
    target = broker.endpoints["metrics"].removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [{"job_name": "ketchd", "static_configs": [{"targets": [target]}]}],
            }
        )
    )
    listen = f"127.0.0.1:{free_port()}"
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 (the child holds it)
    proc = subprocess.Popen(
        [
            tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={listen}",
        ],
        stdout=log,
        stderr=log,
        cwd=tmp_path,
    )
    log.close()
    api = f"http://{listen}/api/v1"
    query = f"histogram_quantile(0.99, sum by (le, model) (rate({E2E}_bucket[30s])))"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
        try:
            return httpx.get(f"http://{listen}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    sent = 0

    def charted() -> float | None:
        nonlocal sent
        if sent < 2000:  # bounded: queries until Prometheus has two scrapes that saw them
            client.predict_many("sum", [[float(sent + i), 0.5] for i in range(20)])
            sent += 20
        r = httpx.get(f"{api}/query", params={"query": query}, timeout=5).json()
        assert r["status"] == "success", r
        by_model = {row["metric"].get("model"): float(row["value"][1]) for row in r["data"]["result"]}
        value = by_model.get("total")
        return value if value is not None and math.isfinite(value) else None

    try:
        wait_for(ready, 30, "prometheus to be ready")

        def scraped() -> bool:  # the broker is its one target, and up
            targets = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
            assert [t["scrapeUrl"] for t in targets] in ([], [broker.endpoints["metrics"]])
            return bool(targets) and targets[0]["health"] == "up"

        wait_for(scraped, 30, "prometheus to scrape the broker")
        p99 = wait_for(charted, 60, "a finite p99 of model total from Prometheus", interval_s=0.2)
        assert 0 < p99 <= 5.0  # seconds: the app's SLO bounds every answer
        # the chart by app and by model, as the dashboard draws them
        r = httpx.get(
            f"{api}/query",
            params={"query": f"histogram_quantile(0.5, sum by (le, app) (rate({E2E}_bucket[30s])))"},
            timeout=5,
        ).json()
        assert "sum" in {row["metric"].get("app") for row in r["data"]["result"]}
        # every panel of the shipped dashboard charts something from this broker
        dashboard = json.loads(DASHBOARD.read_text())
        for expr in [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]:
            filled = expr.replace("$__rate_interval", "30s").replace("$app", ".*").replace("$model", ".*")

            def answered(filled: str = filled) -> bool:
                r = httpx.get(f"{api}/query", params={"query": filled}, timeout=5).json()
                assert r["status"] == "success", (filled, r)
                return bool(r["data"]["result"])

            wait_for(answered, 30, f"a series for {filled}", interval_s=0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_every_dashboard_expression_names_series_the_broker_exports(served, tmp_path):
    broker, client = served
    client.predict_many("sum", [[float(i)] for i in range(5)])
    client.predict("ghostly", [1.0])
    exported = set(samples(scrape(broker.endpoints["metrics"])))
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 10
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    for expr in exprs + variables:
        bare = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^]]*\]', "", expr)  # no selectors, strings, ranges
        names = {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if n.startswith("ketch_")}
        assert names, expr
        missing = names - exported
        assert not missing, f"{expr}: {sorted(missing)} not exported by the broker"
    # and each is PromQL that Prometheus's own parser takes (Grafana's variables filled in)
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"ketch:dashboard_{i}",
                        "expr": expr.replace("$__rate_interval", "1m")
                        .replace("$app", ".*")
                        .replace("$model", ".*"),
                    }
                    for i, expr in enumerate(exprs)
                ],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run(
        [tool("promtool"), "check", "rules", str(tmp_path / "rules.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("value", ["7003", "localhost", "127.0.0.1:http", "127.0.0.1:70000", ":7003"])
def test_a_metrics_address_that_is_not_host_port_is_a_usage_error(value):
    from click.testing import CliRunner
    from ketchd.__main__ import main

    result = CliRunner().invoke(main, ["--metrics", value, "--state", ":memory:"])
    assert result.exit_code == 2 and "--metrics" in result.output and "HOST:PORT" in result.output
