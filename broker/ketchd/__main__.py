"""``ketchd`` / ``python -m ketchd``: run the broker in the foreground."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from ketch import logs, tracing

from ketchd.config import BrokerConfig, exposed


def run_broker(config: BrokerConfig, ready_file: str | None = None) -> None:
    """Run a broker until SIGTERM/SIGINT or ``broker.stop``; then drain and return."""
    import zmq

    from ketchd.broker import Broker  # here: the CLI reads this module's options without them

    logs.configure()
    tracing.setup("ketchd")  # spans of traced queries when the OpenTelemetry variables say so
    broker = Broker(config)
    broker.install_signal_handlers()

    def ready(endpoints: dict[str, str]) -> None:
        if ready_file:
            path = Path(ready_file)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), **endpoints}))
            tmp.replace(path)
        logs.quiet_gc()

    try:
        broker.run(ready)
    except zmq.ZMQError as exc:
        if exc.errno != zmq.EADDRINUSE:
            raise
        raise SystemExit(address_in_use(config, str(exc))) from None
    except OSError as exc:  # the /metrics server's address (the ZMQ sockets are bound before it)
        if exc.errno != errno.EADDRINUSE:
            raise
        raise SystemExit(
            f"error: cannot serve metrics on {config.metrics}: the address is in use "
            "(`ss -ltnp` names who holds it); give another with --metrics HOST:PORT "
            "(or KETCH_METRICS; port 0 takes any free one), or --no-metrics"
        ) from None
    finally:
        tracing.shutdown()


def address_in_use(config: BrokerConfig, error: str) -> str:
    """What to say when an address is taken: whether a broker answers there, and what to do."""
    from ketch.launch import broker_status

    taken = next((a for a in (config.frontend, config.backend, config.admin) if a in error), error)
    status = broker_status(config.admin, timeout_ms=1000)
    who = (
        f"a Ketch broker already runs there (pid {status['pid']}): `ketch broker status` shows it, "
        "`ketch broker stop` stops it"
        if status
        else "another program holds it (`ss -ltnp` names it)"
    )
    return (
        f"error: cannot listen on {taken}: the address is in use; {who}.\n"
        "  or use other addresses: --frontend, --backend, --admin "
        "(or KETCH_FRONTEND, KETCH_BACKEND, KETCH_ADMIN)"
    )


F = TypeVar("F", bound=Callable[..., Any])


def broker_options(f: F) -> F:
    """Options shared by ``ketchd`` and ``ketch broker start``."""
    defaults = BrokerConfig()
    for decorator in reversed(
        [
            click.option(
                "--frontend",
                envvar="KETCH_FRONTEND",
                default=defaults.frontend,
                show_default=True,
                help="Address clients connect to.",
            ),
            click.option(
                "--backend",
                envvar="KETCH_BACKEND",
                default=defaults.backend,
                show_default=True,
                help="Address model containers connect to.",
            ),
            click.option(
                "--admin",
                envvar="KETCH_ADMIN",
                default=defaults.admin,
                show_default=True,
                help="Address of the admin socket (keep it on loopback).",
            ),
            click.option(
                "--metrics",
                envvar="KETCH_METRICS",
                default=defaults.metrics,
                show_default=True,
                help="HOST:PORT of the broker's own Prometheus /metrics (HTTP; port 0 takes a free "
                "one). Read-only figures without authentication: keep it on loopback unless "
                "scrapers elsewhere must reach it.",
            ),
            click.option("--no-metrics", is_flag=True, help="Serve no /metrics of the broker's own."),
            click.option(
                "--state",
                "state_path",
                default=defaults.state_path,
                show_default=True,
                help="SQLite file for apps and models (':memory:' keeps nothing).",
            ),
            click.option(
                "--heartbeat-ms",
                default=defaults.heartbeat_ms,
                show_default=True,
                type=click.IntRange(10),
                help="How often replicas send a heartbeat (the broker tells them at Welcome).",
            ),
            click.option(
                "--dead-after-ms",
                default=defaults.dead_after_ms,
                show_default=True,
                type=click.IntRange(50),
                help="A replica silent this long is dead: its work goes to others.",
            ),
            click.option(
                "--requeue-alone-ms",
                default=defaults.requeue_alone_ms,
                show_default=True,
                type=click.FloatRange(0),
                help="A dead replica's queries go back each alone (a poison input then kills at most "
                "two replicas) while that costs the pool about this long; beyond, together as one "
                "batch (at most three).",
            ),
            click.option(
                "--max-batch",
                default=defaults.max_batch,
                show_default=True,
                type=click.IntRange(1),
                help="Largest batch sent to a replica unless a model sets less.",
            ),
            click.option(
                "--max-queue",
                default=defaults.max_queue,
                show_default=True,
                type=click.IntRange(1),
                help="Queries a model's queue holds before refusing with OVERLOADED.",
            ),
            click.option(
                "--max-message-mb",
                default=64,
                show_default=True,
                type=click.IntRange(1),
                help="Largest message taken on any socket.",
            ),
            click.option(
                "--cache-mb",
                default=256,
                show_default=True,
                type=click.IntRange(0),
                help="Prediction cache size (0 turns it off).",
            ),
            click.option(
                "--cache-ttl-s",
                default=0.0,
                show_default=True,
                type=click.FloatRange(0),
                help="Seconds a cached prediction lives (0: until evicted).",
            ),
            click.option(
                "--max-client-outstanding",
                default=defaults.max_client_outstanding,
                show_default=True,
                type=click.IntRange(1),
                help="Queries one client may have in the broker at once; past it, OVERLOADED.",
            ),
            click.option(
                "--max-message-items",
                default=defaults.max_message_items,
                show_default=True,
                type=click.IntRange(64),
                help="Request ids one Query may name; past it, one TOO_LARGE error for the message.",
            ),
            click.option(
                "--max-client-mb",
                default=defaults.max_client_bytes // 2**20,
                show_default=True,
                type=click.IntRange(1),
                help="Payload MiB one client's queries may hold in the broker; past it, OVERLOADED.",
            ),
            click.option(
                "--max-held-mb",
                default=defaults.max_held_bytes // 2**20,
                show_default=True,
                type=click.IntRange(1),
                help="Payload MiB all queries held may hold; past it, OVERLOADED.",
            ),
            click.option(
                "--feedback-memory-mb",
                default=defaults.feedback_memory_bytes // 2**20,
                show_default=True,
                type=click.IntRange(0),
                help="MiB of answered queries kept for feedback (also at most 100,000 queries).",
            ),
            click.option(
                "--curve-secret",
                default=None,
                help="The broker's .key_secret file: turns CurveZMQ on for all three sockets.",
            ),
            click.option(
                "--curve-clients", default=None, help="Folder of client public keys let in (frontend)."
            ),
            click.option(
                "--curve-containers", default=None, help="Folder of container public keys let in (backend)."
            ),
            click.option("--curve-admins", default=None, help="Folder of admin public keys let in (admin)."),
            click.option(
                "--ready-file", default=None, help="Write the bound endpoints here as JSON once listening."
            ),
            click.option(
                "--insecure",
                is_flag=True,
                help="Bind addresses other machines can reach without CurveZMQ: anyone who reaches "
                "them can query (frontend), register models (backend) or reconfigure (admin).",
            ),
        ]
    ):
        f = decorator(f)
    return f


def config_from_options(**kw: Any) -> tuple[BrokerConfig, str | None]:
    """The broker's config from the shared options; a UsageError for an unauthenticated
    socket other machines can reach, unless ``--insecure`` says so."""
    ready_file = kw.pop("ready_file", None)
    insecure = kw.pop("insecure", False)
    if kw.pop("no_metrics", False):
        kw["metrics"] = None
    elif kw.get("metrics"):
        from ketchd.metrics import parse_listen

        try:
            parse_listen(kw["metrics"])
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics") from None
    kw["max_message_bytes"] = kw.pop("max_message_mb") * 1024 * 1024
    kw["cache_bytes"] = kw.pop("cache_mb") * 1024 * 1024
    for mb, key in (("max_client_mb", "max_client_bytes"), ("max_held_mb", "max_held_bytes")):
        kw[key] = kw.pop(mb) * 1024 * 1024
    kw["feedback_memory_bytes"] = kw.pop("feedback_memory_mb") * 1024 * 1024
    config = BrokerConfig(**kw)
    if not config.curve_secret and not insecure:
        for role in ("frontend", "backend", "admin"):
            address = getattr(config, role)
            if exposed(address):
                raise click.UsageError(
                    f"--{role} {address} can be reached from other machines, and CurveZMQ is off: "
                    "anyone who reaches it could send queries, register models or change the "
                    "configuration. Turn Curve on (--curve-secret ..., see docs/reliability.md), bind "
                    "a loopback address, or pass --insecure to run without authentication."
                )
    return config, ready_file


@click.command(name="ketchd")
@broker_options
def main(**kw: Any) -> None:
    """Run the Ketch broker in the foreground."""
    config, ready_file = config_from_options(**kw)
    run_broker(config, ready_file)


if __name__ == "__main__":
    main()
