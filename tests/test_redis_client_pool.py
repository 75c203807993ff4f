"""The Redis client's pool under a burst: many more commands than connections, on a loop kept
busy, cost a healthy Redis no error; a Redis that does not answer still fails them, bounded.

A real redis-server. The loop is "busy" the way a burst makes it: a callback that holds it
``BUSY_S`` (longer than ``redis.timeout_ms``) while commands wait for a connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio.connection import AbstractConnection

from gateway.cache import CacheStore
from gateway.cache_policy import CacheEntry
from gateway.cache_tiered import shared_cache
from gateway.clock import SystemClock
from gateway.redis_client import REDIS_FAILURES, AnyRedis, connect
from gateway.settings import RedisSettings
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.fleet import JSON, path
from tests.support.processes import RedisServer

POOL = 4  # connections: far fewer than the commands of a burst
BURST = 200  # commands (or requests) at once
BUSY_S = 0.3  # the loop held this long: more than redis.timeout_ms (250 ms by default)
SICK_BOUND_S = 5.0  # a hang bound, not a speed claim: a frozen Redis fails calls well before


async def burst_on_a_busy_loop(client: AnyRedis, commands: int = BURST) -> list[BaseException]:
    """``commands`` GETs at once; once every one has asked for a connection, the loop is held
    ``BUSY_S``. What they raised (none, on a healthy Redis)."""
    calls = [asyncio.ensure_future(client.get(f"burst:{i}")) for i in range(commands)]
    # Each call runs to its first wait (a connection, or Redis's reply), then the loop is busy.
    asyncio.get_running_loop().call_soon(time.sleep, BUSY_S)
    await asyncio.sleep(0)
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    return [outcome for outcome in outcomes if isinstance(outcome, BaseException)]


@pytest.fixture
async def frozen_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of the test's own, SIGSTOPped: connections open, nothing answered."""
    server = RedisServer().start()
    server.freeze()
    yield server
    server.thaw()
    server.close()


async def assert_a_burst_waits_its_turn(url: str) -> None:
    """A burst on a busy loop through a client of ``url`` (any shape): no call fails."""
    client = connect(RedisSettings(url=url, pool_size=POOL))
    try:
        raised = await burst_on_a_busy_loop(client)
        assert raised == [], f"{len(raised)} of {BURST} failed, first: {raised[:1]}"
    finally:
        await client.aclose()


async def test_a_burst_on_a_busy_loop_waits_for_the_pool_instead_of_failing(
    redis_server: RedisServer,
) -> None:
    await assert_a_burst_waits_its_turn(redis_server.url)


async def test_a_burst_on_a_redis_that_does_not_answer_fails_every_call_within_a_bound(
    frozen_redis: RedisServer,
) -> None:
    client = connect(RedisSettings(url=frozen_redis.url, pool_size=POOL))
    try:
        began = time.monotonic()
        calls = [client.get(f"burst:{i}") for i in range(10 * POOL)]
        async with asyncio.timeout(SICK_BOUND_S):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(outcome, REDIS_FAILURES) for outcome in outcomes), outcomes
        assert time.monotonic() - began < SICK_BOUND_S
    finally:
        await client.aclose()


async def test_a_lone_call_to_a_redis_that_does_not_answer_fails_within_a_bound(
    frozen_redis: RedisServer,
) -> None:
    client = connect(RedisSettings(url=frozen_redis.url))
    try:
        async with asyncio.timeout(SICK_BOUND_S):
            with pytest.raises(REDIS_FAILURES):
                await client.get("alone")
    finally:
        await client.aclose()


class BusyLoopStore:
    """A ``CacheStore``: ``inner``, that holds the loop ``BUSY_S`` once, as soon as more
    lookups are under way than its client has connections (``waiting`` of them queued)."""

    def __init__(self, inner: CacheStore, waiting: int) -> None:
        self.inner = inner
        self.threshold = POOL + waiting
        self.under_way = 0
        self.held = False

    async def get(self, key: str) -> CacheEntry | None:
        self.under_way += 1
        try:
            if not self.held and self.under_way >= self.threshold:
                self.held = True
                asyncio.get_running_loop().call_soon(time.sleep, BUSY_S)
            return await self.inner.get(key)
        finally:
            self.under_way -= 1

    async def put(self, key: str, entry: CacheEntry) -> None:
        await self.inner.put(key, entry)

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        return await self.inner.purge_campaign(vdn_id, campaign_id)

    async def close(self) -> None:
        await self.inner.close()


async def test_a_burst_of_hits_on_a_busy_loop_counts_no_redis_error(
    redis_server: RedisServer, upstream: Upstream, start_gateway: StartGateway
) -> None:
    redis_server.flush()
    settings = gateway_settings(upstream.url, redis__url=redis_server.url)
    # The cache's own client with few connections, no in-process tier: every hit asks Redis.
    client = connect(dataclasses.replace(settings.redis, pool_size=POOL))
    store = BusyLoopStore(shared_cache(client, clock=SystemClock(), local_max_bytes=0), 20)
    registry = CollectorRegistry()
    try:
        gateway = await start_gateway(settings, cache=store, registry=registry)
        first = await gateway.post(path(5), data=b"{}", headers=JSON)
        assert (first.status, first.headers["X-Cache"]) == (200, "MISS")

        answers = await asyncio.gather(
            *(gateway.post(path(5), data=b"{}", headers=JSON) for _ in range(BURST))
        )
    finally:
        await client.aclose()

    assert store.held, "the burst never had lookups waiting for a connection"
    errors = registry.get_sample_value(
        "isales_gateway_redis_errors_total", {"operation": "cache_get"}
    )
    assert errors == 0
    assert [(a.status, a.headers["X-Cache"]) for a in answers] == [(200, "HIT")] * BURST
    assert upstream.requests == 1


async def test_a_connection_closed_under_a_command_fails_it_as_a_redis_failure(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py 8.1 raises AttributeError when another task's error handling disconnects a
    connection while a command is being sent on it (seen under a cluster primary's restart:
    a 500). Simulated at that very call, the gateway's client turns it into a Redis failure."""
    client = connect(RedisSettings(url=redis_server.url, pool_size=POOL))
    try:
        await client.ping()  # connected: the next command goes straight to sending

        async def writer_gone(self: object, command: object) -> None:
            raise AttributeError("'NoneType' object has no attribute 'writelines'")

        monkeypatch.setattr(AbstractConnection, "_send_packed_command", writer_gone)
        with pytest.raises(REDIS_FAILURES):
            await client.get("anything")
    finally:
        monkeypatch.undo()
        await client.aclose()
