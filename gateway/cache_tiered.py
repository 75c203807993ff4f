"""An in-process copy of hot cache entries in front of the shared (Redis) store.

Why: a cache hit through redis-py costs a replica about 0.1 ms of CPU, more than the rest of
the hit path together (see README "Performance"). ``TieredCacheStore`` keeps recently read
entries in an LRU bounded in bytes (``cache.local_max_bytes``) and answers repeated hits
without a Redis round trip, so a hot set of tens of thousands of answers stays local.

Coherence with the shared store, which other replicas write too:

- Every ``put`` and ``purge_campaign`` through any replica publishes the key (or the
  campaign's key prefix) on one Redis channel; with ``RedisCacheStore(channel=CHANNEL)`` the
  write's own script publishes, in the same atomic step. Each replica's listener drops what it
  names. A lookup that raced an invalidation (one arrived while it read Redis) does not keep
  what it read.
- The copy is used only while the listener is subscribed (confirmed) and has heard from Redis
  (a message or the answer to its own PING, sent every second) within ``_SILENCE_S``: before
  that, after a read error, while Redis is down or while the subscription is silent (a link
  that stalls loses no message, it delays them), every lookup goes to the shared store as
  before, so a Redis outage behaves exactly as without this tier (lookups fail open as misses).
- A copy is held at most ``hold_s`` seconds (a backstop for a change no replica announced,
  e.g. a ``FLUSHALL`` or a key deleted by hand) and never past its entry's stale retention;
  freshness is still decided by ``cache_policy.freshness``.

A copy's size is its bytes (plain and gzip) plus ``ENTRY_OVERHEAD`` for the objects around
them; an entry larger than an eighth of the byte bound is never copied. The subscription is a
``redis_bus`` one (its reconnects, PINGs and failures are handled there).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable

from redis.asyncio.cluster import RedisCluster

from gateway.cache import CacheStore
from gateway.cache_policy import CacheEntry, campaign_prefix
from gateway.cache_redis import RedisCacheStore
from gateway.clock import Clock
from gateway.errors import BackendUnavailable
from gateway.redis_bus import RedisBus, Subscription
from gateway.redis_client import AnyRedis
from gateway.settings import DEFAULT_NAMESPACE

log = logging.getLogger("gateway.cache")


def invalidation_channel(namespace: str) -> str:
    """The channel on which one deployment's cache writes announce themselves."""
    return f"{namespace}:cache:invalidate"


CHANNEL = invalidation_channel(DEFAULT_NAMESPACE)
_SILENCE_S = 3.0  # copies are trusted only if the subscription was heard from this recently
HOLD_S = 120.0
# Bytes a copy costs beyond the characters of its key and bodies: the entry object, tuple,
# float, int and LRU node (~250 bytes by tracemalloc on CPython 3.11) plus the str and bytes
# object headers (~115): ~365, rounded up.
ENTRY_OVERHEAD = 400


def entry_size(key: str, entry: CacheEntry) -> int:
    return len(key) + len(entry.body) + len(entry.gzip or b"") + ENTRY_OVERHEAD


class LocalCopies:
    """The LRU itself, bounded in bytes (``entry_size``): no I/O, no clock of its own
    (``until`` is passed in)."""

    def __init__(self, *, max_bytes: int) -> None:
        self._items: OrderedDict[str, tuple[CacheEntry, float, int]] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str, now: float) -> CacheEntry | None:
        item = self._items.get(key)
        if item is None:
            return None
        if now >= item[1]:
            self.drop(key)
            return None
        self._items.move_to_end(key)
        return item[0]

    def keep(self, key: str, entry: CacheEntry, until: float) -> None:
        self.drop(key)
        size = entry_size(key, entry)
        if size > self.max_bytes // 8:
            return
        self._items[key] = (entry, until, size)
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, (_, _, old) = self._items.popitem(last=False)
            self._bytes -= old

    def drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= item[2]

    def drop_prefix(self, prefix: str) -> None:
        for key in [k for k in self._items if k.startswith(prefix)]:
            self.drop(key)

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)


class TieredCacheStore:
    """``CacheStore``: ``LocalCopies`` in front of ``shared``, kept coherent over Redis pub/sub.

    ``get``/``put``/``purge_campaign`` raise what ``shared`` raises (``BackendUnavailable``).
    ``shared_publishes``: ``shared`` announces its own writes on ``channel`` (a
    ``RedisCacheStore`` built with it); otherwise this tier publishes after each write, and a
    failed publish is logged and the copies are cleared and bypassed until the listener is
    subscribed again. ``close`` stops the listener.
    """

    def __init__(
        self,
        shared: CacheStore,
        client: AnyRedis,
        *,
        clock: Clock,
        max_bytes: int = 64 * 1024 * 1024,
        hold_s: float = HOLD_S,
        shared_publishes: bool = False,
        on_invalidate: Callable[[str], None] | None = None,
        channel: str = CHANNEL,
    ) -> None:
        self._shared = shared
        self._channel = channel
        self._client = client
        self._clock = clock
        self._hold_s = hold_s
        self._shared_publishes = shared_publishes
        self._bus = RedisBus(client, clock=clock)
        self.copies = LocalCopies(max_bytes=max_bytes)
        self._generation = 0  # bumped by every invalidation and every loss of coherence
        self._listener: Subscription | None = None
        self._closed = False
        self._on_invalidate = on_invalidate
        self._reading: dict[str, asyncio.Future[CacheEntry | None]] = {}

    @property
    def coherent(self) -> bool:
        """True while invalidations are being received, i.e. while copies may be used."""
        return self._listener is not None and self._listener.heard_within(_SILENCE_S)

    async def get(self, key: str) -> CacheEntry | None:
        now = self._clock.monotonic()
        if self.coherent:
            entry = self.copies.get(key, now)
            if entry is not None:
                if self._clock.time() < entry.stored_at + entry.ttl + entry.stale:
                    return entry
                self.copies.drop(key)
        elif self._listener is None and not self._closed:
            self._listener = self._bus.subscribe(self._channel, self._heard, on_lost=self._lost)
        # Identical lookups in flight share one read: a burst of one question (the misses a
        # coalesced call answers) costs Redis one GET per replica, not one per caller.
        reading = self._reading.get(key)
        if reading is None:
            reading = asyncio.ensure_future(self._read(key, now))
            self._reading[key] = reading
            reading.add_done_callback(lambda done: self._read_done(key, done))
        # shielded: a caller that leaves does not cancel the read for the others
        return await asyncio.shield(reading)

    def _read_done(self, key: str, done: asyncio.Future[CacheEntry | None]) -> None:
        if self._reading.get(key) is done:
            del self._reading[key]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have left before it ended

    async def _read(self, key: str, now: float) -> CacheEntry | None:
        generation = self._generation
        entry = await self._shared.get(key)
        if entry is not None and self.coherent and generation == self._generation:
            self.copies.keep(key, entry, now + self._hold_s)
        return entry

    async def put(self, key: str, entry: CacheEntry) -> None:
        self._invalidate(key)
        await self._shared.put(key, entry)
        if not self._shared_publishes:
            await self._publish(key)

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        prefix = campaign_prefix(vdn_id, campaign_id)
        self._invalidate(prefix)
        removed = await self._shared.purge_campaign(vdn_id, campaign_id)
        if not self._shared_publishes:
            await self._publish(prefix)
        return removed

    async def close(self) -> None:
        self._closed = True
        self._lose_coherence()
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    def _invalidate(self, name: str) -> None:
        """Drop a key, or every key of a campaign prefix (names ending in ``:``)."""
        self._generation += 1
        if name.endswith(":"):
            self.copies.drop_prefix(name)
            for key in [k for k in self._reading if k.startswith(name)]:
                del self._reading[key]
        else:
            self.copies.drop(name)
            self._reading.pop(name, None)  # later lookups read anew, not join an older read
        if self._on_invalidate is not None:
            self._on_invalidate(name)

    def _lose_coherence(self) -> None:
        self._generation += 1
        self.copies.clear()

    async def _publish(self, name: str) -> None:
        try:
            await self._bus.publish(self._channel, name)
        except BackendUnavailable:
            # Other replicas may keep an old copy up to hold_s: say so, and trust none here.
            log.warning("cache: publishing an invalidation failed", exc_info=True)
            self._lose_coherence()

    def _heard(self, data: bytes) -> None:
        self._invalidate(data.decode("utf-8", "replace"))

    def _lost(self, exc: BackendUnavailable) -> None:
        log.warning("cache: invalidation listener failed (%s); local copies off for now", exc)
        self._lose_coherence()


def shared_cache(
    client: AnyRedis,
    *,
    clock: Clock,
    local_max_bytes: int,
    namespace: str = DEFAULT_NAMESPACE,
) -> CacheStore:
    """The Redis mode's cache: Redis, behind an in-process tier of ``local_max_bytes`` (0: none).

    On a cluster the write scripts cannot publish (``redis_bus``): the tier publishes after
    each write, and without a tier nobody needs to hear of them.
    """
    channel = invalidation_channel(namespace)
    in_scripts = not isinstance(client, RedisCluster)
    shared = RedisCacheStore(
        client, clock=clock, channel=channel if in_scripts else "", namespace=namespace
    )
    if local_max_bytes <= 0:
        return shared
    return TieredCacheStore(
        shared,
        client,
        clock=clock,
        max_bytes=local_max_bytes,
        shared_publishes=in_scripts,
        channel=channel,
    )
