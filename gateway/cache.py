"""Where upstream answers are kept: the ``CacheStore`` protocol and its in-memory backend.

A store keeps an entry until its stale retention ends (``stored_at + ttl + stale``); deciding
whether an entry is fresh or stale is ``cache_policy.freshness``, not the store's job.

Large answers are kept gzip-compressed as well (``with_gzip``): the Redis store keeps only the
compressed bytes, and callers that accept gzip get them as they are.
"""

from __future__ import annotations

import dataclasses
import gzip
import zlib
from collections import OrderedDict
from typing import Final, Protocol

from gateway.cache_policy import CacheEntry, campaign_prefix
from gateway.clock import Clock

# Smaller answers gain little; a gzip member costs ~20 bytes of framing.
COMPRESS_MIN_BYTES: Final = 512
# Keep the compressed form only if it saves at least this fraction.
COMPRESS_MAX_RATIO: Final = 0.9


def with_gzip(entry: CacheEntry) -> CacheEntry:
    """``entry`` with its gzip form added when the body is large and compresses well."""
    if entry.gzip is not None or len(entry.body) < COMPRESS_MIN_BYTES:
        return entry
    packed = gzip.compress(entry.body, compresslevel=6, mtime=0)
    if len(packed) > len(entry.body) * COMPRESS_MAX_RATIO:
        return entry
    return dataclasses.replace(entry, gzip=packed)


def gunzip(data: bytes, limit: int) -> bytes | None:
    """The bytes one gzip member ``data`` holds, or None if it is broken, is followed by
    anything, or holds more than ``limit`` bytes (a crafted value never inflates unbounded)."""
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        body = inflater.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(body) > limit or not inflater.eof or inflater.unused_data or inflater.unconsumed_tail:
        return None
    return body


class CacheStore(Protocol):
    async def get(self, key: str) -> CacheEntry | None:
        """The stored entry, fresh or stale, or None."""
        ...

    async def put(self, key: str, entry: CacheEntry) -> None: ...

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        """Remove every entry of one campaign; returns how many were removed."""
        ...

    async def close(self) -> None:
        """Stop background work (at shutdown); the entries stay where they are."""
        ...


class InMemoryCacheStore:
    """A bounded LRU for the single-instance mode; entries leave at the end of stale retention.

    Large entries are kept with their gzip form too, so gzip callers get it as in Redis mode.
    """

    def __init__(self, *, max_entries: int, clock: Clock) -> None:
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._max_entries = max_entries
        self._clock = clock

    async def get(self, key: str) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock.time() >= entry.stored_at + entry.ttl + entry.stale:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: CacheEntry) -> None:
        self._entries[key] = with_gzip(entry)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        prefix = campaign_prefix(vdn_id, campaign_id)
        doomed = [key for key in self._entries if key.startswith(prefix)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    async def close(self) -> None:
        """Nothing runs in the background."""

    def __len__(self) -> int:
        return len(self._entries)
