"""``ketch status``: one overview of a broker (its addresses, HTTP gateways, apps with their
models, versions, replicas, readiness, queues and recent latency), as a table or JSON.

``overview`` is pure: it assembles the document from four admin answers (status, app.list,
model.list, stats), so the gateway's status page (``ketch.gateway.page``) shows the same.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ketch._clikit import handles_errors, table_lines

LIVE = ("ready", "busy")


def overview(
    status: dict[str, Any], apps: list[dict[str, Any]], models: list[dict[str, Any]], stats: dict[str, Any]
) -> dict[str, Any]:
    """The overview document (``ketch status --json``)."""
    model_docs = []
    ready_models = set()
    for m in models:
        versions: dict[str, dict[str, Any]] = {
            v: {"version": v, "active": v == m["active_version"], "replicas": 0, "ready": 0}
            for v in m["versions"]
        }
        for r in m["replicas"]:
            entry = versions.setdefault(
                r["version"], {"version": r["version"], "active": False, "replicas": 0, "ready": 0}
            )
            entry["replicas"] += 1
            entry["ready"] += r["state"] in LIVE
        active = versions.get(m["active_version"] or "")
        if active and active["ready"]:
            ready_models.add(m["name"])
        figures = m["figures"]
        model_docs.append(
            {
                "name": m["name"],
                "active_version": m["active_version"],
                "versions": list(versions.values()),
                "ready": m["name"] in ready_models,
                "queue_depth": figures["queue_depth"],
                "queue_wait_p99_ms": figures["queue_wait_ms"].get("p99_ms"),
                "batches": figures["batches"],
                "mean_batch": figures["mean_batch"],
                "errors": figures["errors"],
                "replicas": [
                    {k: r.get(k) for k in ("replica_id", "version", "state", "sdk", "pid", "inflight")}
                    for r in m["replicas"]
                ],
            }
        )
    app_docs = []
    for a in apps:
        f = stats.get("apps", {}).get(a["name"], a.get("figures", {}))
        missing = [m for m in a["models"] if m not in ready_models]
        app_docs.append(
            {
                "name": a["name"],
                "input_type": a["input_type"],
                "input_shape": a["input_shape"],
                "slo_ms": a["slo_ms"],
                "default": a["default"] if a["has_default"] else None,
                "has_default": a["has_default"],
                "policy": a["policy"],
                "models": a["models"],
                "ready": bool(a["models"]) and len(missing) < len(a["models"]),
                "not_ready": missing if a["models"] else ["no model linked"],
                **{k: f.get(k) for k in ("queries", "answered", "defaults", "errors", "cache_hits")},
                "p50_ms": f.get("p50_ms"),
                "p99_ms": f.get("p99_ms"),
            }
        )
    broker = {k: status.get(k) for k in ("pid", "uptime_s", "endpoints", "state_path", "pending", "stopping")}
    return {"broker": broker, "gateways": status.get("gateways", []), "apps": app_docs, "models": model_docs}


def _ms(value: Any) -> str:
    return "-" if value is None or value != value else f"{value:.2f}"  # NaN: no queries yet


def _shape(shape: list[int]) -> str:
    return "[" + ",".join("any" if d < 0 else str(d) for d in shape) + "]" if shape else "scalar"


def render(doc: dict[str, Any]) -> str:
    """The overview as text: the broker, then a table of apps and one of model versions."""
    b = doc["broker"]
    ep = b["endpoints"]
    up = b["uptime_s"]
    uptime = f"{up / 3600:.1f} h" if up >= 3600 else f"{up / 60:.0f} min" if up >= 60 else f"{up:.0f} s"
    lines = [
        f"broker   pid {b['pid']}, up {uptime}, {b['pending']} queries pending"
        + (" (stopping)" if b["stopping"] else ""),
        f"         clients {ep.get('frontend')}, replicas {ep.get('backend')}, admin {ep.get('admin')}"
        + (f", metrics {ep['metrics']}" if ep.get("metrics") else ""),
        f"         state {b['state_path']}",
    ]
    if doc["gateways"]:
        for url in doc["gateways"]:
            lines.append(f"HTTP     {url}   (status page {url}/)")
    else:
        lines.append("HTTP     no gateway heard from (ketch broker start runs one; or ketch gateway)")
    lines.append("")
    app_rows = [
        (
            a["name"],
            "yes" if a["ready"] else "NO: " + ",".join(a["not_ready"]),
            f"{a['input_type']} {_shape(a['input_shape'])}",
            f"{a['slo_ms']:g}",
            a["policy"],
            ",".join(a["models"]) or "-",
            a["queries"],
            a["errors"],
            a["defaults"],
            _ms(a["p99_ms"]),
        )
        for a in doc["apps"]
    ]
    header = ("APP", "READY", "INPUT", "SLO_MS", "POLICY", "MODELS", "QUERIES", "ERRORS", "DEFAULTS")
    header = (*header, "P99_MS")
    lines += table_lines(app_rows, header) if app_rows else ["no apps (ketch serve FILE, or ketch up FILE)"]
    lines.append("")
    model_rows = [
        (
            m["name"],
            v["version"],
            "*" if v["active"] else "",
            v["replicas"],
            v["ready"],
            m["queue_depth"] if v["active"] else "",
            _ms(m["queue_wait_p99_ms"]) if v["active"] else "",
            m["errors"] if v["active"] else "",
        )
        for m in doc["models"]
        for v in m["versions"] or [{"version": "-", "active": False, "replicas": 0, "ready": 0}]
    ]
    header = ("MODEL", "VERSION", "ACTIVE", "REPLICAS", "READY", "QUEUE", "QUEUE_WAIT_P99_MS", "ERRORS")
    lines += table_lines(model_rows, header) if model_rows else ["no models"]
    return "\n".join(lines)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the overview as JSON.")
@click.pass_context
@handles_errors
def command(ctx: click.Context, as_json: bool) -> None:
    """The broker, its HTTP gateways, and every app and model: versions, replicas and
    readiness, queue depths, recent p99 latency."""
    from ketch.cli import _admin

    with _admin(ctx) as admin:
        doc = overview(admin.status(), admin.list_apps(), admin.list_models(), admin.stats())
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True, default=str))
    else:
        click.echo(render(doc))
