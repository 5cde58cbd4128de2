"""``ketch serve SOURCE``: a model file (or folder, or code) answering over HTTP in one command.

It joins the broker at ``--admin`` when one answers there, else starts one for the session
(state in memory, with its HTTP gateway); creates the app with the input type and shape the
model declares (``n_features_in_``, ONNX input metadata) unless told otherwise; runs
``--replicas`` supervised replica processes; prints the URLs and a curl line once a replica
answers a test query; and on Ctrl-C stops the replicas (they drain), then the broker it
started.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Any

import click

from ketch import addresses, errors, loading, logs
from ketch._progress import Progress
from ketch.admin import DEFAULT_ADMIN, Admin
from ketch.client import DEFAULT_FRONTEND
from ketch.launch import BrokerProcess, broker_status, connectable, live_replicas, replica_command

NUMBER_TYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64")  # fmt: skip


def example_input(input_type: str, shape: list[int]) -> Any:
    """A JSON input an app of this type and shape accepts (zeros), for the printed examples."""
    if input_type == "string":
        return "hello"
    if input_type == "bytes":
        return "aGVsbG8="  # base64 of "hello", as HTTP takes bytes
    if input_type == "json":
        return {"x": 1}
    zero: Any = False if input_type == "bool" else 0.0 if input_type.startswith("float") else 0

    def fill(dims: list[int]) -> Any:
        if not dims:
            return zero
        return [fill(dims[1:]) for _ in range(dims[0] if dims[0] > 0 else 3)]

    return fill(shape)


def curl_line(url: str, app: str, value: Any) -> str:
    body = json.dumps({"input": value}, separators=(", ", ": "))
    return f"curl -s -XPOST {url}/{app}/predict -d '{body}'"


def ensure_app(admin: Admin, name: str, model: str, spec: dict[str, Any]) -> str:
    """Create app ``name`` linking ``model``, or link ``model`` to the existing one; what was done."""
    try:
        current = admin.show_app(name)
    except (errors.NotFound, errors.UnknownApp):
        admin.create_app(name, models=[model], **spec)
        return "created"
    if current["input_type"] != spec["input_type"] or (
        spec["input_shape"] is not None and list(current["input_shape"]) != list(spec["input_shape"])
    ):
        raise errors.Conflict(
            f"app {name!r} exists and takes {current['input_type']} inputs of shape "
            f"{current['input_shape']}, the model {spec['input_type']} of shape {spec['input_shape']}: "
            f"serve under another name (--name), or delete it first (ketch app delete {name})"
        )
    if model in current["models"]:
        return "unchanged"
    admin.link(name, model)
    return f"linked {model}"


def _say(text: str) -> None:
    click.echo(text, err=True)


@click.command("serve")
@click.argument("source")
@click.option("--name", default=None, help="App and model name [default: the file's stem, or model.toml's].")
@click.option("--version", "model_version", default=None, help="Model version [default: 1].")
@click.option("--replicas", type=click.IntRange(1, 64), default=None, help="Replica processes [default: 1].")
@click.option("--input-type", default=None, help="Input dtype [default: the model's, else float64].")
@click.option("--input-shape", default=None,
              help="Per-query input shape, e.g. 4 or -1,28,28 [default: the model's, else -1].")  # fmt: skip
@click.option("--output", default=None, help="scikit-learn: predict or predict_proba; ONNX: an output.")
@click.option("--slo-ms", type=click.FloatRange(0.001), default=None, help="The app's latency objective.")
@click.option("--default", "default", default=None, help="The app's default answer (JSON) past its SLO.")
@click.option("--nondeterministic", is_flag=True, help="Answers vary for one input (never cached).")
@click.option("--max-batch", type=click.IntRange(0), default=0, show_default=True,
              help="Largest batch a replica takes (0: the broker decides).")  # fmt: skip
@click.option("--http", "http_listen", default="127.0.0.1:8080", show_default=True,
              help="HTTP gateway of the broker started here (HOST:PORT).")  # fmt: skip
@click.option("--backend", envvar="KETCH_BACKEND", default=addresses.BACKEND, show_default=True,
              help="Backend address of the broker started here ($KETCH_BACKEND).")  # fmt: skip
@click.option("--state", default=":memory:", show_default=True,
              help="State file of the broker started here (':memory:' keeps nothing).")  # fmt: skip
@click.option("--join", "must_join", is_flag=True, help="Never start a broker: fail when none answers.")
@click.option("--verbose", "-v", is_flag=True, help="Show the replicas' and the broker's info logs.")
@click.pass_context
def command(ctx: click.Context, source: str, **kw: Any) -> None:
    """Serve SOURCE over HTTP: a model file (.joblib/.pkl: scikit-learn, .onnx: ONNX Runtime,
    .pt: TorchScript), a folder holding one (and optionally a model.toml of settings), or
    Python code as FILE.py:ATTR or MODULE:ATTR.

    \b
    Joins the broker at --admin ($KETCH_ADMIN) or starts one (with its HTTP gateway),
    creates the app NAME with the input type and shape the model declares, runs the
    replicas, prints the URLs and a curl line, and stops everything on Ctrl-C.
    """
    try:
        found = loading.resolve(source)
    except loading.BadSource as exc:
        raise click.UsageError(str(exc)) from None
    warning = loading.trust_warning(found)
    if warning:
        _say(warning)
    settings = found.settings
    name = kw["name"] or found.default_name
    version = str(kw["model_version"] or settings.get("version") or "1")
    replicas = kw["replicas"] or settings.get("replicas") or 1
    input_type = kw["input_type"] or settings.get("input_type")
    try:
        _, meta = loading.load(found, output=kw["output"], input_type=input_type)
    except loading.BadSource as exc:
        raise click.UsageError(str(exc)) from None
    from ketch.cli import _json_value, _shape

    input_type = input_type or meta["input_type"] or "float64"
    if kw["input_shape"] is not None:
        shape = _shape(kw["input_shape"])
    else:
        shape = settings.get("input_shape", meta["input_shape"])
    if shape is None:
        shape = [] if input_type in ("string", "bytes", "json") else [-1]
    default = kw["default"]
    app_spec = {
        "input_type": input_type,
        "input_shape": shape,
        "slo_ms": kw["slo_ms"] or settings.get("slo_ms"),
        "default": _json_value(default, "--default") if default is not None else settings.get("default"),
    }
    logs.configure(level=None if kw["verbose"] else "warning")
    admin_address = ctx.find_root().obj["admin"]
    frontend = ctx.find_root().obj["frontend"]
    tmp = tempfile.TemporaryDirectory(prefix="ketch-serve-")
    broker: BrokerProcess | None = None
    status = broker_status(admin_address)
    http_url: str | None = None
    try:
        if status is None:
            if kw["must_join"]:
                raise click.ClickException(f"no broker at {admin_address} (--join): ketch broker start")
            broker = BrokerProcess(
                frontend=frontend,
                backend=kw["backend"],
                admin=admin_address,
                state=kw["state"],
                http=kw["http_listen"] or None,
                log_path=os.path.join(tmp.name, "broker.log"),
                ready_path=os.path.join(tmp.name, "ready.json"),
                extra=[],
            )
            endpoints = broker.start_or_explain(
                ".\n  pick free addresses: ketch --admin tcp://127.0.0.1:7102 --frontend "
                f"tcp://127.0.0.1:7101 serve {source} --backend tcp://127.0.0.1:7100 --http 127.0.0.1:8090"
            )
            if kw["http_listen"]:
                http_url = "http://" + kw["http_listen"]
            status = {"endpoints": endpoints, "pid": broker.proc.pid if broker.proc else 0}
            kept = "in memory" if kw["state"] == ":memory:" else kw["state"]
            where = f"started for this session, state {kept}"
        else:
            where = f"joined (pid {status['pid']})"
            gateways = status.get("gateways") or []
            http_url = gateways[0] if gateways else None
        endpoints = status["endpoints"]
        backend = connectable(endpoints["backend"])
        frontend = connectable(endpoints["frontend"])
        with Admin(connectable(endpoints["admin"]), timeout_ms=5000) as admin:
            done = ensure_app(admin, name, name, app_spec)
            if kw["max_batch"]:
                admin.configure_model(name, max_batch=kw["max_batch"], create=True)
        argv = replica_command(
            source, name=name, version=version, backend=backend, input_type=input_type, input_shape=shape,
            output=kw["output"], max_batch=kw["max_batch"],
            nondeterministic=kw["nondeterministic"] or bool(settings.get("nondeterministic")),
        )  # fmt: skip
        from ketch.supervisor import Supervisor

        if not kw["verbose"]:
            os.environ["KETCH_LOG_LEVEL"] = os.environ.get("KETCH_LOG_LEVEL", "warning")
        supervisor = Supervisor(argv, replicas)
        supervisor.stopped = threading.Event()  # type: ignore[attr-defined]
        prefix = (
            "ketch"
            if admin_address == DEFAULT_ADMIN and frontend == DEFAULT_FRONTEND
            else (f"ketch --admin {connectable(endpoints['admin'])} --frontend {frontend}")
        )
        announcer = threading.Thread(
            target=_announce,
            args=(supervisor, connectable(endpoints["admin"]), frontend, http_url, name, version, replicas,
                  app_spec, where, endpoints, done, prefix),
            name="ketch-serve-ready",
            daemon=True,
        )  # fmt: skip
        announcer.start()
        code = supervisor.run()
        supervisor.stopped.set()  # type: ignore[attr-defined]
        announcer.join(2)
        _say("replicas stopped")
    finally:
        if broker is not None and broker.proc is not None:
            broker.stop()
            _say("broker stopped")
        tmp.cleanup()
    ctx.exit(code)


def _announce(
    supervisor: Any,
    admin_address: str,
    frontend: str,
    http_url: str | None,
    name: str,
    version: str,
    replicas: int,
    spec: dict[str, Any],
    where: str,
    endpoints: dict[str, str],
    done: str,
    prefix: str,
) -> None:
    """Wait for the replicas, send one test query, print where to send the next ones."""
    import numpy as np

    from ketch.client import Client

    with Admin(admin_address, timeout_ms=2000) as admin, Progress(f"starting {replicas} replica(s)") as p:
        while not supervisor.stopped.is_set():
            up = live_replicas(admin, name, version)
            p.update(f"{up} of {replicas} ready", done=up)
            if up >= replicas:
                break
            supervisor.stopped.wait(0.2)
        else:
            return
        try:
            model = admin.show_model(name)
            active = model["active_version"]
            if active != version and not any(
                r["version"] == active and r["state"] in ("ready", "busy") for r in model["replicas"]
            ):
                admin.set_version(name, version)
                active = version
        except errors.KetchError:
            active = version
    value = example_input(spec["input_type"], list(spec["input_shape"]))
    test = ""
    try:
        with Client(frontend) as client:
            sent = value.encode() if spec["input_type"] == "bytes" else value
            if spec["input_type"] in ("string", "bytes", "json"):
                pred = client.predict(name, sent, 10_000, dtype=spec["input_type"])
            else:
                pred = client.predict(name, np.asarray(value), 10_000, dtype=spec["input_type"])
        out = pred.output.tolist() if hasattr(pred.output, "tolist") else pred.output
        test = f"test query {json.dumps(value)} -> {json.dumps(out, default=str)} ({pred.latency_ms:.1f} ms)"
    except errors.KetchError as exc:
        test = f"test query {json.dumps(value)} failed: {exc}"
    shape = "x".join("any" if d < 0 else str(d) for d in spec["input_shape"]) or "scalar"
    lines = [
        "",
        f"serving model {name!r} version {version} ({replicas} replica(s)) as app {name!r} "
        f"[{done}]: {spec['input_type']} inputs, shape {shape}",
    ]
    if active != version:
        lines.append(
            f"  note: model {name!r} answers with version {active}; "
            f"switch: ketch model set-version {name} {version}"
        )
    lines.append(f"  broker   {endpoints['frontend']} ({where})")
    if http_url:
        lines += [
            f"  HTTP     {http_url}/{name}/predict   (Clipper REST)",
            f"           {http_url}/v2/models/{name}/infer   (KServe V2)",
            f"  page     {http_url}/   (status and a form to try it)",
            "  try it:",
            f"    {curl_line(http_url, name, value)}",
        ]
    else:
        lines += ["  HTTP     none known: run one with ketch gateway", "  try it:"]
    lines += [f"    {prefix} predict {name} --input '{json.dumps(value)}'", f"  {test}", "Ctrl-C stops."]
    click.echo("\n".join(lines))
