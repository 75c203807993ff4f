"""The in-process tier in front of the Redis cache: hot hits skip Redis, yet every replica
sees another's put or purge (pub/sub invalidation), and nothing is served from the tier while
invalidations cannot be received."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from gateway.cache_local import LocalCopies, TieredCacheStore
from gateway.cache_policy import CacheEntry, cache_key
from gateway.cache_redis import RedisCacheStore
from gateway.clock import ManualClock, SystemClock
from gateway.validation import CallResultQuery
from tests.support.processes import RedisServer

KEY = cache_key(CallResultQuery(11, 3, page_num=1))
OTHER_CAMPAIGN = cache_key(CallResultQuery(11, 4, page_num=1))


def entry(body: bytes = b'{"resultCode":"0200000"}', stored_at: float = 0.0) -> CacheEntry:
    return CacheEntry(body, "application/json", stored_at, 30.0, 60.0)


async def until(check: Callable[[], bool], within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - polls a flag, there is no event
            await asyncio.sleep(0.005)


class Counting:
    """Counts the shared store's lookups, so a test can tell a local hit from a Redis one."""

    def __init__(self, store: RedisCacheStore) -> None:
        self.store = store
        self.gets = 0

    async def get(self, key: str) -> CacheEntry | None:
        self.gets += 1
        return await self.store.get(key)

    async def put(self, key: str, value: CacheEntry) -> None:
        await self.store.put(key, value)

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        return await self.store.purge_campaign(vdn_id, campaign_id)


@pytest.fixture
async def replicas(
    redis_client: aioredis.Redis,
) -> AsyncIterator[list[tuple[TieredCacheStore, Counting]]]:
    """Two replicas' tiers over one Redis, each subscribed before the test starts."""
    built = []
    for _ in range(2):
        shared = Counting(RedisCacheStore(redis_client, clock=SystemClock()))
        tier = TieredCacheStore(shared, redis_client, clock=SystemClock())
        await tier.get("isales:v1:{0:0}:warm-up")  # starts the listener
        await until(lambda tier=tier: tier.coherent)
        built.append((tier, shared))
    yield built
    for tier, _ in built:
        await tier.close()


def test_the_copies_are_bounded_in_entries_and_bytes_and_expire() -> None:
    copies = LocalCopies(max_entries=2, max_bytes=800)
    for name in "abc":
        copies.keep(name, entry(b"x" * 10), until=5.0)
    assert len(copies) == 2
    assert copies.get("a", now=0.0) is None
    copies.keep("big", entry(b"x" * 101), until=5.0)  # over an eighth of the byte bound
    assert copies.get("big", now=0.0) is None
    assert copies.get("c", now=5.0) is None  # held until 5.0, not at 5.0


def test_a_campaign_prefix_drops_that_campaigns_copies_only() -> None:
    copies = LocalCopies(max_entries=10, max_bytes=10_000)
    copies.keep(KEY, entry(), until=9.0)
    copies.keep(OTHER_CAMPAIGN, entry(), until=9.0)
    copies.drop_prefix(KEY.rsplit(":", 1)[0] + ":")
    assert copies.get(KEY, now=0.0) is None
    assert copies.get(OTHER_CAMPAIGN, now=0.0) is not None


async def test_a_repeated_hit_is_answered_without_asking_redis(
    replicas: list[tuple[TieredCacheStore, Counting]],
) -> None:
    (tier, shared), _ = replicas
    stored = entry(stored_at=SystemClock().time())
    await tier.put(KEY, stored)
    await asyncio.sleep(0.05)  # our own invalidation comes back first
    assert await tier.get(KEY) == stored
    before = shared.gets
    for _ in range(5):
        assert await tier.get(KEY) == stored
    assert shared.gets == before


async def test_a_put_on_one_replica_replaces_the_copy_on_another(
    replicas: list[tuple[TieredCacheStore, Counting]],
) -> None:
    (a, _), (b, _) = replicas
    now = SystemClock().time()
    await a.put(KEY, entry(b'{"v":1}', now))
    await asyncio.sleep(0.05)
    assert (await b.get(KEY)) == entry(b'{"v":1}', now)
    await a.put(KEY, entry(b'{"v":2}', now))
    await until(lambda: b.copies.get(KEY, now=0.0) is None)
    assert (await b.get(KEY)) == entry(b'{"v":2}', now)


async def test_a_purge_on_one_replica_drops_the_campaigns_copies_on_another(
    replicas: list[tuple[TieredCacheStore, Counting]],
) -> None:
    (a, _), (b, _) = replicas
    now = SystemClock().time()
    await a.put(KEY, entry(stored_at=now))
    await a.put(OTHER_CAMPAIGN, entry(stored_at=now))
    await asyncio.sleep(0.05)
    assert await b.get(KEY) is not None
    assert await b.get(OTHER_CAMPAIGN) is not None
    assert await a.purge_campaign(11, 3) == 1
    await until(lambda: b.copies.get(KEY, now=0.0) is None)
    assert await b.get(KEY) is None
    assert await b.get(OTHER_CAMPAIGN) is not None


async def test_without_a_subscription_every_lookup_goes_to_redis() -> None:
    server = RedisServer().start()
    client = aioredis.Redis.from_url(server.url)
    shared = Counting(RedisCacheStore(client, clock=SystemClock()))
    tier = TieredCacheStore(shared, client, clock=SystemClock())
    try:
        await tier.put(KEY, entry(stored_at=SystemClock().time()))
        await tier.get(KEY)
        await until(lambda: tier.coherent)
        await tier.get(KEY)
        server.stop()  # the listener loses its connection: copies are off
        await until(lambda: not tier.coherent)
        assert len(tier.copies) == 0
    finally:
        await tier.close()
        await client.aclose()
        server.close()


async def test_a_copy_is_held_no_longer_than_its_hold_time(redis_client: aioredis.Redis) -> None:
    clock = ManualClock(start=SystemClock().time())
    shared = Counting(RedisCacheStore(redis_client, clock=SystemClock()))
    tier = TieredCacheStore(shared, redis_client, clock=clock, hold_s=2.0)
    try:
        await tier.put(KEY, entry(stored_at=clock.time()))
        await tier.get(KEY)
        await until(lambda: tier.coherent)
        await asyncio.sleep(0.05)
        await tier.get(KEY)
        before = shared.gets
        await tier.get(KEY)
        assert shared.gets == before
        clock.advance(2.0)
        await tier.get(KEY)
        assert shared.gets == before + 1
    finally:
        await tier.close()
