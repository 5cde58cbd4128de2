"""``ketch up FILE|DIR`` and ``ketch down``: bring a broker to what a deployment declares.

``up`` joins the broker at ``--admin`` (or starts one in the background, with its HTTP
gateway, state in the up folder), sets each model's queue policy, runs each model version's
replicas as a background ``ketch model serve`` process, waits until they are live, switches
active versions, and applies the apps (``ketch app apply``'s rules). What it started is
recorded in its folder (``--dir``; by default one per admin address under Ketch's state
folder), so running it again with the same file changes nothing, a changed model version
is replaced (the new replicas first, then the old ones drain), and one the file no longer
names is stopped. ``down`` stops what ``up`` started: replicas first, then its broker.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import psutil

from ketch import addresses, deploy, errors
from ketch._progress import Progress
from ketch.admin import Admin
from ketch.apply import apply_app
from ketch.launch import BrokerProcess, broker_status, connectable, live_replicas, pid_alive, stop_pid


def default_dir(admin: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "ketch" / "up" / re.sub(r"[^A-Za-z0-9.-]+", "_", admin).strip("_")


class Record:
    """What ``ketch up`` started, kept in ``DIR/up.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / "up.json"
        self.data: dict[str, Any] = {"broker": None, "groups": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True))
        tmp.replace(self.path)


def _group_argv(m: dict[str, Any], admin: str, backend: str) -> list[str]:
    argv = [
        sys.executable, "-m", "ketch.cli", "--admin", admin, "model", "serve", m["path"],
        "--name", m["name"], "--version", m["version"], "--backend", backend,
        "--replicas", str(m.get("replicas", 1)),
    ]  # fmt: skip
    if m.get("input_type"):
        argv += ["--input-type", m["input_type"]]
    if m.get("input_shape") is not None:
        argv += ["--input-shape", ",".join(str(d) for d in m["input_shape"]) or "scalar"]
    if m.get("credits"):
        argv += ["--credits", str(m["credits"])]
    if m.get("nondeterministic"):
        argv.append("--nondeterministic")
    return argv


def _code(path: str) -> list[str]:
    """What identifies a source's code: its files' sizes and dates."""
    p = Path(path.rsplit(":", 1)[0] if ":" in path and not Path(path).exists() else path)
    if not p.exists():
        return []
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    return [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files[:200]]


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:16]


def _fingerprint(argv: list[str], path: str) -> str:
    """What identifies a running group: its command and its source's contents' dates."""
    return _digest([argv, _code(path)])


def _own_live(admin: Admin, m: dict[str, Any], pid: int) -> int:
    """Live replicas of ``m``'s version that the group ``pid`` runs (its supervisor's
    children): not those of a group it replaces, which stop only once these are live."""
    try:
        children = {c.pid for c in psutil.Process(pid).children()}
        reps = admin.replicas(m["name"])
    except (psutil.Error, errors.Unavailable):
        return 0
    return sum(
        1
        for r in reps
        if r["version"] == m["version"] and r["state"] in ("ready", "busy") and r.get("pid") in children
    )


def _say(text: str) -> None:
    click.echo(text, err=True)


@click.command("up")
@click.argument("target", type=click.Path(exists=True))
@click.option(
    "--dir", "folder", default=None, help="Where up keeps its record and logs [default: per --admin]."
)
@click.option("--http", "http_listen", default="127.0.0.1:8080", show_default=True,
              help="HTTP gateway of a broker started here (HOST:PORT).")  # fmt: skip
@click.option("--backend", envvar="KETCH_BACKEND", default=addresses.BACKEND, show_default=True,
              help="Backend address of a broker started here ($KETCH_BACKEND).")  # fmt: skip
@click.option("--join", "must_join", is_flag=True, help="Never start a broker: fail when none answers.")
@click.option("--wait", "wait_s", type=click.FloatRange(1), default=300, show_default=True,
              help="Seconds to wait for the replicas to be live.")  # fmt: skip
@click.option("--render-values", "render", is_flag=True,
              help="Print the Helm chart's values for TARGET (YAML) and change nothing.")  # fmt: skip
@click.pass_context
def up_command(ctx: click.Context, target: str, folder: str | None, http_listen: str, backend: str,
               must_join: bool, wait_s: float, render: bool) -> None:  # fmt: skip
    """Bring the broker to what TARGET declares: a deployment file (TOML, YAML or JSON: apps,
    models, versions, replicas, SLOs, defaults, policies) or a model-repository folder.

    Idempotent: again with the same TARGET it changes nothing. The format and its Helm
    mapping: docs/deploy.md. `ketch down` stops what it started.
    """
    try:
        deployment = deploy.load(target)
    except (deploy.BadDeployment, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    if render:
        _render(deployment)
        return
    root = ctx.find_root().obj
    admin_address, frontend = root["admin"], root["frontend"]
    record = Record(Path(folder) if folder else default_dir(admin_address))
    status = broker_status(admin_address)
    if status is None:
        if must_join:
            raise click.ClickException(
                f"no broker at {admin_address} (--join): start one with ketch broker start"
            )
        broker = BrokerProcess(
            frontend=frontend, backend=backend, admin=admin_address,
            state=str(record.folder / "broker.db"), http=http_listen or None,
            log_path=str(record.folder / "broker.log"), ready_path=str(record.folder / "broker.ready"),
            detached=True,
        )  # fmt: skip
        endpoints = broker.start_or_explain(
            "; name free ones with --admin/--frontend (before up), --backend and --http"
        )
        assert broker.proc is not None
        record.data["broker"] = {"pid": broker.proc.pid, "endpoints": endpoints,
                                 "http": f"http://{http_listen}" if http_listen else None}  # fmt: skip
        record.save()
        _say(f"broker started (pid {broker.proc.pid}; log {broker.log_path})")
    else:
        endpoints = status["endpoints"]
    admin_at = connectable(endpoints["admin"])
    backend_at = connectable(endpoints["backend"])
    try:
        with Admin(admin_at, timeout_ms=5000) as admin:
            _bring_up(admin, deployment, record, admin_at, backend_at, wait_s)
    except errors.RequestError as exc:
        raise click.ClickException(f"{exc.code_name}: {exc.message}") from None
    broker_rec = record.data.get("broker") or {}
    http = broker_rec.get("http") or ((status or {}).get("gateways") or [None])[0]
    click.echo(f"up: {len(deployment['apps'])} app(s), {len(deployment['models'])} model version(s)"
               + (f"; HTTP {http}" if http else "") + "; see ketch status, stop with ketch down")  # fmt: skip


def _bring_up(
    admin: Admin, deployment: dict[str, Any], record: Record, admin_at: str, backend_at: str, wait_s: float
) -> None:
    groups: dict[str, Any] = record.data.setdefault("groups", {})
    wanted: dict[str, tuple[dict[str, Any], list[str], str]] = {}
    for m in deployment["models"]:
        argv = _group_argv(m, admin_at, backend_at)
        wanted[f"{m['name']}/{m['version']}"] = (m, argv, _fingerprint(argv, m["path"]))
    # queue policies first, so replicas join a model already configured
    for m in deployment["models"]:
        queue = {k: m[k] for k in deploy.QUEUE_KEYS if k in m}
        if queue:
            try:
                current = admin.show_model(m["name"])
            except errors.NotFound:
                current = {}
            if any(current.get(k) != v for k, v in queue.items()):
                admin.configure_model(m["name"], create=True, **queue)
                click.echo(
                    f"model {m['name']}: queue policy {', '.join(f'{k}={v}' for k, v in queue.items())}"
                )
    started, replaced = [], []
    for key, (m, argv, fp) in wanted.items():
        old = groups.get(key)
        if old and old["fingerprint"] == fp and pid_alive(old["pid"]):
            if old.get("replacing"):  # an earlier `ketch up` stopped before this group was live
                replaced.append((key, old["replacing"]))
            continue
        code = _digest(_code(m["path"]))
        if old and old.get("code") != code and pid_alive(old["pid"]):
            # the broker lets one version serve one code (a replica of other code under the
            # same version is refused while one of the old code is live): the old replicas
            # go first, so this version has none for a moment (a new version has no gap)
            stop_pid(old["pid"], 30)
            click.echo(f"model {key.replace('/', ' v')}: code changed, the old replicas drained")
        log_path = record.folder / "logs" / f"{m['name']}-v{m['version']}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        if old and pid_alive(old["pid"]):
            replaced.append((key, old["pid"]))
        groups[key] = {"pid": proc.pid, "fingerprint": fp, "code": code, "replicas": m.get("replicas", 1),
                       "log": str(log_path), "name": m["name"], "version": m["version"]}  # fmt: skip
        if old and pid_alive(old["pid"]):
            # kept on record until the new group is live: if it never is, `ketch down` still
            # stops the old one, and `ketch up` again finds it
            groups[key]["replacing"] = old["pid"]
        elif old and old.get("replacing") and pid_alive(old["replacing"]):
            groups[key]["replacing"] = old["replacing"]
        started.append(key)
        record.save()
    gone = [k for k in groups if k not in wanted]
    pending = {k for k, _ in replaced}  # their own replicas count, not those they replace
    total = sum(m.get("replicas", 1) for m, _, _ in wanted.values())
    with Progress(f"waiting for {total} replica(s) of {len(wanted)} model version(s)", total=total) as p:
        deadline = time.monotonic() + wait_s
        while True:
            live = {
                k: _own_live(admin, m, groups[k]["pid"])
                if k in started or k in pending
                else live_replicas(admin, m["name"], m["version"])
                for k, (m, _, _) in wanted.items()
            }
            count = sum(min(live[k], m.get("replicas", 1)) for k, (m, _, _) in wanted.items())
            p.update(f"{count} of {total} live", done=count)
            if count >= total:
                break
            for key in started:
                pid = groups[key]["pid"]
                if not pid_alive(pid):
                    raise click.ClickException(f"model {key} exited; its log ({groups[key]['log']}):\n"
                                               + _tail(groups[key]["log"]))  # fmt: skip
            if time.monotonic() > deadline:
                late = [k for k, (m, _, _) in wanted.items() if live[k] < m.get("replicas", 1)]
                raise click.ClickException(
                    f"replicas of {', '.join(late)} not live after {wait_s:g} s; "
                    f"logs in {record.folder / 'logs'}"
                )
            time.sleep(0.2)
    for key in started:
        click.echo(f"model {key.replace('/', ' v')}: started {groups[key]['replicas']} replica(s)")
    for key, pid in replaced:
        stop_pid(pid, 30)
        groups[key].pop("replacing", None)
        click.echo(f"model {key.replace('/', ' v')}: replaced (the old replicas drained)")
    for key in gone:
        g = groups.pop(key)
        stop_pid(g["pid"], 30)
        if g.get("replacing"):
            stop_pid(g["replacing"], 30)
        click.echo(f"model {key.replace('/', ' v')}: stopped (no longer declared)")
    record.save()
    _set_versions(admin, deployment)
    schemas = _schemas(admin, deployment)
    for app in deployment["apps"]:
        spec = deploy.app_apply_spec(app)
        if not spec.get("input_type"):
            kind, shape = schemas[spec["models"][0]]
            spec["input_type"] = kind
            spec.setdefault("input_shape", shape)
        done = apply_app(admin, spec)
        click.echo(f"app {spec['name']}: {', '.join(done) or 'unchanged'}")


def _set_versions(admin: Admin, deployment: dict[str, Any]) -> None:
    by_model: dict[str, list[dict[str, Any]]] = {}
    for m in deployment["models"]:
        by_model.setdefault(m["name"], []).append(m)
    for name, entries in by_model.items():
        chosen = [e for e in entries if e.get("active")]
        if len(chosen) > 1:
            raise click.UsageError(f"model {name}: more than one version says active = true")
        current = admin.show_model(name)["active_version"]
        declared = [e["version"] for e in entries]
        want = chosen[0]["version"] if chosen else (current if current in declared else declared[-1])
        if want != current:
            admin.set_version(name, want)
            click.echo(f"model {name}: active version {want}")


def _schemas(admin: Admin, deployment: dict[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """Each model's input type and shape, as its live replicas declare them."""
    out = {}
    for name in {m["name"] for m in deployment["models"]}:
        model = admin.show_model(name)
        reps = [r for r in model["replicas"] if r["version"] == model["active_version"]] or model["replicas"]
        if reps and "input_type" in reps[0]:
            out[name] = (reps[0]["input_type"], list(reps[0]["input_shape"]))
    return out


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join("  " + s for s in Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "  (no log)"


def _render(deployment: dict[str, Any]) -> None:
    """Print Helm values for the deployment (its models' schemas read from the files)."""
    from ketch import loading

    schemas = {}
    for m in deployment["models"]:
        if m["name"] in schemas:
            continue
        try:
            _, meta = loading.load(loading.resolve(m["path"]), input_type=m.get("input_type"))
        except loading.BadSource as exc:
            raise click.UsageError(f"model {m['name']}: {exc}") from None
        kind = m.get("input_type") or meta["input_type"] or "float64"
        shape = m.get("input_shape", meta["input_shape"])
        schemas[m["name"]] = (
            kind,
            [-1] if shape is None and kind not in ("string", "bytes", "json") else shape or [],
        )
    values, warnings = deploy.render_values(deployment, schemas)
    for w in warnings:
        _say(f"warning: {w}")
    import yaml

    click.echo("# Helm values for deploy/helm/ketch, rendered by `ketch up --render-values`")
    click.echo(yaml.safe_dump(values, sort_keys=False), nl=False)


@click.command("down")
@click.option("--dir", "folder", default=None, help="The folder ketch up used [default: per --admin].")
@click.option("--keep-broker", is_flag=True, help="Stop the replicas only, not a broker up started.")
@click.pass_context
def down_command(ctx: click.Context, folder: str | None, keep_broker: bool) -> None:
    """Stop what `ketch up` started: every model's replicas (they drain), then its broker.

    The apps stay in the broker's state; a broker up did not start keeps running."""
    admin_address = ctx.find_root().obj["admin"]
    record = Record(Path(folder) if folder else default_dir(admin_address))
    if not record.path.exists():
        raise click.ClickException(f"nothing to stop: no record of ketch up in {record.folder}")
    groups = record.data.get("groups", {})
    for key, g in sorted(groups.items()):
        stop_pid(g["pid"], 30)
        if g.get("replacing"):  # a group an unfinished `ketch up` was replacing
            stop_pid(g["replacing"], 30)
        click.echo(f"model {key.replace('/', ' v')}: stopped")
    record.data["groups"] = {}
    broker = record.data.get("broker")
    if broker and not keep_broker:
        stop_pid(broker["pid"], 30)
        record.data["broker"] = None
        click.echo(f"broker stopped (pid {broker['pid']})")
    record.save()
