"""``ketch app apply FILE``: make the broker's apps what a JSON file says, idempotently.

Deployments (the Helm chart's post-install Job, the compose stack's setup service) declare
their apps instead of scripting ``ketch app create``; running the same file again changes
nothing. The file::

    {"apps": [{"name": "iris", "input_type": "float64", "input_shape": [4], "slo_ms": 100,
               "default": -1, "cache": true, "models": ["iris"],
               "policy": "single", "policy_options": {}}]}

``name`` and ``input_type`` are required. An app that does not exist is created. One that
exists gets the file's SLO and cache switch, links the models it lacks and unlinks those
the file does not list, and takes the policy when it differs (the same policy again keeps
what it learned). Its input type, shape, default and ``finite_only`` cannot change in
place: a difference is an error that names it (delete the app and apply again).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ketch.admin import Admin

from ketch.deploy import BadDeployment, app_apply_spec, check, read_document

_FIXED = ("input_type", "input_shape", "finite_only")


def load_spec(path: str) -> list[dict[str, Any]]:
    """The apps of a deployment file (JSON, TOML or YAML; ``ketch.deploy``), each naming its
    input type. A file's models and defaults are checked too; only ``ketch up`` runs them."""
    try:
        doc = read_document(path)
        if not isinstance(doc.get("apps"), list):
            raise BadDeployment(f'{path}: expected {{"apps": [...]}}')
        return [app_apply_spec(a) for a in check(doc, path, apps_need_types=True)["apps"]]
    except BadDeployment as exc:
        raise click.BadParameter(str(exc)) from None


def apply_app(admin: Admin, spec: dict[str, Any]) -> list[str]:
    """Bring one app to ``spec``; returns what was done, one phrase per change."""
    from ketch import errors

    name = spec["name"]
    models = list(spec.get("models", []))
    try:
        current = admin.show_app(name)
    except (errors.UnknownApp, errors.NotFound):
        current = None
    done: list[str] = []
    if current is None:
        admin.create_app(
            name,
            input_type=spec["input_type"],
            input_shape=spec.get("input_shape", []),
            slo_ms=spec.get("slo_ms"),
            default=spec.get("default"),
            models=models,
            cache=spec.get("cache", True),
            finite_only=spec.get("finite_only", False),
        )
        done.append("created")
        current = admin.show_app(name)
    else:
        wanted = {"input_type": spec["input_type"], "input_shape": list(spec.get("input_shape", [])),
                  "finite_only": spec.get("finite_only", False)}  # fmt: skip
        for key in _FIXED:
            if current[key] != wanted[key]:
                raise errors.Conflict(
                    f"app {name!r} has {key} {current[key]!r}, the file says {wanted[key]!r}: "
                    "it cannot change in place (delete the app, then apply)"
                )
        if "default" in spec and current["default"] != spec["default"]:
            raise errors.Conflict(
                f"app {name!r} has default {current['default']!r}, the file says {spec['default']!r}: "
                "it cannot change in place (delete the app, then apply)"
            )
        slo = spec.get("slo_ms", current["slo_ms"])
        cache = spec.get("cache", current["cache"])
        if slo != current["slo_ms"] or cache != current["cache"]:
            admin.configure_app(name, slo_ms=slo, cache=cache)
            done.append("configured")
        for model in models:
            if model not in current["models"]:
                admin.link(name, model)
                done.append(f"linked {model}")
        for model in current["models"]:
            if model not in models:
                admin.unlink(name, model)
                done.append(f"unlinked {model}")
    policy = spec.get("policy")
    options = spec.get("policy_options") or {}
    # the options in force, defaults included (an option given at its default is no change)
    in_force = current.get("selection", {}).get("options", current.get("policy_options", {}))
    if policy and (policy != current["policy"] or any(in_force.get(k) != v for k, v in options.items())):
        admin.set_policy(name, policy, **options)
        done.append(f"policy {policy}")
    return done


@click.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--wait",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Seconds to wait for the broker to answer first (a deployment starting up).",
)
@click.pass_context
def command(ctx: click.Context, file: str, wait: float) -> None:
    """Create or update the apps FILE declares (JSON, TOML or YAML: {"apps": [...]}, the
    format of `ketch up`, whose models it leaves alone; see docs/deploy.md)."""
    from ketch import errors  # imported when used: `import ketch.cli` stays light
    from ketch.admin import Admin

    apps = load_spec(file)
    deadline = time.monotonic() + wait
    address = ctx.find_root().obj["admin"]
    while True:
        try:
            with Admin(address, timeout_ms=2000) as admin:
                admin.ping()
                for spec in apps:
                    done = apply_app(admin, spec)
                    click.echo(f"app {spec['name']}: {', '.join(done) or 'unchanged'}")
            return
        except errors.Unavailable as exc:
            if time.monotonic() >= deadline:
                click.echo(f"error: {exc}\n  is the broker running at {address}?", err=True)
                raise SystemExit(3) from None
            time.sleep(1.0)
        except errors.RequestError as exc:
            click.echo(f"error: {exc.code_name}: {exc.message}", err=True)
            raise SystemExit(1) from None
