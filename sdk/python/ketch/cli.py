"""``ketch``: run and operate a Ketch broker from the shell.

Addresses come from options or ``KETCH_FRONTEND``, ``KETCH_BACKEND``, ``KETCH_ADMIN``.
Exit codes: 0 success, 1 the broker refused (the message says why), 2 usage error,
3 the broker cannot be reached, 4 a model target does not load.

Each command imports what it uses when it runs: ``ketch model serve`` (a supervisor that
lives as long as its replicas) holds neither a client, numpy nor the model's framework.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ketch import addresses, logs
from ketch._clikit import EXIT_REFUSED, EXIT_TARGET, _fail, handles_errors, table_lines
from ketch.apply import command as app_apply_command
from ketch.build import command as model_build_command
from ketch.status import command as status_command

if TYPE_CHECKING:
    from ketch.admin import Admin

DEFAULT_ADMIN, DEFAULT_FRONTEND, DEFAULT_BACKEND = addresses.ADMIN, addresses.FRONTEND, addresses.BACKEND


def _admin(ctx: click.Context, wait: bool = True) -> Admin:
    """The broker's admin API; first waits up to --broker-wait for a broker to answer,
    saying so (fails at once, with what to do, when the wait is 0)."""
    from ketch.admin import Admin
    from ketch.launch import wait_for_broker

    obj = ctx.find_root().obj
    if wait and not obj.get("broker_seen"):
        wait_for_broker(obj["admin"], obj["broker_wait"], lambda text: click.echo(text, err=True))
        obj["broker_seen"] = True
    return Admin(obj["admin"])


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    click.echo("\n".join(table_lines(rows, header)))


def _shape(text: str | None) -> list[int]:
    if not text or text.strip() in ("scalar", "()"):
        return []
    try:
        return [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: a shape is sizes separated by commas, -1 for any (e.g. 4 or -1,28,28), "
            "or 'scalar' for one number"
        ) from None


def _default_shape(input_type: str) -> list[int]:
    """An app's input shape when none is given: a vector of any length for numbers."""
    return [] if input_type in ("string", "bytes", "json") else [-1]


def _json_value(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"{what} must be JSON ({exc}); quote strings: '\"text\"'") from None


class LazyGroup(click.Group):
    """A group some of whose commands live in modules that import the client and the admin
    API: each is imported when it is used or listed (click's lazy loading pattern), so
    ``import ketch.cli`` stays small. ``lazy_subcommands`` maps a name to "module:attr"."""

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_subcommands])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_subcommands:
            module, attr = self.lazy_subcommands[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attr)
            if not isinstance(command, click.Command):
                raise TypeError(f"{module}:{attr} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy_subcommands={
        "serve": "ketch.serve:command",
        "up": "ketch.up:up_command",
        "down": "ketch.up:down_command",
    },
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
)
@click.option(
    "--admin",
    envvar="KETCH_ADMIN",
    show_envvar=True,
    default=DEFAULT_ADMIN,
    help="Broker admin address (apps, models, status).",
)
@click.option(
    "--frontend",
    envvar="KETCH_FRONTEND",
    show_envvar=True,
    default=DEFAULT_FRONTEND,
    help="Broker frontend address (queries).",
)
@click.option(
    "--broker-wait",
    envvar="KETCH_BROKER_WAIT",
    show_envvar=True,
    type=click.FloatRange(0),
    default=10.0,
    help="Seconds to wait, saying so, for a broker that does not answer yet (0: fail at once).",
)
@click.version_option(package_name="ketch")
@click.pass_context
def main(ctx: click.Context, admin: str, frontend: str, broker_wait: float) -> None:
    """Ketch: low-latency prediction serving.

    \b
    Start here:
      ketch serve model.joblib      serve a model file over HTTP (starts a broker if none runs)
      ketch up ketch.toml           bring up the apps and models a file declares; ketch down
      ketch status                  what runs: apps, models, replicas, latency
    Model replicas reach the broker at KETCH_BACKEND (default tcp://127.0.0.1:7000).
    """
    ctx.ensure_object(dict)
    ctx.obj.update(admin=admin, frontend=frontend, broker_wait=broker_wait)


# ketch serve (ketch/serve.py), ketch up and ketch down (ketch/up.py): lazy_subcommands above
main.add_command(status_command)  # ketch status (ketch/status.py)

# ---------------------------------------------------------------- broker


@main.group()
def broker() -> None:
    """Start, stop and check the broker."""


def _broker_start_command() -> click.Command:
    from ketchd.__main__ import broker_options, config_from_options, run_broker

    @broker.command("start")
    @broker_options
    @click.option(
        "--http",
        "http_listen",
        default="127.0.0.1:8080",
        show_default=True,
        help="Also run the HTTP gateway on HOST:PORT (a child process, `ketch gateway`).",
    )
    @click.option("--no-http", is_flag=True, help="Run no HTTP gateway (and so no gRPC).")
    @click.option(
        "--grpc",
        "grpc_listen",
        default=None,
        help="The gateway's KServe V2 gRPC HOST:PORT [default: the --http host, its port + 1].",
    )
    @click.option("--no-grpc", is_flag=True, help="The gateway serves no gRPC.")
    @click.option(
        "--http-workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Gateway workers."
    )
    @click.option(
        "--http-token-file",
        type=click.Path(exists=True, dir_okay=False),
        default=None,
        help="Bearer tokens for the gateway, one a line; 'admin TOKEN' for /admin/ (also "
        "$KETCH_GATEWAY_TOKENS, $KETCH_GATEWAY_ADMIN_TOKENS).",
    )
    def start(
        http_listen: str,
        no_http: bool,
        grpc_listen: str | None,
        no_grpc: bool,
        http_workers: int,
        http_token_file: str | None,
        **kw: Any,
    ) -> None:
        """Run the broker in the foreground (Ctrl-C or SIGTERM drains and stops it).

        The HTTP gateway starts once the broker listens and is stopped when it exits.
        Nothing that takes requests without authentication is exposed beyond loopback
        unless --insecure says so: a non-loopback address needs CurveZMQ (ZMQ sockets) or
        bearer tokens (HTTP), and with CurveZMQ on the gateway needs tokens too.
        """
        insecure = kw["insecure"]
        config, ready_file = config_from_options(**kw)
        if no_http:
            run_broker(config, ready_file)
            return
        host, port = _check_listen(http_listen, "--http")
        grpc_at = None if no_grpc else _grpc_listen(grpc_listen, host, port, "--grpc")
        if not _gateway_installed():
            click.echo(
                "warning: no HTTP gateway: it needs the http extra (pip install 'ketch[http]'); "
                "pass --no-http to silence this",
                err=True,
            )
            run_broker(config, ready_file)
            return
        from ketch.gateway.auth import load_tokens

        if not load_tokens(http_token_file) and not insecure:
            if config.curve_secret:
                raise click.UsageError(
                    "CurveZMQ is on, but the HTTP gateway would take requests without a bearer token, "
                    "around it: give the gateway tokens (--http-token-file F or $KETCH_GATEWAY_TOKENS), "
                    "pass --no-http, or --insecure to serve HTTP without authentication."
                )
            _check_http_exposure(host, "--http")
            if grpc_at is not None:
                _check_http_exposure(grpc_at[0], "--grpc")
        with tempfile.TemporaryDirectory(prefix="ketch-broker-") as tmp:
            ready_path = Path(ready_file or os.path.join(tmp, "ready.json"))
            ready_path.unlink(missing_ok=True)
            extra = (["--token-file", http_token_file] if http_token_file else []) + (
                ["--insecure"] if insecure else []
            )
            if no_grpc or grpc_listen is not None:  # else the gateway takes its default (optional) port
                extra += ["--no-grpc"] if no_grpc else ["--grpc", _host_port(*grpc_at)]
            child = _GatewayChild(ready_path, http_listen, http_workers, extra)
            child.start()
            try:
                run_broker(config, str(ready_path))
            finally:
                child.stop()

    return start


def _gateway_installed() -> bool:
    return all(
        importlib.util.find_spec(m) is not None for m in ("starlette", "uvicorn", "prometheus_client", "grpc")
    )


def _check_http_exposure(host: str, option: str) -> None:
    from ketchd.config import is_loopback

    if not is_loopback(host):
        raise click.UsageError(
            f"{option} {host}: other machines can reach this address, and the gateway has no bearer "
            "tokens: give it some (--token-file, or $KETCH_GATEWAY_TOKENS), listen on a loopback "
            "address, or pass --insecure to serve without authentication."
        )


def _check_listen(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{text!r}: give HOST:PORT, e.g. 127.0.0.1:8080", param_hint=option)
    return host.strip("[]"), int(port)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _grpc_listen(text: str | None, http_host: str, http_port: int, option: str) -> tuple[str, int]:
    """The gRPC HOST:PORT: as given, else next to HTTP (its port + 1, as Triton's 8001 beside
    8000; port 0 beside port 0). A default port that is taken costs gRPC only (a warning)."""
    if text is not None:
        return _check_listen(text, option)
    if http_port == 65535:
        raise click.BadParameter(
            "HTTP is on port 65535, so gRPC has no next port: give --grpc", param_hint=option
        )
    return http_host, http_port + 1 if http_port else 0


class _GatewayChild:
    """``ketch gateway`` as a child of ``ketch broker start``: started once the broker's ready
    file appears (so it connects to the addresses actually bound), stopped by its pid."""

    def __init__(self, ready_path: Path, listen: str, workers: int, extra: list[str]) -> None:
        self.ready_path, self.listen, self.workers, self.extra = ready_path, listen, workers, extra
        self.proc: subprocess.Popen | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="gateway-child", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _watch(self) -> None:
        while not self.ready_path.exists():
            if self._stopping.wait(0.02):
                return
        endpoints = json.loads(self.ready_path.read_text())
        argv = [
            sys.executable,
            "-m",
            "ketch.cli",
            "--admin",
            endpoints["admin"],
            "gateway",
            "--broker",
            endpoints["frontend"],
            "--listen",
            self.listen,
            "--workers",
            str(self.workers),
            *self.extra,
        ]
        with self._lock:
            if self._stopping.is_set():
                return
            self.proc = subprocess.Popen(argv)
        click.echo(f"HTTP gateway on http://{self.listen} (pid {self.proc.pid})", err=True)
        code = self.proc.wait()
        if code and not self._stopping.is_set():
            click.echo(f"warning: the HTTP gateway exited with code {code}; the broker runs on", err=True)

    def stop(self, grace_s: float = 15) -> None:
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(5)


_broker_start_command()


@broker.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handles_errors
def broker_status(ctx: click.Context, as_json: bool) -> None:
    """Exit 0 when the broker answers; 3 with a message when it does not (at once)."""
    with _admin(ctx, wait=False) as admin:
        status = admin.status()
    if as_json:
        _print_json(status)
        return
    click.echo(
        f"broker up {status['uptime_s']:.0f} s, pid {status['pid']}: {status['apps']} apps, "
        f"{status['models']} models, {status['replicas']} replicas, {status['pending']} queries pending"
    )
    for role, endpoint in sorted(status["endpoints"].items()):
        click.echo(f"  {role:9} {endpoint}")


@broker.command("stop")
@click.pass_context
@handles_errors
def broker_stop(ctx: click.Context) -> None:
    """Ask the broker to answer what it holds and exit."""
    with _admin(ctx) as admin:
        admin.stop_broker()
    click.echo("broker stopping")


# ---------------------------------------------------------------- apps


@main.group()
def app() -> None:
    """Create and inspect applications."""


app.add_command(app_apply_command)  # ketch app apply (ketch/apply.py)


@app.command("create")
@click.argument("name", metavar="APP")
@click.option("--input-type", required=True, help="Input dtype: float64, float32, int64, ..., string, bytes.")
@click.option(
    "--input-shape",
    default=None,
    help="Per-query input shape, e.g. 4 or -1,28,28 (-1: any size), or scalar "
    "[default: -1, a vector of any length; none for string, bytes and json].",
)
@click.option(
    "--slo-ms", type=float, default=None, help="Latency objective; the default answer comes at this time."
)
@click.option(
    "--default", "default", default=None, help="Default output as JSON, returned when no model answers."
)
@click.option("--model", "models", multiple=True, help="Model to link (may not be deployed yet).")
@click.option(
    "--cache/--no-cache", default=True, show_default=True, help="Answer repeated inputs from the cache."
)
@click.option("--finite-only", is_flag=True, help="Refuse NaN and infinity in float inputs (BAD_INPUT).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handles_errors
def app_create(
    ctx, name, input_type, input_shape, slo_ms, default, models, cache, finite_only, as_json
) -> None:
    """Create app APP."""
    default_value = _json_value(default, "--default") if default is not None else None
    with _admin(ctx) as admin:
        doc = admin.call(
            "app.create",
            name=name,
            input_type=input_type,
            input_shape=_shape(input_shape) if input_shape is not None else _default_shape(input_type),
            slo_ms=slo_ms,
            default=default_value,
            has_default=default is not None,
            models=list(models),
            cache=cache,
            finite_only=finite_only,
        )
    _print_json(doc) if as_json else click.echo(f"created app {name}")


@app.command("configure")
@click.argument("name", metavar="APP")
@click.option("--cache/--no-cache", default=None, help="Switch the prediction cache for this app.")
@click.option("--slo-ms", type=float, default=None, help="New latency objective.")
@click.pass_context
@handles_errors
def app_configure(ctx, name, cache, slo_ms) -> None:
    """Change an app's cache switch or SLO."""
    with _admin(ctx) as admin:
        doc = admin.configure_app(name, cache=cache, slo_ms=slo_ms)
    click.echo(f"app {name}: slo {doc['slo_ms']:g} ms, cache {'on' if doc['cache'] else 'off'}")


@app.command("set-policy")
@click.argument("name", metavar="APP")
@click.argument("policy", type=click.Choice(["single", "weighted", "shadow", "exp3", "exp4", "ensemble"]))
@click.option(
    "--option",
    "-o",
    "options",
    multiple=True,
    metavar="KEY=JSON",
    help='A policy option, e.g. -o gamma=0.1, -o \'weights={"a": 0.9, "b": 0.1}\', -o min_confidence=0.6.',
)
@click.pass_context
@handles_errors
def app_set_policy(ctx, name, policy, options) -> None:
    """Choose how APP uses its linked models.

    \b
    single    one model (option model=NAME; default the first linked)
    weighted  traffic split by weights (canary, A/B); stable per --context key
    shadow    the primary answers, shadows are compared (option primary=NAME)
    exp3      one model per query, learned from feedback (option gamma)
    exp4      all models per query, combined with weights learned from feedback (option eta);
              'ensemble' is the same; the reply comes at the SLO with the answers that arrived
    """
    parsed = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r}: write KEY=JSON", param_hint="--option")
        parsed[key] = _json_value(value, f"--option {key}")
    with _admin(ctx) as admin:
        doc = admin.set_policy(name, policy, **parsed)
    click.echo(
        f"app {name}: policy {doc['selection']['policy']} over {', '.join(doc['models']) or 'no models'}"
    )


@app.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handles_errors
def app_list(ctx, as_json) -> None:
    """List apps."""
    with _admin(ctx) as admin:
        apps = admin.list_apps()
    if as_json:
        _print_json(apps)
        return
    _table(
        [
            (
                a["name"],
                a["input_type"],
                a["input_shape"],
                a["slo_ms"],
                json.dumps(a["default"]) if a["has_default"] else "-",
                ",".join(a["models"]) or "-",
            )
            for a in apps
        ],
        ("NAME", "INPUT", "SHAPE", "SLO_MS", "DEFAULT", "MODELS"),
    )


@app.command("show")
@click.argument("name", metavar="APP")
@click.pass_context
@handles_errors
def app_show(ctx, name) -> None:
    """Show one app with its figures (JSON)."""
    with _admin(ctx) as admin:
        _print_json(admin.show_app(name))


@app.command("delete")
@click.argument("name", metavar="APP")
@click.pass_context
@handles_errors
def app_delete(ctx, name) -> None:
    """Delete app APP."""
    with _admin(ctx) as admin:
        admin.delete_app(name)
    click.echo(f"deleted app {name}")


@app.command("link")
@click.argument("app_name", metavar="APP")
@click.argument("model")
@click.pass_context
@handles_errors
def app_link(ctx, app_name, model) -> None:
    """Route APP's queries to MODEL (deployed now or later)."""
    with _admin(ctx) as admin:
        admin.link(app_name, model)
    click.echo(f"linked {app_name} -> {model}")


@app.command("unlink")
@click.argument("app_name", metavar="APP")
@click.argument("model")
@click.pass_context
@handles_errors
def app_unlink(ctx, app_name, model) -> None:
    """Stop routing APP's queries to MODEL."""
    with _admin(ctx) as admin:
        admin.unlink(app_name, model)
    click.echo(f"unlinked {app_name} -> {model}")


# ---------------------------------------------------------------- models


@main.group()
def model() -> None:
    """Serve models and manage their versions."""


model.add_command(model_build_command)  # ketch model build (ketch/build.py)


def replica_options(f: Callable) -> Callable:
    for decorator in reversed(
        [
            click.argument("target"),
            click.option("--name", required=True, help="Model name."),
            click.option("--version", "model_version", default="1", show_default=True, help="Model version."),
            click.option(
                "--input-type", default=None, help="Input dtype [default: the model's, else float64]."
            ),
            click.option(
                "--input-shape",
                default=None,
                help="Per-item input shape, e.g. 4 (-1: any size) [default: the model's, else -1].",
            ),
            click.option(
                "--backend",
                envvar="KETCH_BACKEND",
                show_envvar=True,
                default=DEFAULT_BACKEND,
                show_default=True,
                help="Broker backend address (replicas connect there).",
            ),
            click.option(
                "--credits",
                default=2,
                show_default=True,
                type=click.IntRange(1),
                help="Batches a replica holds at once.",
            ),
            click.option(
                "--max-batch",
                default=0,
                show_default=True,
                type=click.IntRange(0),
                help="Largest batch a replica takes (0: no limit of its own).",
            ),
            click.option("--nondeterministic", is_flag=True, help="Answers vary for one input (no caching)."),
            click.option(
                "--build-id",
                envvar="KETCH_BUILD_ID",
                default=None,
                help="What this code is, for the broker's cache (default: a digest of the model's source).",
            ),
        ]
    ):
        f = decorator(f)
    return f


def _load_source(target: str, input_type: str | None) -> tuple[Any, dict[str, Any]]:
    """The model TARGET names (a file, a folder or code) and what it says of its input.

    A target that does not load exits with EXIT_TARGET: a supervisor does not restart it.
    """
    from ketch import loading

    try:
        source = loading.resolve(target)
        warning = loading.trust_warning(source)
        if warning:
            click.echo(warning, err=True)
        return loading.load(source, input_type=input_type)
    except loading.BadSource as exc:  # the message says what to do
        _fail(f"the model does not load: {exc}", EXIT_TARGET)
    except Exception as exc:  # the user's module: any error
        _fail(f"model target {target!r} does not load: {type(exc).__name__}: {exc}", EXIT_TARGET)


def _replica_cli_options(kw: dict[str, Any]) -> list[str]:
    out = [
        "--name",
        kw["name"],
        "--version",
        kw["model_version"],
        *(["--input-type", kw["input_type"]] if kw["input_type"] else []),
        "--backend",
        kw["backend"],
        "--credits",
        str(kw["credits"]),
        "--max-batch",
        str(kw["max_batch"]),
    ]
    if kw["input_shape"] is not None:
        out += ["--input-shape", kw["input_shape"]]
    if kw["nondeterministic"]:
        out.append("--nondeterministic")
    if kw["build_id"]:
        out += ["--build-id", kw["build_id"]]
    return out


@model.command("run")
@replica_options
@handles_errors
def model_run(
    target,
    name,
    model_version,
    input_type,
    input_shape,
    backend,
    credits,
    max_batch,
    nondeterministic,
    build_id,
):
    """Run one replica of TARGET (a model file or folder, MODULE:ATTR or FILE.py:ATTR) in the
    foreground."""
    from ketch.runtime import serve

    logs.configure()
    model, meta = _load_source(target, input_type)
    shape = _shape(input_shape) if input_shape is not None else meta["input_shape"]
    serve(
        model,
        name=name,
        version=model_version,
        input_type=input_type or meta["input_type"] or "float64",
        input_shape=shape,
        broker=backend,
        credits=credits,
        max_batch=max_batch,
        deterministic=not nondeterministic,
        build_id=build_id,
    )


@model.command("serve")
@replica_options
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(1), help="Replica processes.")
@click.option(
    "--batching",
    type=click.Choice(["model", "aimd", "fixed"]),
    default=None,
    help="Batch size control of the model (broker default: model, a per-replica latency model).",
)
@click.option(
    "--batch-delay-ms", type=click.FloatRange(0, 10_000), default=None, help="Wait to fill a batch."
)
@click.option("--max-queue", type=click.IntRange(1), default=None, help="Queries the model's queue holds.")
@click.pass_context
@handles_errors
def model_serve(ctx, replicas, batching, batch_delay_ms, max_queue, **kw):
    """Run REPLICAS supervised processes of TARGET (restarted if they crash) until Ctrl-C/SIGTERM.

    TARGET is a model file (.joblib/.pkl, .onnx, .pt), a folder holding one, or MODULE:ATTR or
    FILE.py:ATTR naming a batch function predict(inputs) -> outputs (a list in, a list out),
    a class or factory giving an object with predict, or a scikit-learn estimator.
    --batching, --batch-delay-ms, --max-queue and --max-batch set the model's queue policy
    in the broker (through its admin socket) before the replicas start.
    """
    from ketch import loading
    from ketch.supervisor import exec_supervisor, replica_argv

    logs.configure()
    loading.resolve(kw["target"])  # a name that names no model fails here, before anything starts
    if batching is not None or batch_delay_ms is not None or max_queue is not None or kw["max_batch"]:
        with _admin(ctx) as admin:
            admin.configure_model(
                kw["name"],
                batching=batching,
                batch_delay_ms=batch_delay_ms,
                max_queue=max_queue,
                max_batch=kw["max_batch"] or None,
                create=True,
            )
    # the target is loaded by the replicas only (a replica that cannot load it exits with
    # EXIT_TARGET, and the supervisor stops there), and this process becomes the
    # supervisor, without the CLI: it stays small for as long as the replicas run
    exec_supervisor(replica_argv(kw["target"], _replica_cli_options(kw)), replicas, fatal_exit=EXIT_TARGET)


@model.command("drain")
@click.argument("name", metavar="MODEL")
@click.option("--replica", default=None, help="Only this replica id (default: every replica of the model).")
@click.pass_context
@handles_errors
def model_drain(ctx, name, replica) -> None:
    """Stop new work to MODEL's replicas; they finish what they hold and leave."""
    with _admin(ctx) as admin:
        ids = admin.drain(name, replica)["draining"]
    click.echo(f"draining {len(ids)} replica(s) of {name}: {', '.join(ids) or '-'}")


@main.group()
def keys() -> None:
    """CurveZMQ keys for the broker, clients, containers and admins."""


@keys.command("generate")
@click.argument("directory")
@click.option("--name", required=True, help="Key name: writes NAME.key (public) and NAME.key_secret.")
def keys_generate(directory, name) -> None:
    """Create a Curve key pair in DIRECTORY.

    Give the broker its .key_secret (--curve-secret) and folders holding the .key files of
    the clients, containers and admins it lets in; give each peer the broker's .key and its
    own .key_secret (KETCH_CURVE_SERVER_KEY, KETCH_CURVE_SECRET).
    """
    from ketch.curve import generate

    public, secret = generate(directory, name)
    click.echo(f"public key {public}\nsecret key {secret} (keep it private)")


@model.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@handles_errors
def model_list(ctx, as_json) -> None:
    """List models, their versions and replicas."""
    with _admin(ctx) as admin:
        models = admin.list_models()
    if as_json:
        _print_json(models)
        return
    _table(
        [
            (
                m["name"],
                m["active_version"] or "-",
                ",".join(m["versions"]) or "-",
                m["figures"]["replicas"],
                m["figures"]["queue_depth"],
                m["figures"]["mean_batch"],
            )
            for m in models
        ],
        ("NAME", "ACTIVE", "VERSIONS", "REPLICAS", "QUEUE", "MEAN_BATCH"),
    )


@model.command("show")
@click.argument("name", metavar="MODEL")
@click.pass_context
@handles_errors
def model_show(ctx, name) -> None:
    """Show one model with its replicas (JSON)."""
    with _admin(ctx) as admin:
        _print_json(admin.show_model(name))


@model.command("set-version")
@click.argument("name", metavar="MODEL")
@click.argument("version")
@click.option(
    "--wait",
    "wait_s",
    type=click.FloatRange(0),
    default=60.0,
    help="Seconds to wait for a live replica of VERSION (it may be starting); 0: switch at once.",
)
@click.pass_context
@handles_errors
def model_set_version(ctx, name, version, wait_s) -> None:
    """Make VERSION of MODEL the one that answers, once a replica of it is live."""
    from ketch._progress import Progress
    from ketch.launch import live_replicas

    with _admin(ctx) as admin:
        if wait_s and not live_replicas(admin, name, version):
            deadline = time.monotonic() + wait_s
            with Progress(f"waiting for a live replica of {name} version {version}") as p:
                while not live_replicas(admin, name, version) and time.monotonic() < deadline:
                    p.update("none yet")
                    time.sleep(0.2)
            if not live_replicas(admin, name, version):
                _fail(
                    f"no live replica of {name} version {version} after {wait_s:g} s: start one "
                    f"(ketch model serve SOURCE --name {name} --version {version}), or --wait 0 "
                    "to switch anyway (queries then get the default until one joins)",
                    EXIT_REFUSED,
                )
        admin.set_version(name, version)
    click.echo(f"model {name}: active version {version}")


@model.command("delete")
@click.argument("name", metavar="MODEL")
@click.option("--force", is_flag=True, help="Also unlink it from the apps that link it.")
@click.pass_context
@handles_errors
def model_delete(ctx, name, force) -> None:
    """Forget MODEL (its versions and queue policy); it must have no live replica."""
    with _admin(ctx) as admin:
        doc = admin.delete_model(name, force=force)
    unlinked = f" (unlinked from {', '.join(doc['unlinked_from'])})" if doc["unlinked_from"] else ""
    click.echo(f"deleted model {name}{unlinked}")


@model.command("rollback")
@click.argument("name", metavar="MODEL")
@click.pass_context
@handles_errors
def model_rollback(ctx, name) -> None:
    """Go back to the version that was active before."""
    with _admin(ctx) as admin:
        doc = admin.rollback(name)
    click.echo(f"model {name}: active version {doc['active_version']}")


# ---------------------------------------------------------------- queries


def _input_for(ctx: click.Context, app: str, text: str, dtype: str | None) -> tuple[Any, str | None]:
    """``--input`` as the value to send to APP (of its input type, or ``--dtype``), and the
    dtype to name when sending it (text kinds only; arrays carry theirs)."""
    from ketch.inputs import to_input

    value = _json_value(text, "--input")
    if dtype is None:
        with _admin(ctx) as admin:
            dtype = admin.show_app(app)["input_type"]
    try:
        x = to_input(value, dtype, "the input")
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (app {app!r})", param_hint="--input") from None
    return x, dtype if dtype in ("string", "json") else None


@main.command("predict")
@click.argument("app_name", metavar="APP")
@click.option(
    "--input",
    "input_text",
    required=True,
    help="Input as JSON: a list of numbers (converted to the app's type when no value changes), or a string.",
)
@click.option("--dtype", default=None, help="Input dtype [default: the app's own, asked of the broker].")
@click.option("--timeout-ms", type=float, default=None, help="Override the app's SLO for this query.")
@click.option("--context", default="", help="Selection key (a user id): weighted splits and bandits use it.")
@click.option(
    "--version",
    "model_version",
    default="",
    help="Answered by this model version only, active or not (MODEL:VERSION for an app of several models).",
)
@click.pass_context
@handles_errors
def predict(ctx, app_name, input_text, dtype, timeout_ms, context, model_version) -> None:
    """Ask APP for one prediction and print it as JSON."""
    value, dtype = _input_for(ctx, app_name, input_text, dtype)
    from ketch.client import Client

    with Client(ctx.obj["frontend"]) as client:
        pred = client.predict(
            app_name, value, timeout_ms, dtype=dtype, context=context, version=model_version
        )
    output = pred.output.tolist() if hasattr(pred.output, "tolist") else pred.output
    if isinstance(output, bytes):
        output = output.decode("utf-8", "backslashreplace")
    _print_json(
        {
            "output": output,
            "default": pred.default,
            "default_explanation": pred.default_explanation,
            "model": pred.model,
            "version": pred.version,
            "latency_ms": round(pred.latency_ms, 3),
            "confidence": round(pred.confidence, 4),
            "models_answered": list(pred.models_answered),
            "models_missing": list(pred.models_missing),
            "request_id": pred.request_id,
        }
    )


@main.command("feedback")
@click.argument("app_name", metavar="APP")
@click.option("--label", required=True, help="The true answer, as JSON.")
@click.option(
    "--query-id",
    type=int,
    default=None,
    help="Request id of a query this client sent (with CurveZMQ keys: sent with the same key).",
)
@click.option("--input", "input_text", default=None, help="Or the query's input, as JSON.")
@click.option("--dtype", default=None, help="Input dtype; by default the app's own.")
@click.pass_context
@handles_errors
def feedback(ctx, app_name, label, query_id, input_text, dtype) -> None:
    """Tell APP the true label of an earlier query, named by --query-id or --input."""
    if (query_id is None) == (input_text is None):
        raise click.UsageError("name the query by --query-id or by --input (one of them)")
    x = None
    if input_text is not None:
        x, _ = _input_for(ctx, app_name, input_text, dtype)
    from ketch.client import Client

    with Client(ctx.obj["frontend"]) as client:
        client.feedback(app_name, _json_value(label, "--label"), query_id=query_id, x=x)
    click.echo("feedback taken")


@main.command("bench")
@click.argument("app_name", metavar="APP")
@click.option(
    "--concurrency", default="1,8,64", show_default=True, help="Closed-loop levels: queries in flight."
)
@click.option(
    "--rate", type=float, multiple=True, help="Open-loop Poisson levels, queries per second (repeatable)."
)
@click.option("--duration", type=click.FloatRange(0.5, 3600), default=5.0, show_default=True,
              help="Seconds per level.")  # fmt: skip
@click.option("--input", "input_text", default=None, help="One input as JSON (varied per query, see below).")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Inputs as JSON lines, used in turn.")  # fmt: skip
@click.option("--repeat-inputs", is_flag=True,
              help="Send the inputs exactly as given, so repeats may be answered by the cache.")  # fmt: skip
@click.option("--timeout-ms", type=float, default=None, help="Override the app's SLO.")
@click.option("--one-per-message", is_flag=True,
              help="Closed loop: each query in a message of its own (independent callers).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_context
@handles_errors
def bench(
    ctx, app_name, concurrency, rate, duration, input_text, input_file, repeat_inputs, timeout_ms,
    one_per_message, as_json,
) -> None:  # fmt: skip
    """Load APP like perf_analyzer: closed loop at each --concurrency, open loop at each --rate.

    Each query is unique by default, within a level, across levels and (for inputs with
    room) across runs: float inputs get the lowest bits of their values varied. So the
    model is measured, not the prediction cache; the cache-hit share of
    each level is printed either way. Shows progress, then a table per level: throughput
    (predictions per second; defaults and errors not counted), latency quantiles, defaults,
    errors with their codes. Exits 1 when every query failed.
    """
    from ketch._progress import Progress
    from ketch.bench import closed_loop, open_loop, run_start, varied_inputs
    from ketch.inputs import to_input

    if (input_text is None) == (input_file is None):
        raise click.UsageError("give --input or --input-file (one of them)")
    with _admin(ctx) as admin:
        doc = admin.show_app(app_name)
    dtype = doc["input_type"]
    if input_text is not None:
        raw = [_json_value(input_text, "--input")]
    else:
        with open(input_file, encoding="utf-8") as fh:
            raw = [_json_value(line, f"{input_file} line") for line in fh if line.strip()]
        if not raw:
            raise click.BadParameter(f"{input_file} holds no inputs", param_hint="--input-file")
    try:
        inputs = [to_input(v, dtype, f"input {i + 1}") for i, v in enumerate(raw)]
    except ValueError as exc:
        raise click.BadParameter(f"{exc} (app {app_name!r})", param_hint="--input") from None
    if dtype == "json":
        inputs = [json.dumps(v) for v in inputs]
    if repeat_inputs:
        make, how = (lambda k: inputs[k % len(inputs)]), f"{len(inputs)} input(s) repeated as given"
    else:
        make, how = varied_inputs(inputs)
    # each level goes on where the last stopped (a level must not repeat its predecessor's
    # inputs, which the cache holds), from a start of its own per run where there is room
    next_k = [0 if repeat_inputs else run_start(inputs)]
    try:
        levels = [("concurrency", int(c)) for c in concurrency.split(",") if c.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{concurrency!r}: numbers separated by commas", param_hint="--concurrency"
        ) from None
    levels += [("rate", r) for r in rate]
    if not as_json:
        click.echo(f"inputs: {how}", err=True)

    def cache_figures(admin: Admin) -> tuple[int, int]:
        figures = admin.show_app(app_name)["figures"]
        return figures["queries"], figures["cache_hits"]

    rows = []
    frontend = ctx.obj["frontend"]
    with _admin(ctx) as admin:
        for kind, level in levels:
            before = cache_figures(admin)
            with Progress(f"{kind} {level:g} for {duration:g} s", total=duration,
                          stream=open(os.devnull, "w") if as_json else None) as bar:  # fmt: skip
                started = time.monotonic()

                def progress(result, bar=bar, started=started) -> None:
                    bar.update(
                        f"{result.sent} sent, {result.ok} predictions, {result.errors} errors",
                        done=time.monotonic() - started,
                    )

                options: dict[str, Any] = {"timeout_ms": timeout_ms, "progress": progress}
                start = next_k[0]

                def make_level(k: int, start: int = start) -> Any:
                    if start + k >= next_k[0]:
                        next_k[0] = start + k + 1
                    return make(start + k)

                if kind == "concurrency":
                    options["one_per_message"] = one_per_message
                    res = closed_loop(frontend, app_name, make_level, level, duration, **options)
                else:
                    res = open_loop(frontend, app_name, make_level, level, duration, **options)
                bar.update(f"{res.sent} sent, {res.ok} predictions, {res.errors} errors", done=duration)
            after = cache_figures(admin)
            queries, hits = after[0] - before[0], after[1] - before[1]
            rows.append(
                {
                    "load": f"{kind} {level:g}",
                    **res.summary(),
                    "cache_hit_share": round(hits / queries, 4) if queries else 0.0,
                    "error_codes": res.error_codes,
                    "error_examples": res.error_examples,
                }
            )
    failed_all = all(r["ok"] == 0 and r["defaults"] == 0 for r in rows) and any(r["sent"] for r in rows)
    if as_json:
        _print_json(rows)
    else:
        _table(
            [
                (r["load"], r["sent"], r["throughput"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["p999_ms"],
                 r["defaults"], r["errors"], r["lost"], f"{r['cache_hit_share'] * 100:.1f}%")
                for r in rows
            ],
            ("LOAD", "SENT", "PRED/S", "P50_MS", "P90_MS", "P99_MS", "P99.9_MS", "DEFAULTS", "ERRORS", "LOST",
             "CACHE_HITS"),
        )  # fmt: skip
        for r in rows:
            for code, count in sorted(r["error_codes"].items(), key=lambda kv: -kv[1]):
                click.echo(f"{r['load']}: {count} x {code}: {r['error_examples'].get(code, '')}")
    if failed_all:
        _fail("every query failed (see the error codes above)", EXIT_REFUSED)


@main.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", type=float, default=None, help="Refresh every N seconds until Ctrl-C.")
@click.pass_context
@handles_errors
def stats(ctx, as_json, watch) -> None:
    """Per app and model figures: queries, defaults, errors, latency, batches, queues, replicas."""
    with _admin(ctx) as admin:
        while True:
            figures = admin.stats()
            if as_json:
                _print_json(figures)
            else:
                if watch:
                    click.clear()
                _stats_tables(figures)
            if not watch:
                return
            time.sleep(watch)


def _stats_tables(figures: dict[str, Any]) -> None:
    app_columns = {
        "APP": None, "QUERIES": "queries", "ANSWERED": "answered", "DEFAULTS": "defaults", "ERRORS": "errors",
        "P50_MS": "p50_ms", "P99_MS": "p99_ms", "CACHE_HITS": "cache_hits",
    }  # fmt: skip
    _table(
        [
            (name, *(a[k] for k in list(app_columns.values())[1:]), ",".join(a["models"]) or "-")
            for name, a in figures["apps"].items()
        ],
        (*app_columns, "MODELS"),
    )
    model_columns = {
        "MODEL": None, "VERSION": "active_version", "REPLICAS": "replicas", "QUEUE": "queue_depth",
        "BATCHES": "batches", "MEAN_BATCH": "mean_batch", "ERRORS": "errors", "CACHE_HITS": "cache_hits",
        "COALESCED": "coalesced", "DROPPED": "dropped", "REFUSED": "refused", "BATCHING": "batching",
    }  # fmt: skip
    click.echo()
    _table(
        [
            (name, *(m[k] for k in list(model_columns.values())[1:]), m["queue_wait_ms"]["p99_ms"])
            for name, m in figures["models"].items()
        ],
        (*model_columns, "QUEUE_WAIT_P99"),
    )
    if figures.get("replicas"):
        click.echo()
        _table(
            [
                (
                    r["replica_id"], r["model"], r["version"], r["state"], r["inflight"], r["batch_size"],
                    r["batches"], r["items"], r["compute_ms"]["p50_ms"], r["rpc_ms"]["p50_ms"],
                )
                for r in figures["replicas"]
            ],
            ("REPLICA", "MODEL", "VERSION", "STATE", "INFLIGHT", "BATCH_SIZE", "BATCHES", "ITEMS",
             "COMPUTE_P50", "RPC_P50"),
        )  # fmt: skip
    cache = figures.get("cache")
    if cache:
        click.echo()
        click.echo(
            f"cache: {cache['entries']} entries, {cache['bytes'] / 2**20:.1f} of"
            f" {cache['max_bytes'] / 2**20:.0f} MiB;"
            f" hits {cache['hits']}, misses {cache['misses']}, coalesced {cache['coalesced']},"
            f" evictions {cache['evictions']}, expired {cache['expired']}"
        )


@main.command("gateway")
@click.option(
    "--broker",
    "frontend",
    default=None,
    help="Broker frontend address [default: ketch --frontend, $KETCH_FRONTEND or tcp://127.0.0.1:7001].",
)
@click.option(
    "--admin",
    "admin_address",
    default=None,
    help="Broker admin address [default: ketch --admin, $KETCH_ADMIN or tcp://127.0.0.1:7002].",
)
@click.option(
    "--listen",
    default="127.0.0.1:8080",
    show_default=True,
    help="HOST:PORT to serve HTTP on (port 0: any free port).",
)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="Worker processes.")
@click.option(
    "--grpc",
    "grpc_listen",
    default=None,
    help="HOST:PORT to serve KServe V2 over gRPC on [default: the --listen host, its port + 1; "
    "port 0 with --listen port 0].",
)
@click.option("--no-grpc", is_flag=True, help="Serve no gRPC.")
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Bearer tokens, one a line; every route but health then needs one; a line 'admin TOKEN' "
    "is an admin token, the only kind /admin/ takes "
    "(also $KETCH_GATEWAY_TOKENS, $KETCH_GATEWAY_ADMIN_TOKENS).",
)
@click.option(
    "--metadata-ttl",
    default=1.0,
    show_default=True,
    type=click.FloatRange(0),
    help="Seconds app metadata and readiness are cached.",
)
@click.option(
    "--max-body-mb", default=64, show_default=True, type=click.IntRange(1), help="Largest request body."
)
@click.option(
    "--max-json-mb",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Largest JSON text in a request (larger tensors go as binary data).",
)
@click.option(
    "--max-connections",
    default=1024,
    show_default=True,
    type=click.IntRange(16),
    help="Connections per worker; past it the slowest-arriving request's connection is closed.",
)
@click.option(
    "--max-client-requests",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Requests one client (its bearer token, else its address) may have in progress per worker.",
)
@click.option(
    "--max-client-queries",
    default=2500,
    show_default=True,
    type=click.IntRange(1),
    help="Queries one client may have in progress per worker (a request of more is 413).",
)
@click.option(
    "--header-timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a client has to send a whole request head.",
)
@click.option(
    "--body-timeout-s",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 3600),
    help="Seconds a client has to send a body, plus 1 s per 64 KiB it sends.",
)
@click.option("--ready-file", default=None, help="Write the bound URL here as JSON once listening.")
@click.option(
    "--insecure",
    is_flag=True,
    help="Listen on an address other machines can reach without bearer tokens.",
)
@click.option(
    "--log-level",
    default="warning",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="uvicorn's log level.",
)
@click.option(
    "--model-control",
    is_flag=True,
    help="Allow POST /v2/repository/models/NAME/load and /unload (unload drains replicas); "
    "off, they are refused (403), as Triton's without explicit model control.",
)
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="One log line per request (method, route, app, status, latency, request id, client).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="Let browser pages from ORIGIN (e.g. https://app.example.com, or *) call the gateway; repeatable. "
    "Default: no CORS.",
)
@click.option(
    "--strict-readiness/--no-strict-readiness",
    default=True,
    show_default=True,
    help="/v2/health/ready needs a live replica of every model an app links (as Triton's), "
    "not only a broker that answers.",
)
@click.pass_context
def gateway(
    ctx,
    frontend,
    admin_address,
    listen,
    workers,
    grpc_listen,
    no_grpc,
    token_file,
    metadata_ttl,
    max_body_mb,
    max_json_mb,
    max_connections,
    max_client_requests,
    max_client_queries,
    header_timeout_s,
    body_timeout_s,
    ready_file,
    insecure,
    log_level,
    model_control,
    access_log,
    cors_origins,
    strict_readiness,
) -> None:
    """Serve HTTP (Clipper's REST API, KServe V2, /metrics) and KServe V2 over gRPC in front of
    a broker until Ctrl-C/SIGTERM.

    A separate process that is a Ketch client of the broker; routes in docs/http.md.
    """
    host, port = _check_listen(listen, "--listen")
    grpc_at = None if no_grpc else _grpc_listen(grpc_listen, host, port, "--grpc")
    if not _gateway_installed():
        _fail("the HTTP gateway needs the http extra: pip install 'ketch[http]'", 2)
    from ketch.gateway import GatewayConfig, serve
    from ketch.gateway.auth import load_admin_tokens, load_tokens

    try:
        tokens = load_tokens(token_file)
        admin_tokens = load_admin_tokens(token_file)
    except ValueError as exc:
        _fail(str(exc), 2)
    if not tokens and not insecure:
        _check_http_exposure(host, "--listen")
        if grpc_at is not None:
            _check_http_exposure(grpc_at[0], "--grpc")
    config = GatewayConfig(
        frontend=frontend or ctx.obj["frontend"],
        admin=admin_address or ctx.obj["admin"],
        tokens=tokens,
        admin_tokens=admin_tokens,
        metadata_ttl_s=metadata_ttl,
        max_body_bytes=max_body_mb * 1024 * 1024,
        max_json_bytes=min(max_json_mb, max_body_mb) * 1024 * 1024,
        max_connections=max_connections,
        max_client_requests=max_client_requests,
        max_client_queries=max_client_queries,
        header_timeout_s=header_timeout_s,
        body_timeout_s=body_timeout_s,
        model_control=model_control,
        access_log=access_log,
        cors_origins=list(cors_origins),
        strict_readiness=strict_readiness,
    )
    logs.configure()
    try:
        code = serve(
            config,
            host=host,
            port=port,
            workers=workers,
            ready_file=ready_file,
            log_level=log_level,
            grpc=grpc_at,
            grpc_optional=grpc_listen is None,
        )
    except OSError as exc:
        why = exc.strerror or str(exc)
        _fail(
            why if why.startswith("cannot serve gRPC") else f"cannot serve HTTP on {listen}: {why}",
            EXIT_REFUSED,
        )
    sys.exit(code)


@main.command("demo")
@click.option(
    "--queries",
    default=5000,
    show_default=True,
    type=click.IntRange(100, 1_000_000),
    help="Queries in the throughput phase.",
)
@click.option(
    "--replicas",
    default=2,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Replica processes of the model.",
)
@click.option("--slo-ms", default=50.0, show_default=True, help="The demo app's latency objective.")
def demo(queries: int, replicas: int, slo_ms: float) -> None:
    """Start a broker and a scikit-learn model with replicas, send real queries, print a summary.

    Everything runs on 127.0.0.1 on free ports and is stopped at the end.
    """
    from ketch.demo import run_demo

    sys.exit(run_demo(queries=queries, replicas=replicas, slo_ms=slo_ms))


if __name__ == "__main__":
    main()
