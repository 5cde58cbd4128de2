"""The pure parts of the first-use tools: input conversion (``ketch.inputs``), model sources
(``ketch.loading``), deployment files and repositories (``ketch.deploy``), bench's unique
inputs, and what a failing model's client is told (``ketch.runtime``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ketch import deploy, loading
from ketch.bench import varied_inputs
from ketch.inputs import cast_lossless, to_input
from ketch.runtime import PER_ITEM_HINT, OutputsNotAList, as_outputs, model_failure_text
from ketch.serve import curl_line, example_input


@pytest.mark.parametrize(
    ("value", "input_type", "expected"),
    [([1, 2, 3], "float64", [1.0, 2.0, 3.0]), ([1.0, 2.0], "int64", [1, 2]), ([0, 1], "bool", [False, True]),
     ([0.1], "float32", [np.float32(0.1)]), ([255], "uint8", [255])],
)  # fmt: skip
def test_values_convert_when_nothing_changes(value, input_type, expected):
    out = to_input(value, input_type)
    assert out.dtype == np.dtype(input_type) and out.tolist() == list(expected)


@pytest.mark.parametrize(
    ("value", "input_type", "words"),
    [([1.5], "int64", "1.5 is not a whole number"), ([300], "uint8", r"do not fit uint8 \(0\.\.255\)"),
     ([2**53 + 1], "float64", "would change"), (["a", 1], "float64", "holds text"),
     ("x", "float64", "is text"), ([[1, 2], [3]], "float64", "rectangular"), ([2], "bool", "true/false"),
     ([float("nan")], "int32", "NaN"), ([1], "string", "JSON string")],
)  # fmt: skip
def test_values_that_would_change_are_refused_in_words(value, input_type, words):
    with pytest.raises(ValueError, match=words) as info:
        to_input(value, input_type)
    assert "dtype" not in str(info.value) and "<U" not in str(info.value)  # no numpy jargon


def test_binary_inputs_widen_losslessly_only():
    assert cast_lossless(np.float32([1.5, 2]), "float64").dtype == np.float64
    assert cast_lossless(np.int32([7]), "float64").tolist() == [7.0]
    assert cast_lossless(np.float64([3.0]), "int64").tolist() == [3]
    with pytest.raises(ValueError, match="would change"):
        cast_lossless(np.int64([2**53 + 1]), "float64")
    with pytest.raises(ValueError, match="too large"):
        cast_lossless(np.float64([1e300]), "float32")
    # a whole float past 2**53 (2**24 for float32) may be an integer rounded on its way (a
    # gateway holding an int64 app's old float64 type): not taken for an integer app
    with pytest.raises(ValueError, match="send integers"):
        cast_lossless(np.float64([2.0**62, -3]), "int64")
    with pytest.raises(ValueError, match="send integers"):
        cast_lossless(np.float32([2.0**25]), "int64")
    assert cast_lossless(np.float64([2.0**53]), "int64").tolist() == [2**53]


def test_bench_inputs_are_unique_and_barely_changed():
    make, how = varied_inputs([np.array([5.1, 3.5, 1.4, 0.2]), np.array([6.7, 3.0, 5.2, 2.3])])
    xs = [make(k) for k in range(20_000)]
    assert len({x.tobytes() for x in xs}) == 20_000 and "unique" in how
    assert max(float(np.abs(x - xs[k % 2]).max()) for k, x in enumerate(xs)) < 1e-9
    make, how = varied_inputs([np.array([1, 2], dtype=np.int64)])
    assert make(0) is make(5) and "repeated" in how


def test_a_failing_model_is_described_with_its_place_and_a_hint():
    def predict(x):  # a function of one input, given the batch
        return float(np.asarray(x) @ np.ones(4))

    try:
        predict([np.ones(4), np.ones(4)])
    except Exception as exc:
        text = model_failure_text(exc)
    assert text.startswith("TypeError: ") and "test_first_use.py:" in text and text.endswith(PER_ITEM_HINT)
    assert model_failure_text(KeyError("x")) == "KeyError: 'x'"
    assert as_outputs(np.arange(3), 3) == [0, 1, 2]
    with pytest.raises(OutputsNotAList, match=r"returned float .* returns a list of outputs"):
        as_outputs(1.5, 3)


def test_sources_resolve_or_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.pkl").write_bytes(b"x")
    assert loading.resolve("m.pkl").kind == "sklearn" and loading.resolve("m.pkl").is_pickle
    with pytest.raises(loading.BadSource, match="is a model file, not Python code: name the file alone"):
        loading.resolve("m.pkl:model")
    with pytest.raises(loading.BadSource, match="name the function or object in it too"):
        loading.resolve("code.py")
    with pytest.raises(loading.BadSource, match="no such file or folder"):
        loading.resolve("nope.bin")
    with pytest.raises(loading.BadSource, match="no Python module named 'nosuchmod'"):
        loading.load_target("nosuchmod:predict")
    folder = tmp_path / "iris"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x")
    (folder / "model.toml").write_text('name = "flowers"\nversion = 3\ninput_shape = [4]\n')
    found = loading.resolve(str(folder))
    assert (found.kind, found.default_name, found.settings["version"]) == ("onnx", "flowers", "3")
    (folder / "model.toml").write_text("replicaz = 2\n")
    with pytest.raises(loading.BadSource, match="unknown key 'replicaz'"):
        loading.resolve(str(folder))


def test_examples_fit_the_app():
    assert example_input("float64", [3]) == [0.0, 0.0, 0.0]
    assert example_input("int64", [-1, 2]) == [[0, 0]] * 3
    assert example_input("string", []) == "hello"
    line = curl_line("http://h:1", "a", [0.0])
    assert line == """curl -s -XPOST http://h:1/a/predict -d '{"input": [0.0]}'"""


DEPLOYMENT = """
[defaults]
replicas = 2
slo_ms = 50

[[models]]
name = "iris"
version = 1
source = "ketch.examples.iris:model"
image = "python-sklearn"
input_shape = [4]

[[models]]
name = "iris"
version = "2"
source = "ketch.examples.iris:model"
image = "registry.example.com/iris:2"
active = true
replicas = 3

[[models]]
name = "summer"
source = "summer.py:predict"
max_batch = 16

[[apps]]
name = "flowers"
models = ["iris"]
default = -1
policy = "single"
"""


def test_a_deployment_file_is_checked_and_completed(tmp_path):
    (tmp_path / "summer.py").write_text("def predict(xs):\n    return [float(x.sum()) for x in xs]\n")
    path = tmp_path / "ketch.toml"
    path.write_text(DEPLOYMENT)
    d = deploy.load(path)
    assert [(m["name"], m["version"], m["replicas"]) for m in d["models"]] == [
        ("iris", "1", 2), ("iris", "2", 3), ("summer", "1", 2)
    ]  # fmt: skip
    assert d["models"][2]["path"] == str(tmp_path / "summer.py") + ":predict"
    apps = {a["name"]: a for a in d["apps"]}
    assert apps["flowers"]["slo_ms"] == 50 and apps["summer"]["models"] == ["summer"]  # an app per model
    for bad, words in [("[[models]]\nname = 'x'\n", "needs a source"), ("oops = 1\n", "unknown top-level"),
                       ("[[apps]]\nname = 'a'\nmodels = ['ghost']\n[[models]]\nname='m'\nsource='x:y'\n",
                        "no model entry serves")]:  # fmt: skip
        path.write_text(bad)
        with pytest.raises(deploy.BadDeployment, match=words):
            deploy.load(path)
    path.write_text("{not toml")
    with pytest.raises(deploy.BadDeployment, match="not valid TOML"):
        deploy.load(path)
    yaml_path = tmp_path / "ketch.yaml"
    yaml_path.write_text("models:\n  - {name: s, source: summer.py:predict}\n")
    assert deploy.load(yaml_path)["apps"] == [{"name": "s", "models": ["s"]}]


def test_a_model_repository_is_a_deployment(tmp_path):
    for version in ("1", "2"):
        (tmp_path / "lin" / version).mkdir(parents=True)
        (tmp_path / "lin" / version / "model.onnx").write_bytes(b"x")
    (tmp_path / "sum").mkdir()
    (tmp_path / "sum" / "model.py").write_text("def predict(xs):\n    return xs\n")
    (tmp_path / "sum" / "model.toml").write_text("replicas = 2\n")
    (tmp_path / "ketch.toml").write_text("[defaults]\nslo_ms = 30\n")
    d = deploy.load(tmp_path)
    got = [(m["name"], m["version"], m.get("replicas"), m.get("active")) for m in d["models"]]
    assert got == [("lin", "1", None, None), ("lin", "2", None, True), ("sum", "1", 2, None)]
    assert {a["name"]: a["slo_ms"] for a in d["apps"]} == {"lin": 30, "sum": 30}


def test_helm_values_follow_the_documented_mapping(tmp_path):
    (tmp_path / "summer.py").write_text("def predict(xs):\n    return xs\n")
    path = tmp_path / "ketch.toml"
    volume = '{persistentVolumeClaim = {claimName = "models"}}'
    path.write_text(DEPLOYMENT + f"\n[helm]\nmodels_volume = {volume}\n")
    values, warnings = deploy.render_values(
        deploy.load(path), {"iris": ("float64", [4]), "summer": ("float64", [-1])}
    )
    assert warnings == []
    assert values["modelDefaults"] == {"replicas": 2}
    iris1, iris2, summer = values["models"]
    assert iris1 == {"name": "iris", "version": "1", "image": "python-sklearn", "inputType": "float64",
                     "model": "ketch.examples.iris:model", "inputShape": "4"}  # fmt: skip
    assert iris2["image"] == "registry.example.com/iris:2" and "model" not in iris2 and iris2["replicas"] == 3
    assert summer["model"] == "/models/summer.py:predict" and summer["volume"] == {
        "persistentVolumeClaim": {"claimName": "models"}
    }
    flowers = next(a for a in values["apps"] if a["name"] == "flowers")
    assert flowers == {"slo_ms": 50, "name": "flowers", "models": ["iris"], "default": -1, "policy": "single",
                       "input_type": "float64", "input_shape": [4]}  # fmt: skip
    json.dumps(values)  # plain data
