"""``python -m ketch.container``: the entry point of Ketch's Python model images.

It serves one model, named at run time, as one replica of the broker at ``KETCH_BACKEND``
(docs/deploy.md). Every option has an environment variable, so an image is configured
with ``docker run -e ...`` or a Kubernetes ``env:`` list:

    docker run -v $PWD/models:/models:ro -e KETCH_MODEL=/models/iris.joblib \\
        -e KETCH_MODEL_NAME=iris -e KETCH_BACKEND=tcp://broker:7000 ketch/python-sklearn:0.1.0

``KETCH_MODEL`` names a model file, a folder or Python code, as ``ketch.loading`` says (the
same loading as ``ketch serve``). Unpickling runs code: mount only files you trust.
"""

from __future__ import annotations

import importlib.metadata
import secrets
import socket
import subprocess
import sys
from typing import Any

import click

from ketch import __version__, addresses, loading, logs
from ketch.loading import SUFFIXES, ModelSource

__all__ = ["SUFFIXES", "ModelSource", "load", "main", "resolve"]

# the distribution each image's framework label names
FRAMEWORK_DISTS = {"scikit-learn": "scikit-learn", "onnxruntime": "onnxruntime", "torch": "torch"}
DEBIAN_PACKAGES = {"torch": "python3-torch"}


def resolve(spec: str) -> ModelSource:
    """Which kind of model ``spec`` names (``ketch.loading.resolve``, as a usage error)."""
    try:
        return loading.resolve(spec)
    except loading.BadSource as exc:
        raise click.BadParameter(str(exc)) from None


def load(source: ModelSource, *, output: str | None, input_type: str | None) -> tuple[Any, dict]:
    """The model object and what it says of its input (``ketch.loading.load``)."""
    try:
        return loading.load(source, output=output, input_type=input_type)
    except loading.BadSource as exc:
        raise click.UsageError(str(exc)) from None


def verify_framework(framework: str, version: str, ketch_version: str) -> None:
    """Fail unless this environment has Ketch ``ketch_version`` and ``framework`` ``version``
    importable (the image build runs this, so its labels cannot lie)."""
    if __version__ != ketch_version:
        raise SystemExit(f"ketch is {__version__}, the label says {ketch_version}")
    if framework == "python":
        found = f"{sys.version_info[0]}.{sys.version_info[1]}"
    else:
        module = __import__({"scikit-learn": "sklearn"}.get(framework, framework))
        found = importlib.metadata.version(FRAMEWORK_DISTS[framework])
        if module.__file__.startswith("/usr/lib/python3/dist-packages/") and framework in DEBIAN_PACKAGES:
            # Debian's build: its package version is the upstream release (python3-torch
            # 1.13.1+dfsg says "1.13.0a0+gitunknown" of itself)
            found = (
                subprocess.run(
                    ["dpkg-query", "-W", "-f=${Version}", DEBIAN_PACKAGES[framework]],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.split("+")[0]
                .split("-")[0]
            )
    if found != version and not found.startswith(version + "."):
        raise SystemExit(f"{framework} is {found}, the label says {version}")
    click.echo(f"ketch {__version__}, {framework} {found}")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, envvar="KETCH_MODEL")
@click.option(
    "--name", envvar="KETCH_MODEL_NAME", help="Model name [default: the file's stem]. $KETCH_MODEL_NAME"
)
@click.option(
    "--version",
    "model_version",
    envvar="KETCH_MODEL_VERSION",
    default="1",
    show_default=True,
    help="Model version. $KETCH_MODEL_VERSION",
)
@click.option(
    "--input-type",
    envvar="KETCH_INPUT_TYPE",
    default=None,
    help="Input dtype [default: the model's, else float64]. $KETCH_INPUT_TYPE",
)
@click.option(
    "--input-shape",
    envvar="KETCH_INPUT_SHAPE",
    default=None,
    help="Per-item input shape, e.g. 4 [default: the model's, else any]. $KETCH_INPUT_SHAPE",
)
@click.option(
    "--output",
    envvar="KETCH_OUTPUT",
    default=None,
    help="scikit-learn: predict (default) or predict_proba; ONNX: the output's name. $KETCH_OUTPUT",
)
@click.option(
    "--backend",
    envvar="KETCH_BACKEND",
    default=addresses.BACKEND,
    show_default=True,
    help="The broker's backend address. $KETCH_BACKEND",
)
@click.option(
    "--credits",
    envvar="KETCH_CREDITS",
    default=2,
    show_default=True,
    type=click.IntRange(1),
    help="Batches held at once. $KETCH_CREDITS",
)
@click.option(
    "--max-batch",
    envvar="KETCH_MAX_BATCH",
    default=0,
    show_default=True,
    type=click.IntRange(0),
    help="Largest batch taken (0: no limit of its own). $KETCH_MAX_BATCH",
)
@click.option(
    "--replica-id",
    envvar="KETCH_REPLICA_ID",
    default=None,
    help="Replica id [default: HOST/NAME/VERSION/RANDOM]. $KETCH_REPLICA_ID",
)
@click.option(
    "--nondeterministic",
    envvar="KETCH_NONDETERMINISTIC",
    is_flag=True,
    help="Answers vary for one input (never cached). $KETCH_NONDETERMINISTIC",
)
@click.option(
    "--status-file",
    envvar="KETCH_STATUS_FILE",
    default=None,
    help="Where to keep the status the probes read. $KETCH_STATUS_FILE",
)
@click.option("--check-framework", nargs=3, default=None, hidden=True)
def main(
    model,
    name,
    model_version,
    input_type,
    input_shape,
    output,
    backend,
    credits,
    max_batch,
    replica_id,
    nondeterministic,
    status_file,
    check_framework,
) -> None:
    """Serve MODEL ($KETCH_MODEL) as one replica of the broker at $KETCH_BACKEND until SIGTERM.

    MODEL is a model file (.joblib/.pkl: scikit-learn, .onnx: ONNX Runtime, .pt: TorchScript),
    a folder holding one, or Python code as MODULE:ATTR or FILE.py:ATTR. SIGTERM drains:
    the replica takes no new batches, answers those it holds, says goodbye and exits 0.
    """
    if check_framework:
        verify_framework(*check_framework)
        return
    if not model:
        raise click.UsageError("name the model: KETCH_MODEL=/models/model.joblib (or an argument)")
    from ketch.cli import _shape
    from ketch.runtime import serve

    logs.configure()
    source = resolve(model)
    name = name or source.default_name
    if not replica_id:
        # unique per process: containers on the host's network share its hostname and pid 1
        replica_id = f"{socket.gethostname()}/{name}/{model_version}/{secrets.token_hex(3)}"
    settings = source.settings  # a model folder's model.toml
    input_type = input_type or settings.get("input_type")
    obj, meta = load(source, output=output, input_type=input_type)
    if input_shape is not None:
        shape = _shape(input_shape)
    else:
        shape = settings.get("input_shape", meta["input_shape"])
    serve(
        obj,
        name=name,
        version=model_version,
        input_type=input_type or meta["input_type"] or "float64",
        input_shape=shape,
        broker=backend,
        replica_id=replica_id,
        credits=credits,
        max_batch=max_batch,
        deterministic=not nondeterministic,
        status_file=status_file,
    )


if __name__ == "__main__":
    main()
