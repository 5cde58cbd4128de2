"""An admin change is acknowledged only once it is on disk, and nothing stale comes back.

The state file is shared with the world: a backup or a person with ``sqlite3`` may hold it
open, or locked, while the broker runs. A reader must not cost the broker its writes; a
lock it cannot wait out must turn the acknowledgement into an error; a deleted app must
take its learned state with it.
"""

from __future__ import annotations

import json
import sqlite3

import ketch
import pytest
from ketch.local import wait_for

pytestmark = pytest.mark.timeout(120)


def on_disk(path: str, table: str = "apps") -> dict[str, dict]:
    """What another process reading the file sees now."""
    with sqlite3.connect(path, timeout=10) as db:
        return {name: json.loads(doc) for name, doc in db.execute(f"SELECT name, doc FROM {table}")}


def test_a_reader_holding_the_file_does_not_cost_an_admin_change_its_write(make_thread_broker, tmp_path):
    path = str(tmp_path / "state.db")
    tb = make_thread_broker(state_path=path)
    with ketch.Admin(tb.admin, timeout_ms=20_000) as admin:
        admin.create_app("first", input_type="float64")
        reader = sqlite3.connect(path)
        try:
            reader.execute("BEGIN")
            assert "first" in {
                n for (n,) in reader.execute("SELECT name FROM apps")
            }  # a read transaction, open
            doc = admin.create_app("second", input_type="int64", input_shape=[3], slo_ms=50)
            assert doc["name"] == "second"
            # acknowledged: so on disk, for anyone who reads the file now
            assert on_disk(path)["second"]["input_shape"] == [3]
            admin.configure_app("second", slo_ms=75)
            assert on_disk(path)["second"]["slo_ms"] == 75
        finally:
            reader.close()
        assert admin.status()["state_unsaved"] == 0


def test_a_change_the_file_refuses_is_an_error_not_an_acknowledgement(make_thread_broker, tmp_path):
    path = str(tmp_path / "state.db")
    tb = make_thread_broker(state_path=path)
    with ketch.Admin(tb.admin, timeout_ms=20_000) as admin:
        admin.create_app("before", input_type="float64")
        locker = sqlite3.connect(path, timeout=1)
        locker.execute("BEGIN EXCLUSIVE")  # another process writing, for longer than the broker waits
        try:
            with pytest.raises(ketch.KetchError, match="not saved") as info:
                admin.create_app("locked-out", input_type="float64")
            assert info.value.code_name == "INTERNAL" and "locked" in info.value.message
            status = admin.status()
            assert status["state_unsaved"] >= 1 and "locked" in status["state_error"]
            assert admin.status()["apps"] == 2  # in effect in this broker, as the error says
        finally:
            locker.rollback()
            locker.close()
        wait_for(lambda: admin.status()["state_unsaved"] == 0, 30, "the broker to save the change")
        assert "locked-out" in on_disk(path)
        admin.create_app("after", input_type="float64")  # acknowledged again, at once
    tb.stop()
    again = make_thread_broker(state_path=path)
    with ketch.Admin(again.admin) as admin:
        assert {a["name"] for a in admin.list_apps()} == {"before", "locked-out", "after"}


def test_a_recreated_app_does_not_come_back_with_the_deleted_ones_policy(make_thread_broker, tmp_path):
    path = str(tmp_path / "state.db")
    tb = make_thread_broker(state_path=path)
    with ketch.Admin(tb.admin) as admin:
        admin.create_app("app", input_type="float64", input_shape=[1], models=["a", "b"])
        admin.set_policy("app", "exp3", gamma=0.3, seed=9)
        admin.delete_app("app")
        assert "app" not in on_disk(path, "policies")
        admin.create_app("app", input_type="float64", input_shape=[1], models=["a", "b"])
        assert admin.show_app("app")["selection"]["policy"] == "single"
    tb.stop()
    again = make_thread_broker(state_path=path)
    with ketch.Admin(again.admin) as admin:
        shown = admin.show_app("app")
        assert shown["policy"] == "single" and shown["selection"]["policy"] == "single", shown["selection"]


def test_an_app_created_over_stale_learned_state_starts_afresh(make_thread_broker, tmp_path):
    # a state file from before deletes took the learned state along: the row is still there
    path = str(tmp_path / "state.db")
    tb = make_thread_broker(state_path=path)
    with ketch.Admin(tb.admin) as admin:
        admin.create_app("app", input_type="float64", input_shape=[1], models=["a", "b"])
        admin.set_policy("app", "exp3", gamma=0.3, seed=9)
    tb.stop()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM apps WHERE name = 'app'")
    again = make_thread_broker(state_path=path)
    with ketch.Admin(again.admin) as admin:
        admin.create_app("app", input_type="float64", input_shape=[1], models=["a", "b"])
    again.stop()
    third = make_thread_broker(state_path=path)
    with ketch.Admin(third.admin) as admin:
        assert admin.show_app("app")["selection"]["policy"] == "single"
