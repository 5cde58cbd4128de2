"""``ketch model build``'s plan: the base image, the files and the environment of a model's
image for each kind of source, and clear refusals; the build context it writes."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from ketch.build import plan
from ketch.cli import main as cli


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_a_joblib_file_starts_from_the_sklearn_image():
    Path("iris.joblib").write_bytes(b"x")
    p = plan("iris.joblib", name="iris", version="3", input_shape="4", output="predict_proba")
    assert p.framework == "sklearn"
    assert p.base_image == "ketch/python-sklearn:0.1.0"
    assert p.env == {
        "KETCH_MODEL": "/opt/model/iris.joblib",
        "KETCH_MODEL_NAME": "iris",
        "KETCH_MODEL_VERSION": "3",
        "KETCH_INPUT_SHAPE": "4",
        "KETCH_OUTPUT": "predict_proba",
    }
    assert "FROM ketch/python-sklearn:0.1.0" in p.dockerfile()
    assert "AS deps" not in p.dockerfile()  # no requirements: no pip stage


@pytest.mark.parametrize(
    ("source", "framework", "image"),
    [("m.onnx", "onnx", "python-onnx"), ("m.pt", "torch", "python-torch"), ("model.R", "r", "r")],
)
def test_the_suffix_picks_the_image(source, framework, image):
    Path(source).write_bytes(b"x")
    p = plan(source, name="m", image_prefix="registry.example.com/ketch/", base_version="9.9")
    assert (p.framework, p.base_image) == (framework, f"registry.example.com/ketch/{image}:9.9")


def test_python_code_with_requirements_picks_the_framework_they_name():
    Path("f.py").write_text("def predict(xs):\n    return xs\n")
    assert plan("f.py:predict", name="f").base_image == "ketch/python:0.1.0"
    p = plan("f.py:predict", name="f", requirements=["scikit-learn>=1.4", "toolz"])
    assert p.framework == "sklearn"
    assert p.env["KETCH_MODEL"] == "/opt/model/f.py:predict"
    text = p.dockerfile()
    assert "pip install --no-cache-dir" in text and "--prefix /tmp/prefix" in text
    assert "COPY --from=deps /tmp/site-packages /opt/model/site-packages" in text
    assert "PYTHONPATH=/opt/model/site-packages:/opt/model" in text


def test_a_local_module_is_copied(tmp_path):
    Path("mypkg").mkdir()
    Path("mypkg/__init__.py").write_text("def predict(xs):\n    return xs\n")
    p = plan("mypkg:predict", name="m")
    assert [(src.resolve(), dest) for src, dest in p.files] == [((tmp_path / "mypkg").resolve(), "mypkg")]
    assert p.env["KETCH_MODEL"] == "mypkg:predict"


def test_an_installed_module_is_not_local_code():
    with pytest.raises(click.BadParameter, match=r"not local code|not a module of the current folder"):
        plan("numpy:sum", name="m")


def test_a_java_folder_puts_its_jars_on_the_class_path():
    Path("lin").mkdir()
    Path("lin/lin.jar").write_bytes(b"x")
    Path("lin/weights.json").write_text("{}")
    p = plan("lin", name="lin", java_class="com.example.Lin")
    assert p.base_image == "ketch/java:0.1.0"
    assert p.env["KETCH_MODEL_CLASS"] == "com.example.Lin"
    assert p.env["KETCH_MODEL_CLASSPATH"] == "/opt/model/lin/*"
    assert p.env["KETCH_MODEL"] == "/opt/model/lin"


@pytest.mark.parametrize(
    ("setup", "kwargs", "message"),
    [
        (lambda: Path("a.jar").write_bytes(b"x"), {"source": "a.jar"}, "--java-class"),
        (lambda: Path("m.R").write_text("x"), {"source": "m.R", "requirements": ["toolz"]}, "Python models"),
        (lambda: Path("m.onnx").write_bytes(b"x"), {"source": "m.onnx", "framework": "java"}, "not java"),
        (lambda: None, {"source": "missing.joblib"}, "no such file"),
        (lambda: Path("m.txt").write_text("x"), {"source": "m.txt"}, "framework"),
        (
            lambda: (
                Path("two").mkdir(),
                Path("two/a.onnx").write_bytes(b"x"),
                Path("two/b.onnx").write_bytes(b"x"),
            ),
            {"source": "two"},
            "exactly one model file",
        ),
        (
            lambda: Path("m.onnx").write_bytes(b"x"),
            {"source": "m.onnx", "extra_files": ["nope"]},
            "no such file",
        ),
    ],
)
def test_refusals_say_why(setup, kwargs, message):
    setup()
    with pytest.raises(click.BadParameter, match=message):
        plan(name="m", **kwargs)


def test_context_only_writes_a_buildable_context(tmp_path):
    Path("f.py").write_text("def predict(xs):\n    return xs\n")
    Path("req.txt").write_text("# deps\ntoolz==1.0.0  # pure Python\n")
    Path("certs").mkdir()
    Path("certs/proxy.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    result = CliRunner().invoke(
        cli,
        ["model", "build", "f.py:predict", "--name", "f", "-r", "req.txt", "--ca-certs", "certs",
         "--file", "req.txt", "--context-only", "ctx"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ctx = tmp_path / "ctx"
    assert (ctx / "model" / "f.py").exists() and (ctx / "model" / "req.txt").exists()
    assert (ctx / ".ketch-build" / "requirements.txt").read_text() == "toolz==1.0.0\n"
    assert [p.name for p in (ctx / ".ketch-build" / "certs").iterdir()] == ["00-proxy.crt"]
    assert "docker build --network host -t ketch-model/f:1 ctx" in result.output


def test_requirements_may_not_name_local_paths():
    Path("f.py").write_text("def predict(xs):\n    return xs\n")
    Path("req.txt").write_text("-e ./mylib\n")
    result = CliRunner().invoke(cli, ["model", "build", "f.py:predict", "--name", "f", "-r", "req.txt"])
    assert result.exit_code == 2
    assert "only package requirements" in result.output
