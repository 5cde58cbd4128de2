"""``ketch app apply``: a file of apps applied to a real broker creates, updates in place,
changes nothing when run again, and refuses what cannot change in place."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from ketch import errors
from ketch.admin import Admin
from ketch.apply import apply_app
from ketch.cli import main as cli

IRIS = {"name": "iris", "input_type": "float64", "input_shape": [4], "slo_ms": 50, "default": -1,
        "models": ["a"], "policy": "single"}  # fmt: skip


def apply_file(tmp_path, admin_address, apps, *extra):
    path = tmp_path / "apps.json"
    path.write_text(json.dumps({"apps": apps}))
    return CliRunner().invoke(cli, ["--admin", admin_address, "app", "apply", str(path), *extra])


def said(result) -> str:
    """What apply printed (the broker thread of the test logs into the same output)."""
    return "\n".join(line for line in result.output.splitlines() if line.startswith("app "))


def test_create_then_nothing_then_update(thread_broker, tmp_path):
    first = apply_file(tmp_path, thread_broker.admin, [IRIS])
    assert first.exit_code == 0, first.output
    assert said(first) == "app iris: created"
    again = apply_file(tmp_path, thread_broker.admin, [IRIS])
    assert said(again) == "app iris: unchanged"
    changed = {**IRIS, "slo_ms": 80, "cache": False, "models": ["b", "c"], "policy": "exp4",
               "policy_options": {"eta": 0.3}}  # fmt: skip
    third = apply_file(tmp_path, thread_broker.admin, [changed])
    assert third.exit_code == 0, third.output
    assert said(third) == "app iris: configured, linked b, linked c, unlinked a, policy exp4"
    with Admin(thread_broker.admin) as admin:
        app = admin.show_app("iris")
    assert (app["slo_ms"], app["cache"], app["models"], app["policy"]) == (80, False, ["b", "c"], "exp4")
    assert app["policy_options"]["eta"] == 0.3
    assert said(apply_file(tmp_path, thread_broker.admin, [changed])) == "app iris: unchanged"


@pytest.mark.parametrize(
    ("key", "value"), [("input_type", "float32"), ("input_shape", [3]), ("default", 0), ("finite_only", True)]
)
def test_what_cannot_change_in_place_is_refused(thread_broker, key, value):
    with Admin(thread_broker.admin) as admin:
        apply_app(admin, IRIS)
        with pytest.raises(errors.Conflict, match=key):
            apply_app(admin, {**IRIS, key: value})
        assert admin.show_app("iris")[key] == IRIS.get(key, False)


def test_bad_files_are_usage_errors(thread_broker, tmp_path):
    bad = apply_file(tmp_path, thread_broker.admin, [{"name": "x"}])
    assert bad.exit_code == 2 and "input_type" in bad.output
    typo = apply_file(tmp_path, thread_broker.admin, [{**IRIS, "slo": 3}])
    assert typo.exit_code == 2 and "unknown keys: slo" in typo.output
    refused = apply_file(tmp_path, thread_broker.admin, [{**IRIS, "input_type": "complex"}])
    assert refused.exit_code == 1 and "INVALID" in refused.output


def test_no_broker_is_exit_3_after_the_wait(tmp_path):
    result = apply_file(tmp_path, "tcp://127.0.0.1:9", [IRIS], "--wait", "0.5")
    assert result.exit_code == 3
    assert "is the broker running" in result.output
