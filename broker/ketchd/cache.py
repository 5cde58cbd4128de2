"""The prediction cache: exact, bounded by bytes, LRU, optional TTL.

Pure code (no sockets). A key is (model, version, dtype, shape, 128-bit digest of the
input bytes); entries also keep the input bytes, and a hit requires them to be equal, so
a digest collision can cost a miss but never returns another input's prediction (Clipper
trusted a 64-bit hash alone). Inputs whose digests collide share a bucket.

Eviction is least-recently-used over the whole cache, by bytes (input + output + a fixed
overhead per entry). Only answers from a model are stored: errors and defaults never
are. Pending computations are not entries (single-flight lives in the broker, which
holds the queries), so nothing pending can be evicted.

Each entry names its *producer* (the replica connection that computed it): an answer never
outlives the replica that vouched for it (``purge``, called when a replica leaves or is
refused), so a replica that lied leaves no lies behind. The key's version carries the
fingerprint the replica announced (``version_key``): code changed under the same version
never answers from the old code's entries.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import xxhash

# bytes charged per entry beyond its input and output: the key tuple, the Entry record, two
# bytes objects, the bucket list, the dict slot (measured with tracemalloc: ~400) and its slot
# in its producer's table
ENTRY_OVERHEAD = 480

Key = tuple[str, str, int, tuple[int, ...], bytes]


def digest128(data: Any) -> bytes:
    return xxhash.xxh3_128_digest(data)


def version_key(version: str, fingerprint: str) -> str:
    """The key's version: the version name and the fingerprint of what its replicas serve."""
    return f"{version}\x00{fingerprint}" if fingerprint else version


@dataclass(eq=False)
class Entry:
    key: Key
    input: bytes
    dtype: int
    shape: tuple[int, ...]
    output: bytes
    expires: float  # monotonic seconds; inf for no TTL
    producer: bytes = b""  # the replica connection that computed it

    @property
    def size(self) -> int:
        return len(self.input) + len(self.output) + ENTRY_OVERHEAD


@dataclass
class CacheFigures:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0  # queries that waited on an identical computation instead of computing
    inserts: int = 0
    evictions: int = 0
    expired: int = 0
    purged: int = 0  # dropped with the replica that computed them

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class PredictionCache:
    max_bytes: int = 256 * 1024 * 1024
    ttl_s: float = 0.0  # 0: entries do not expire
    digest: Callable[[Any], bytes] = digest128
    clock: Callable[[], float] = time.monotonic
    figures: CacheFigures = field(default_factory=CacheFigures)
    bytes_used: int = 0
    # LRU order over buckets: key -> entries whose digest is that key's
    _buckets: OrderedDict[Key, list[Entry]] = field(default_factory=OrderedDict)
    _by_producer: dict[bytes, dict[Entry, None]] = field(default_factory=dict)

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def key(self, model: str, version: str, dtype: int, shape: tuple[int, ...], data: Any) -> Key:
        return (model, version, dtype, shape, self.digest(data))

    def get(self, key: Key, data: Any) -> Entry | None:
        """The entry for exactly these input bytes, or None (counted as hit or miss)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            for entry in bucket:
                if entry.input == data:
                    if entry.expires <= self.clock():
                        self._remove(entry)
                        self.figures.expired += 1
                        break
                    self._buckets.move_to_end(key)
                    self.figures.hits += 1
                    return entry
        self.figures.misses += 1
        return None

    def put(
        self, key: Key, data: Any, dtype: int, shape: tuple[int, ...], output: Any, producer: bytes = b""
    ) -> Entry | None:
        """Store an answer computed by ``producer``; returns the entry, or None when it is
        larger than the whole cache."""
        entry = Entry(
            key,
            bytes(data),
            dtype,
            tuple(shape),
            bytes(output),
            self.clock() + self.ttl_s if self.ttl_s > 0 else float("inf"),
            producer,
        )
        if entry.size > self.max_bytes:
            return None
        bucket = self._buckets.setdefault(key, [])
        for old in bucket:
            if old.input == entry.input:
                self._remove(old)
                bucket = self._buckets.setdefault(key, [])
                break
        bucket.append(entry)
        self._buckets.move_to_end(key)
        self.bytes_used += entry.size
        mine = self._by_producer.get(producer)
        if mine is None:
            mine = self._by_producer[producer] = {}
        mine[entry] = None
        self.figures.inserts += 1
        while self.bytes_used > self.max_bytes:
            _, oldest = next(iter(self._buckets.items()))
            self._remove(oldest[0])
            self.figures.evictions += 1
        return entry

    def _remove(self, entry: Entry) -> None:
        bucket = self._buckets.get(entry.key)
        if bucket is None or entry not in bucket:
            return
        bucket.remove(entry)
        if not bucket:
            del self._buckets[entry.key]
        self.bytes_used -= entry.size
        mine = self._by_producer.get(entry.producer)
        if mine is not None:
            mine.pop(entry, None)
            if not mine:
                del self._by_producer[entry.producer]

    def purge(self, producer: bytes) -> int:
        """Drop every entry ``producer`` computed; returns how many."""
        mine = self._by_producer.pop(producer, None)
        if not mine:
            return 0
        for entry in list(mine):
            self._remove(entry)
        self.figures.purged += len(mine)
        return len(mine)

    def clear(self) -> None:
        self._buckets.clear()
        self._by_producer.clear()
        self.bytes_used = 0
