from ketchd.store import StateStore


def test_writes_survive_reopen(tmp_path):
    path = str(tmp_path / "s.db")
    store = StateStore(path)
    store.put("apps", "a", {"name": "a", "slo_ms": 20})
    store.put("apps", "b", {"name": "b"})
    store.put("apps", "a", {"name": "a", "slo_ms": 30})
    store.delete("apps", "b")
    store.put("models", "m", {"name": "m", "active_version": "2"})
    store.close()
    again = StateStore(path)
    assert again.load("apps") == [{"name": "a", "slo_ms": 30}]
    assert again.load("models") == [{"name": "m", "active_version": "2"}]
    again.close()


def test_a_failed_write_is_reported_kept_and_saved_once_the_file_takes_it(tmp_path):
    import sqlite3

    import zmq

    path = str(tmp_path / "s.db")
    ctx = zmq.Context.instance()
    reports = ctx.socket(zmq.PAIR)
    reports.linger = 0
    reports.bind("inproc://test-store-reports")
    store = StateStore(path, ctx, "inproc://test-store-reports")
    try:
        locker = sqlite3.connect(path, timeout=1)
        locker.execute("BEGIN EXCLUSIVE")
        store.put("apps", "a", {"name": "a", "v": 1})
        store.put("apps", "a", {"name": "a", "v": 2})  # the newest document of a row wins
        store.notify(7)
        assert reports.poll(30_000)
        token, reason = reports.recv_multipart()
        assert int.from_bytes(token, "little") == 7 and b"locked" in reason
        assert store.unsaved == 1 and "locked" in store.last_error
        locker.rollback()
        locker.close()
        store.put("apps", "b", {"name": "b"})
        store.notify(8)
        assert reports.poll(30_000)
        assert reports.recv_multipart() == [(8).to_bytes(8, "little")]  # all of it on disk now
        assert store.unsaved == 0 and store.last_error == ""
    finally:
        store.close()
        reports.close()
    again = StateStore(path)
    assert again.load("apps") == [{"name": "a", "v": 2}, {"name": "b"}]
    again.close()
