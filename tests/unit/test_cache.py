"""The prediction cache on its own: exactness, bounds, eviction, TTL, versions."""

from ketchd.cache import ENTRY_OVERHEAD, PredictionCache, version_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_hit_requires_equal_input_bytes_even_when_digests_collide():
    cache = PredictionCache(digest=lambda data: b"same-digest-for-everything")
    ka = cache.key("m", "1", 11, (2,), b"input-a")
    kb = cache.key("m", "1", 11, (2,), b"input-b")
    assert ka == kb  # a forced collision
    cache.put(ka, b"input-a", 14, (), b'"A"')
    assert cache.get(kb, b"input-b") is None  # never another input's prediction
    cache.put(kb, b"input-b", 14, (), b'"B"')
    assert cache.get(ka, b"input-a").output == b'"A"'
    assert cache.get(kb, b"input-b").output == b'"B"'
    assert len(cache) == 2


def test_versions_and_shapes_are_part_of_the_key():
    cache = PredictionCache()
    data = b"\x00" * 16
    cache.put(cache.key("m", "1", 11, (2,), data), data, 14, (), b"1")
    assert cache.get(cache.key("m", "2", 11, (2,), data), data) is None
    assert cache.get(cache.key("m", "1", 11, (1, 2), data), data) is None
    assert cache.get(cache.key("other", "1", 11, (2,), data), data) is None
    assert cache.get(cache.key("m", "1", 11, (2,), data), data).output == b"1"


def test_bounded_by_bytes_with_least_recently_used_eviction():
    size = 10 + 10 + ENTRY_OVERHEAD
    cache = PredictionCache(max_bytes=3 * size)
    keys = []
    for i in range(3):
        data = f"input-{i:04d}".encode()[:10].ljust(10, b".")
        keys.append((cache.key("m", "1", 12, (), data), data))
        cache.put(keys[-1][0], data, 12, (), b"o" * 10)
    assert cache.bytes_used == 3 * size
    cache.get(*keys[0])  # 0 is now the most recent: 1 is the oldest
    data = b"input-new."
    cache.put(cache.key("m", "1", 12, (), data), data, 12, (), b"o" * 10)
    assert cache.bytes_used <= cache.max_bytes
    assert cache.get(*keys[1]) is None
    assert cache.get(*keys[0]) is not None and cache.get(*keys[2]) is not None
    assert cache.figures.evictions == 1


def test_an_entry_larger_than_the_cache_is_not_stored():
    cache = PredictionCache(max_bytes=100)
    key = cache.key("m", "1", 12, (), b"x")
    assert cache.put(key, b"x", 12, (), b"y" * 1000) is None
    assert cache.bytes_used == 0


def test_ttl_expires_entries():
    clock = Clock()
    cache = PredictionCache(ttl_s=10, clock=clock)
    key = cache.key("m", "1", 12, (), b"x")
    cache.put(key, b"x", 12, (), b"y")
    clock.now = 9.9
    assert cache.get(key, b"x") is not None
    clock.now = 10.1
    assert cache.get(key, b"x") is None
    assert cache.figures.expired == 1 and cache.bytes_used == 0


def test_putting_the_same_input_again_replaces_it():
    cache = PredictionCache()
    key = cache.key("m", "1", 12, (), b"x")
    cache.put(key, b"x", 12, (), b"old")
    cache.put(key, b"x", 12, (), b"new")
    assert len(cache) == 1 and cache.get(key, b"x").output == b"new"
    assert cache.bytes_used == 1 + 3 + ENTRY_OVERHEAD


def test_an_answer_leaves_with_the_replica_that_computed_it():
    cache = PredictionCache()
    for i in range(3):
        data = bytes([i]) * 8
        cache.put(
            cache.key("m", "1", 11, (1,), data), data, 14, (), b"x", producer=b"liar" if i else b"honest"
        )
    assert cache.purge(b"liar") == 2 and cache.figures.purged == 2
    assert len(cache) == 1 and cache.bytes_used == 8 + 1 + ENTRY_OVERHEAD
    data = bytes([0]) * 8
    assert cache.get(cache.key("m", "1", 11, (1,), data), data).producer == b"honest"
    assert cache.purge(b"nobody") == 0
    cache.put(cache.key("m", "1", 11, (1,), data), data, 14, (), b"y", producer=b"other")  # replaced
    assert cache.purge(b"honest") == 0 and cache.purge(b"other") == 1 and cache.bytes_used == 0


def test_the_fingerprint_is_part_of_the_version_key():
    cache = PredictionCache()
    data = b"\x01" * 8
    cache.put(cache.key("m", version_key("1", "build:a"), 11, (1,), data), data, 14, (), b"old code")
    assert cache.get(cache.key("m", version_key("1", "build:b"), 11, (1,), data), data) is None
    assert cache.get(cache.key("m", version_key("1", ""), 11, (1,), data), data) is None
    assert version_key("1", "") == "1"  # no fingerprint: the version alone, as before
