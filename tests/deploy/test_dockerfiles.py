"""The Dockerfiles: hadolint (general practice) and scripts/check_dockerfiles.py (what
docs/deploy.md promises of every image), on docker/*/Dockerfile and on the Dockerfiles that
``ketch model build`` writes for each kind of model. The checker is shown to catch each
rule it enforces."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from ketch.cli import main as cli

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("*/Dockerfile"))
spec = importlib.util.spec_from_file_location("check_dockerfiles", ROOT / "scripts" / "check_dockerfiles.py")
check_dockerfiles = importlib.util.module_from_spec(spec)
sys.modules["check_dockerfiles"] = check_dockerfiles  # (dataclasses look their module up)
spec.loader.exec_module(check_dockerfiles)
check = check_dockerfiles.check


def hadolint(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return subprocess.run([exe, "--no-color", str(path)], capture_output=True, text=True)


def test_every_image_has_a_dockerfile():
    assert {p.parent.name for p in DOCKERFILES} == {"ketch", "python", "java", "r"}


def test_the_probe_is_executable():
    # the images copy it with its mode; Docker's HEALTHCHECK and the kubelet exec it
    assert os.access(ROOT / "docker" / "ketch-probe", os.X_OK)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.parent.name)
def test_image_dockerfile_keeps_the_promises(path):
    assert check(path.read_text()) == []
    out = hadolint(path)
    assert out.returncode == 0, out.stdout + out.stderr


GOOD = """ARG BASE=ketch/debian:bookworm
FROM ${BASE} AS build
COPY certs/ /usr/local/share/ca-certificates/
RUN apt-get update && apt-get install -y --no-install-recommends python3 && rm -rf /var/lib/apt/lists/*
FROM ${BASE}
COPY --from=build /opt/ketch /opt/ketch
LABEL org.opencontainers.image.version="1" io.ketch.version="1" \\
      io.ketch.framework="x" io.ketch.framework.version="2"
USER 10001:10001
HEALTHCHECK CMD ["ketch-probe", "ready"]
"""


def test_the_checker_passes_a_good_file():
    assert check(GOOD) == []


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda s: s.replace("USER 10001:10001", "USER root"), "runs as root"),
        (lambda s: s.replace("USER 10001:10001\n", ""), "no USER"),
        (lambda s: s.replace("USER 10001:10001", "USER ketch"), "numeric uid"),
        (lambda s: s.replace('HEALTHCHECK CMD ["ketch-probe", "ready"]', "HEALTHCHECK NONE"), "HEALTHCHECK"),
        (lambda s: s.replace(' io.ketch.framework.version="2"', ""), "io.ketch.framework.version"),
        (
            lambda s: "FROM ${BASE}\n" + s.split("FROM ${BASE}\n")[1].replace("--from=build ", ""),
            "multi-stage",
        ),
        (lambda s: s.replace("COPY --from=build /opt/ketch /opt/ketch", "COPY certs/ /etc/certs/"), "CA"),
        (lambda s: s.replace("--no-install-recommends ", ""), "--no-install-recommends"),
        (lambda s: s.replace(" && rm -rf /var/lib/apt/lists/*", ""), "/var/lib/apt/lists"),
        (lambda s: s.replace("FROM ${BASE}\nCOPY", "FROM python:3.11\nCOPY"), "debootstrap base"),
        (lambda s: s + "RUN pip install numpy\n", "--no-cache-dir"),
    ],
)
def test_the_checker_catches(change, complaint):
    problems = check(change(GOOD))
    assert any(complaint in p for p in problems), problems


def _build_context(tmp_path: Path, *args: str) -> Path:
    out = tmp_path / "ctx"
    result = CliRunner().invoke(
        cli, ["model", "build", *args, "--context-only", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return out / "Dockerfile"


@pytest.mark.parametrize(
    "case",
    ["joblib", "onnx", "python-requirements", "r", "java-folder"],
)
def test_model_build_dockerfiles_keep_the_promises(tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    if case == "joblib":
        Path("m.joblib").write_bytes(b"x")
        args = ["m.joblib", "--name", "m"]
    elif case == "onnx":
        Path("m.onnx").write_bytes(b"x")
        args = ["m.onnx", "--name", "m", "--version", "2"]
    elif case == "python-requirements":
        Path("f.py").write_text("def predict(xs):\n    return xs\n")
        Path("req.txt").write_text("toolz==1.0.0  # pure Python\nscikit-learn>=1.4\n")
        args = ["f.py:predict", "--name", "f", "-r", "req.txt"]
    elif case == "r":
        Path("model.R").write_text("predict_fn <- function(x) x\n")
        args = ["model.R", "--name", "r"]
    else:
        Path("lin").mkdir()
        Path("lin/lin.jar").write_bytes(b"x")
        Path("lin/weights.json").write_text("{}")
        args = ["lin", "--name", "lin", "--java-class", "com.example.Lin"]
    dockerfile = _build_context(tmp_path, *args)
    assert check(dockerfile.read_text(), model=True) == []
    out = hadolint(dockerfile)
    assert out.returncode == 0, out.stdout + out.stderr
