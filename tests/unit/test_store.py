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
