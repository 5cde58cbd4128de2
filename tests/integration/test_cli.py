"""The ``ketch`` CLI against a real broker process (click's CliRunner in this process)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from ketch.cli import main

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ketch_cli(broker_process):
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(
            main, ["--admin", broker_process.admin, "--frontend", broker_process.frontend, *args]
        )
        assert result.exit_code == code, f"ketch {' '.join(args)} -> {result.exit_code}: {result.output}"
        return result.output

    return run


def test_every_command_has_help():
    runner = CliRunner()
    for args in (
        [],
        ["broker"],
        ["broker", "start"],
        ["broker", "status"],
        ["app"],
        ["app", "create"],
        ["model"],
        ["model", "serve"],
        ["model", "run"],
        ["model", "set-version"],
        ["predict"],
        ["stats"],
        ["demo"],
    ):
        result = runner.invoke(main, [*args, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, args


def test_broker_status_exit_codes(broker_process, ketch_cli):
    out = ketch_cli("broker", "status")
    assert "broker up" in out and "frontend" in out
    assert json.loads(ketch_cli("broker", "status", "--json"))["apps"] == 0
    result = CliRunner().invoke(
        main, ["--admin", "tcp://127.0.0.1:1", "broker", "status"], env={"KETCH_ADMIN": ""}
    )
    assert result.exit_code == 3 and "is the broker running" in result.output


def test_app_model_predict_and_stats(broker_process, ketch_cli, start_model):
    ketch_cli(
        "app",
        "create",
        "iris",
        "--input-type",
        "float64",
        "--input-shape",
        "4",
        "--slo-ms",
        "10000",
        "--default",
        "-1",
    )
    ketch_cli("app", "link", "iris", "iris")
    assert "already links" in ketch_cli("app", "link", "iris", "iris", code=1)
    listed = json.loads(ketch_cli("app", "list", "--json"))
    assert listed[0]["name"] == "iris" and listed[0]["models"] == ["iris"] and listed[0]["default"] == -1
    assert "iris" in ketch_cli("app", "list")
    from ketch.admin import Admin

    with Admin(broker_process.admin) as admin:
        start_model("ketch.examples.iris:model", "iris", input_shape="4").wait_ready(admin, timeout_s=60)
    out = json.loads(ketch_cli("predict", "iris", "--input", "[5.1, 3.5, 1.4, 0.2]"))
    assert out["output"] == 0 and out["default"] is False and out["model"] == "iris"
    assert "BAD_INPUT" in ketch_cli("predict", "iris", "--input", "[1, 2]", code=1)
    assert "UNKNOWN_APP" in ketch_cli("predict", "nope", "--input", "[1]", "--dtype", "float64", code=1)
    models = json.loads(ketch_cli("model", "list", "--json"))
    assert models[0]["active_version"] == "1" and models[0]["figures"]["replicas"] == 1
    assert "NOT_FOUND" in ketch_cli("model", "set-version", "iris", "9", "--wait", "0", code=1)
    stats = ketch_cli("stats")
    assert "APP" in stats and "iris" in stats and "MEAN_BATCH" in stats
    assert json.loads(ketch_cli("stats", "--json"))["apps"]["iris"]["queries"] >= 2
    ketch_cli("app", "delete", "iris")
    assert json.loads(ketch_cli("app", "list", "--json")) == []


def test_bad_arguments_are_usage_errors(ketch_cli):
    assert "must be JSON" in ketch_cli(
        "app", "create", "x", "--input-type", "float64", "--default", "nope", code=2
    )
    assert "shape" in ketch_cli(
        "app", "create", "x", "--input-type", "float64", "--input-shape", "a,b", code=2
    )
    assert "INVALID" in ketch_cli("app", "create", "x", "--input-type", "complex", code=1)


def test_policy_feedback_and_show_from_the_shell(broker_process, ketch_cli, start_model):
    ketch_cli("app", "create", "vote", "--input-type", "float64", "--input-shape", "1", "--slo-ms", "10000",
              "--default", '"none"', "--model", "a", "--model", "b")  # fmt: skip
    out = ketch_cli("app", "set-policy", "vote", "exp4", "-o", "eta=0.5")
    assert "policy exp4 over a, b" in out
    assert "KEY=JSON" in ketch_cli("app", "set-policy", "vote", "exp4", "-o", "eta", code=2)
    assert "INVALID" in ketch_cli("app", "set-policy", "vote", "exp4", "-o", "eta=-1", code=1)
    from ketch.admin import Admin

    with Admin(broker_process.admin) as admin:
        start_model("ketch.examples.basic:total", "a").wait_ready(admin)
        start_model("ketch.examples.basic:total", "b").wait_ready(admin)
    pred = json.loads(ketch_cli("predict", "vote", "--input", "[2.5]"))
    assert (
        pred["output"] == 2.5 and sorted(pred["models_answered"]) == ["a", "b"] and pred["confidence"] == 1.0
    )
    # a query id names a query of the same client: this shell's `predict` was another connection
    assert "NOT_FOUND" in ketch_cli(
        "feedback", "vote", "--label", "2.5", "--query-id", str(pred["request_id"]), code=1
    )
    assert "feedback taken" in ketch_cli("feedback", "vote", "--label", "2.5", "--input", "[2.5]")
    assert "feedback taken" in ketch_cli("feedback", "vote", "--label", "2.5", "--input", "[2.5]")
    assert "NOT_FOUND" in ketch_cli("feedback", "vote", "--label", "1", "--input", "[9.5]", code=1)
    shown = json.loads(ketch_cli("app", "show", "vote"))
    assert shown["selection"]["policy"] == "exp4"
    assert shown["selection"]["models"]["a"]["feedback"] == 2


def test_bench_prints_a_table_per_level(broker_process, ketch_cli, start_model, tmp_path):
    ketch_cli("app", "create", "sum", "--input-type", "float64", "--input-shape", "3", "--model", "total",
              "--slo-ms", "10000")  # fmt: skip
    from ketch.admin import Admin

    with Admin(broker_process.admin) as admin:
        start_model("ketch.examples.basic:total", "total").wait_ready(admin)
    out = ketch_cli(
        "bench", "sum", "--concurrency", "1,4", "--rate", "200", "--duration", "0.6", "--input", "[1,2,3]"
    )
    assert "concurrency 1" in out and "concurrency 4" in out and "rate 200" in out and "PRED/S" in out
    inputs = tmp_path / "inputs.jsonl"
    inputs.write_text("[1,2,3]\n[4,5,6]\n")
    rows = json.loads(
        ketch_cli(
            "bench",
            "sum",
            "--concurrency",
            "2",
            "--duration",
            "0.5",
            "--input-file",
            str(inputs),
            "--json",
            "--one-per-message",
        )
    )
    assert rows[0]["lost"] == 0 and rows[0]["ok"] > 0 and rows[0]["errors"] == 0
    assert "one of them" in ketch_cli("bench", "sum", code=2)
