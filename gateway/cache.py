"""Where upstream answers are kept: the ``CacheStore`` protocol and its in-memory backend.

A store keeps an entry until its stale retention ends (``stored_at + ttl + stale``); deciding
whether an entry is fresh or stale is ``cache_policy.freshness``, not the store's job.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

from gateway.cache_policy import CacheEntry, campaign_prefix
from gateway.clock import Clock


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
    """A bounded LRU for the single-instance mode; entries leave at the end of stale retention."""

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
        self._entries[key] = entry
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
