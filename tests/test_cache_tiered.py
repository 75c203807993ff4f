"""The in-process tier in front of the Redis cache: hot hits skip Redis, yet every replica
sees another's put or purge (pub/sub invalidation), and nothing is served from the tier while
invalidations cannot be received."""

from __future__ import annotations

import gzip
import itertools
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
import redis.asyncio as aioredis

from gateway.cache_policy import CacheEntry, cache_key
from gateway.cache_redis import RedisCacheStore
from gateway.cache_tiered import (
    CHANNEL,
    ENTRY_OVERHEAD,
    LocalCopies,
    TieredCacheStore,
    entry_size,
)
from gateway.clock import ManualClock, SystemClock
from gateway.validation import CallResultQuery
from tests.support.processes import RedisServer
from tests.support.waiting import until

KEY = cache_key(CallResultQuery(11, 3, page_num=1))
OTHER_CAMPAIGN = cache_key(CallResultQuery(11, 4, page_num=1))


def entry(body: bytes = b'{"resultCode":"0200000"}', stored_at: float = 0.0) -> CacheEntry:
    return CacheEntry(body, "application/json", stored_at, 30.0, 60.0)


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


class Replica(NamedTuple):
    tier: TieredCacheStore
    shared: Counting
    heard: list[str]  # every name the tier invalidated: its own writes' and the channel's


_MARKERS = itertools.count()


async def delivered(client: aioredis.Redis, *heard: list[str]) -> None:
    """Every invalidation published so far has been applied by each listener: a marker
    published now reaches them after those (one channel, delivered in order)."""
    marker = f"isales:v1:{{0:0}}:marker-{next(_MARKERS)}"
    await client.publish(CHANNEL, marker)
    await until(lambda: all(marker in names for names in heard), "every listener got the marker")


def replica_over(client: aioredis.Redis, *, by_script: bool) -> Replica:
    """A tier over a counted Redis store, not yet listening; the invalidations published by
    the store's write scripts (``by_script``, as served) or by the tier itself."""
    shared = Counting(RedisCacheStore(client, clock=SystemClock(), channel=CHANNEL * by_script))
    heard: list[str] = []
    tier = TieredCacheStore(
        shared,
        client,
        clock=SystemClock(),
        shared_publishes=by_script,
        on_invalidate=heard.append,
    )
    return Replica(tier, shared, heard)


@pytest.fixture(params=["script", "tier"])
async def replicas(
    request: pytest.FixtureRequest, redis_client: aioredis.Redis
) -> AsyncIterator[list[Replica]]:
    """Two replicas' tiers over one Redis, each subscribed before the test starts; the
    invalidations published by the store's write scripts (as served) or by the tier."""
    built = []
    by_script = request.param == "script"
    for _ in range(2):
        replica = replica_over(redis_client, by_script=by_script)
        tier = replica.tier
        await tier.get("isales:v1:{0:0}:warm-up")  # starts the listener
        await until(lambda tier=tier: tier.coherent)
        built.append(replica)
    yield built
    for replica in built:
        await replica.tier.close()


def test_the_copies_are_bounded_in_bytes_overhead_included_and_expire() -> None:
    size = entry_size("a", entry(b"x" * 10))
    assert size > 10 + ENTRY_OVERHEAD - 1
    copies = LocalCopies(max_bytes=8 * size)
    for name in "abcdefghi":
        copies.keep(name, entry(b"x" * 10), until=5.0)
    assert len(copies) == 8
    assert copies.bytes == 8 * size
    assert copies.get("a", now=0.0) is None  # the least recently used left
    copies.keep("big", entry(b"x" * (size + 1)), until=5.0)  # over an eighth of the bound
    assert copies.get("big", now=0.0) is None
    assert copies.get("c", now=5.0) is None  # held until 5.0, not at 5.0


def test_a_copy_counts_its_compressed_bytes_too() -> None:
    plain = entry(b"x" * 100)
    both = CacheEntry(plain.body, plain.content_type, 0.0, 30.0, 60.0, gzip=b"z" * 40)
    assert entry_size("k", both) == entry_size("k", plain) + 40


def test_a_campaign_prefix_drops_that_campaigns_copies_only() -> None:
    copies = LocalCopies(max_bytes=10_000)
    copies.keep(KEY, entry(), until=9.0)
    copies.keep(OTHER_CAMPAIGN, entry(), until=9.0)
    copies.drop_prefix(KEY.rsplit(":", 1)[0] + ":")
    assert copies.get(KEY, now=0.0) is None
    assert copies.get(OTHER_CAMPAIGN, now=0.0) is not None


async def test_a_repeated_hit_is_answered_without_asking_redis(
    replicas: list[Replica], redis_client: aioredis.Redis
) -> None:
    (tier, shared, heard), _ = replicas
    stored = entry(stored_at=SystemClock().time())
    await tier.put(KEY, stored)
    await delivered(redis_client, heard)  # our own invalidation comes back first
    assert await tier.get(KEY) == stored
    before = shared.gets
    for _ in range(5):
        assert await tier.get(KEY) == stored
    assert shared.gets == before


async def test_a_put_on_one_replica_replaces_the_copy_on_another(
    replicas: list[Replica], redis_client: aioredis.Redis
) -> None:
    (a, _, a_heard), (b, _, b_heard) = replicas
    now = SystemClock().time()
    await a.put(KEY, entry(b'{"v":1}', now))
    await delivered(redis_client, a_heard, b_heard)
    assert (await b.get(KEY)) == entry(b'{"v":1}', now)
    await a.put(KEY, entry(b'{"v":2}', now))
    await until(lambda: b.copies.get(KEY, now=0.0) is None)
    assert (await b.get(KEY)) == entry(b'{"v":2}', now)


async def test_a_purge_on_one_replica_drops_the_campaigns_copies_on_another(
    replicas: list[Replica], redis_client: aioredis.Redis
) -> None:
    (a, _, a_heard), (b, _, b_heard) = replicas
    now = SystemClock().time()
    await a.put(KEY, entry(stored_at=now))
    await a.put(OTHER_CAMPAIGN, entry(stored_at=now))
    await delivered(redis_client, a_heard, b_heard)
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


async def holding_a_copy(
    redis_client: aioredis.Redis, clock: ManualClock, *, channel: str = "", **options: Any
) -> Replica:
    """A lone tier (``options`` for ``TieredCacheStore``) that has stored ``KEY``, heard its
    own write and holds a copy of it: its next read does not reach Redis."""
    shared = Counting(RedisCacheStore(redis_client, clock=SystemClock(), channel=channel))
    heard: list[str] = []
    tier = TieredCacheStore(
        shared, redis_client, clock=clock, on_invalidate=heard.append, **options
    )
    await tier.put(KEY, entry(stored_at=clock.time()))
    await tier.get(KEY)  # starts the listener
    await until(lambda: tier.coherent)
    await delivered(redis_client, heard)
    await tier.get(KEY)
    before = shared.gets
    await tier.get(KEY)
    assert shared.gets == before
    return Replica(tier, shared, heard)


async def test_a_copy_is_held_no_longer_than_its_hold_time(redis_client: aioredis.Redis) -> None:
    clock = ManualClock(start=SystemClock().time())
    tier, shared, _ = await holding_a_copy(redis_client, clock, hold_s=2.0)
    try:
        before = shared.gets
        clock.advance(2.0)
        await tier.get(KEY)
        assert shared.gets == before + 1
    finally:
        await tier.close()


async def test_a_hot_set_far_beyond_a_thousand_entries_is_answered_locally(
    redis_client: aioredis.Redis,
) -> None:
    tier, shared, announced = replica_over(redis_client, by_script=True)
    now = SystemClock().time()
    keys = [cache_key(CallResultQuery(11, 3, page_num=n)) for n in range(1, 5001)]
    try:
        await tier.get(KEY)
        await until(lambda: tier.coherent)
        for key in keys:
            await shared.put(key, entry(b'{"resultCode":"0200000","n":"%d"}' % len(key), now))
        # every write's invalidation has arrived: none can drop a copy kept below
        await until(lambda: len(announced) == len(keys), within=10.0)
        for key in keys:
            assert await tier.get(key) is not None
        before = shared.gets
        for key in keys:
            assert await tier.get(key) is not None
        assert shared.gets == before
        assert len(tier.copies) == len(keys)
    finally:
        await tier.close()


async def test_a_silent_subscription_stops_the_copies_until_redis_answers_again(
    redis_client: aioredis.Redis,
) -> None:
    clock = ManualClock(start=SystemClock().time())
    tier, shared, _ = await holding_a_copy(
        redis_client, clock, channel=CHANNEL, shared_publishes=True
    )
    try:
        before = shared.gets
        clock.advance(10.0)  # nothing heard for 10 s: a stalled link may be holding messages
        assert not tier.coherent
        await tier.get(KEY)
        assert shared.gets == before + 1
        await until(lambda: tier.coherent, within=3.0)  # the listener's PING is answered
        await tier.get(KEY)
        before = shared.gets
        await tier.get(KEY)
        assert shared.gets == before
    finally:
        await tier.close()


async def test_a_compressed_entry_replaced_on_one_replica_is_replaced_on_the_other(
    replicas: list[Replica], redis_client: aioredis.Redis
) -> None:
    (a, _, a_heard), (b, _, b_heard) = replicas
    now = SystemClock().time()
    first = b'{"resultCode":"0200000","rows":"' + b"v1 " * 2000 + b'"}'
    second = b'{"resultCode":"0200000","rows":"' + b"v2 " * 2000 + b'"}'
    await a.put(KEY, entry(first, now))
    await delivered(redis_client, a_heard, b_heard)
    held = await b.get(KEY)
    assert held is not None
    assert held.gzip is not None
    assert (held.body, gzip.decompress(held.gzip)) == (first, first)
    assert b.copies.get(KEY, now=0.0) is not None
    await a.put(KEY, entry(second, now))
    await until(lambda: b.copies.get(KEY, now=0.0) is None)
    fresh = await b.get(KEY)
    assert fresh is not None
    assert fresh.gzip is not None
    assert (fresh.body, gzip.decompress(fresh.gzip)) == (second, second)
