"""A miss is answered as soon as the upstream answers. Its answer is stored after that, and
until the store has landed the key's round stays open, so an identical miss anywhere in the
fleet still costs the upstream nothing more.

Gateways on real sockets against the simulator, Redis mode on the private redis-server. The
first gateway's cache is the real one behind a gate (``HeldStore``) that holds each store until
the test lets it go: that makes "answered before the store" observable.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.cache import CacheStore, InMemoryCacheStore
from gateway.cache_policy import CacheEntry, cache_key
from gateway.cache_redis import redis_key
from gateway.cache_tiered import shared_cache
from gateway.clock import SystemClock
from gateway.coalesce_wire import lock_key, outcome_channel
from gateway.settings import DEFAULT_NAMESPACE
from gateway.validation import parse_request
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.fleet import JSON, path
from tests.support.processes import RedisServer
from tests.support.waiting import until

BODY = b'{"pageSize": 3}'


class HeldStore:
    """A ``CacheStore``: ``inner``, whose stores wait until ``release``."""

    def __init__(self, inner: CacheStore) -> None:
        self.inner = inner
        self.looked = 0  # lookups
        self.holding = 0  # stores asked for
        self.stored = 0  # stores landed
        self._gate = asyncio.Event()

    def release(self) -> None:
        self._gate.set()

    async def get(self, key: str) -> CacheEntry | None:
        self.looked += 1
        return await self.inner.get(key)

    async def put(self, key: str, entry: CacheEntry) -> None:
        self.holding += 1
        await self._gate.wait()
        await self.inner.put(key, entry)
        self.stored += 1

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        return await self.inner.purge_campaign(vdn_id, campaign_id)

    async def close(self) -> None:
        await self.inner.close()


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own, that reports every write (keyspace events)."""
    server = RedisServer().start()
    server.flush()
    yield server
    server.close()


async def test_a_miss_is_answered_before_its_store_and_an_identical_miss_elsewhere_waits_for_it(
    own_redis: RedisServer, upstream: Upstream, start_gateway: StartGateway
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    await client.config_set("notify-keyspace-events", "Eg$")  # DEL, SET, ... as they happen
    writes: list[tuple[str, str]] = []  # (command, key), in Redis's order
    watch = asyncio.ensure_future(_watch_writes(client, writes))
    settings = gateway_settings(upstream.url, redis__url=own_redis.url)
    held = HeldStore(shared_cache(client, clock=SystemClock(), local_max_bytes=0))
    first = await start_gateway(settings, cache=held)
    second = await start_gateway(settings)
    key = cache_key(parse_request("11", "5", BODY))
    lock, entry = lock_key(key), redis_key(DEFAULT_NAMESPACE, key)
    try:
        asked = asyncio.ensure_future(first.post(path(5), data=BODY, headers=JSON))
        await until(asked.done, "the caller is answered while its answer's store is held")
        response = asked.result()
        assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
        answer = await response.read()
        assert (held.holding, held.stored) == (1, 0)
        assert await client.exists(lock), "the round stays open until its answer is stored"

        again = asyncio.ensure_future(second.post(path(5), data=BODY, headers=JSON))

        async def listening() -> bool:  # the second gateway's round has begun
            counts = await client.pubsub_numsub(outcome_channel(DEFAULT_NAMESPACE))
            return bool(counts) and counts[0][1] >= 2

        await until(listening, "the second gateway coordinates its miss")
        held.release()
        other = await again
        assert other.status == 200
        assert other.headers["X-Cache"] in ("COALESCED", "HIT")
        assert await other.read() == answer
        assert upstream.requests == 1
        await until(lambda: ("del", lock) in writes, "the round ended")
        assert writes.index(("set", entry)) < writes.index(("del", lock)), (
            "the answer was stored before the round let another replica lead"
        )
        hit = await first.post(path(5), data=BODY, headers=JSON)
        assert hit.headers["X-Cache"] == "HIT"
        assert upstream.requests == 1
    finally:
        held.release()  # a store still held would hold the gateway's shutdown
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await client.aclose()


async def _watch_writes(client: aioredis.Redis, writes: list[tuple[str, str]]) -> None:
    events = client.pubsub()
    try:
        await events.psubscribe("__keyevent@0__:*")
        async for message in events.listen():
            if message["type"] == "pmessage":
                command = message["channel"].decode().rpartition(":")[2]
                writes.append((command, message["data"].decode()))
    finally:
        await events.aclose()  # type: ignore[no-untyped-call]


async def test_in_one_process_a_miss_is_answered_before_its_store_and_an_identical_one_joins(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    held = HeldStore(InMemoryCacheStore(max_entries=100, clock=SystemClock()))
    gateway = await start_gateway(gateway_settings(upstream.url), cache=held)
    try:
        asked = asyncio.ensure_future(gateway.post(path(5), data=BODY, headers=JSON))
        await until(asked.done, "the caller is answered while its answer's store is held")
        first = asked.result()
        assert first.headers["X-Cache"] == "MISS"
        assert (held.holding, held.stored) == (1, 0)
        again = asyncio.ensure_future(gateway.post(path(5), data=BODY, headers=JSON))
        await until(lambda: held.looked >= 3, "the identical miss looked in the cache")
        held.release()
        assert (await again).headers["X-Cache"] in ("COALESCED", "HIT")
        assert await (await again).read() == await first.read()
        assert upstream.requests == 1
    finally:
        held.release()
