"""An admin change is acknowledged only once it is on disk, and nothing stale comes back.

The state file is shared with the world: a backup or a person with ``sqlite3`` may hold it
open, or locked, while the broker runs. A reader must not cost the broker its writes; a
lock it cannot wait out must turn the acknowledgement into an error; a deleted app must
take its learned state with it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

import ketch
import pytest
from ketch.local import LocalBroker, wait_for

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


def persisted(admin: ketch.Admin) -> dict[str, Any]:
    """Everything a broker keeps across restarts, as its admin socket shows it."""
    apps = {}
    for doc in admin.list_apps():
        kept = {k: v for k, v in doc.items() if k not in ("figures", "selection")}
        kept["selection"] = doc["selection"]["policy"]
        apps[doc["name"]] = kept
    keys = ("active_version", "history", "versions", "max_batch", "max_queue", "batching", "batch_delay_ms")
    models = {m["name"]: {k: m[k] for k in keys} for m in admin.list_models()}
    return {"apps": apps, "models": models}


def versions(admin: ketch.Admin, model: str) -> list[str]:
    return next((m["versions"] for m in admin.list_models() if m["name"] == model), [])


CHANGES: list[tuple[str, Callable[[ketch.Admin], Any]]] = [
    ("app.create", lambda a: a.create_app("app", input_type="float64", input_shape=[2], slo_ms=40)),
    (
        "app.create with models and a default",
        lambda a: a.create_app(
            "two", input_type="int32", input_shape=[-1], default=[7], models=["a", "b"], cache=False
        ),
    ),
    ("app.configure", lambda a: a.configure_app("app", slo_ms=125, cache=False)),
    ("app.link", lambda a: a.link("app", "vm")),
    ("app.set_policy", lambda a: a.set_policy("two", "exp3", gamma=0.2, seed=4)),
    ("app.unlink", lambda a: a.unlink("two", "b")),
    ("model.configure", lambda a: a.configure_model("a", max_batch=17, batching="fixed")),
    ("model.configure create", lambda a: a.configure_model("new", max_queue=99, create=True)),
    ("model.set_version", lambda a: a.set_version("vm", "2")),
    ("model.rollback", lambda a: a.rollback("vm")),
    ("model.configure create, linked", lambda a: a.configure_model("gone", max_queue=5, create=True)),
    ("app.link to it", lambda a: a.link("two", "gone")),
    ("model.delete --force", lambda a: a.delete_model("gone", force=True)),
    ("app.delete", lambda a: a.delete_app("app")),
]


@pytest.mark.parametrize("reader", [False, True], ids=["alone", "while-a-reader-holds-the-file"])
def test_kill_9_right_after_an_acknowledged_admin_change_loses_nothing(
    tmp_path, thread_broker, replica_threads, reader
):
    """Each admin op is acknowledged, then the broker process gets SIGKILL at once (no
    shutdown, no flush); after a restart on the same file it holds all that was
    acknowledged: the same as a broker that was never killed (``thread_broker``, in memory)
    after the same changes. Also while another process holds a read transaction open on
    the file throughout (a backup): on main that cost acknowledged changes."""
    path = str(tmp_path / "state.db")
    broker = LocalBroker(state_path=path)
    broker.start()
    held = sqlite3.connect(path) if reader else None
    try:
        if held is not None:
            held.execute("BEGIN")
            held.execute("SELECT count(*) FROM apps").fetchone()  # a read transaction, open
        for target in (broker, thread_broker):  # two versions of a model, known to each broker
            with ketch.Admin(target.admin) as admin:
                for version in ("1", "2"):
                    r = replica_threads(
                        lambda xs: [0.0 for _ in xs],
                        backend=target.backend,
                        name="vm",
                        version=version,
                        replica_id=f"vm-{version}",
                    )
                    wait_for(lambda v=version: v in versions(admin, "vm"), 30, f"version {version}")
                    r.stop()
        with ketch.Admin(thread_broker.admin) as reference:
            for what, change in CHANGES:
                with broker.admin_client(timeout_ms=20_000) as admin:
                    change(admin)  # acknowledged ...
                    broker.kill()  # ... and SIGKILL at once
                change(reference)
                broker.restart()
                with broker.admin_client(timeout_ms=20_000) as admin:
                    assert persisted(admin) == persisted(reference), f"lost after {what}"
            final = persisted(reference)
        assert set(final["apps"]) == {"two"} and final["apps"]["two"]["models"] == ["a"]
        assert final["apps"]["two"]["policy"] == "exp3" and final["apps"]["two"]["default"] == [7]
        assert final["models"]["a"]["max_batch"] == 17 and final["models"]["new"]["max_queue"] == 99
        assert final["models"]["vm"]["active_version"] == "1" and "gone" not in final["models"]
    finally:
        if held is not None:
            held.close()
        broker.stop()
        broker._tmp.cleanup()
