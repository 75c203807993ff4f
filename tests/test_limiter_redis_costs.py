"""What the fleet limiter costs Redis per permit, counted with ``INFO commandstats`` on the
test's own redis-server (a script's own commands included): bounded whatever the queue's
depth, and no try repeated while only time can help (a full window).

Counts, not times: the figures are what Redis served, however long it took. Heartbeats are
kept out of the counts (one at the start, the next long after the test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.clock import SystemClock
from gateway.limiter import FleetTimings, LimitConfig
from gateway.limiter.redis_limiter import RedisLimiter, RedisPermit
from gateway.limiter.redis_scripts import Wait
from tests.support.processes import RedisServer

MAX = 4


def build(client: aioredis.Redis, window_s: float) -> RedisLimiter:
    """A limiter on the keys ``redis_server.flush()`` leaves open (no gate to wait out)."""
    return RedisLimiter(
        client,
        LimitConfig(max_concurrent=MAX, window_s=window_s, max_queue=500, max_wait_s=60.0),
        # Heartbeats every 10 s: none during a test after the first.
        FleetTimings(lease_s=30.0, beat_s=30.0),
        clock=SystemClock(),
    )


@pytest.fixture
async def made() -> AsyncIterator[list[RedisLimiter]]:
    limiters: list[RedisLimiter] = []
    yield limiters
    for limiter in limiters:
        await limiter.close()


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not check():  # noqa: ASYNC110 - a condition on several objects, no event to await
            await asyncio.sleep(0.002)


async def calls(client: aioredis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


async def joined(limiter: RedisLimiter) -> None:
    """Started, its first heartbeat done (the epoch known): later counts are the permits'."""
    limiter.start()
    await until(lambda: limiter.members >= 1)


async def spend(
    limiter: RedisLimiter, client: aioredis.Redis, *, permits: int, depth: int
) -> float:
    """Commands per permit while ``permits`` callers go through, ``depth`` of them waiting or
    holding at any time; each sends at once and releases."""
    await joined(limiter)
    outstanding = asyncio.Semaphore(depth)
    held: list[RedisPermit] = []

    async def caller() -> None:
        async with outstanding, limiter.permit() as permit:
            await permit.sent()
            held.append(permit)
            await until(lambda: permit.recorded)

    await client.config_resetstat()
    await asyncio.gather(*(caller() for _ in range(permits)))
    await limiter.close()  # waits for the releases on their way; withdraws nothing (served)
    spent = await calls(client)
    assert len(held) == permits
    counted = {k: v for k, v in spent.items() if k not in ("info", "config|resetstat")}
    return sum(counted.values()) / permits


async def test_redis_commands_per_permit_do_not_grow_with_the_queue_depth(
    redis_client: aioredis.Redis, redis_server: RedisServer, made: list[RedisLimiter]
) -> None:
    # Both bound by the window (more callers than it lets start), one 2 past the budget, the
    # other 60 deep: the same number of permits through each.
    shallow_limiter = build(redis_client, 0.15)
    made.append(shallow_limiter)
    shallow = await spend(shallow_limiter, redis_client, permits=24, depth=MAX + 2)
    redis_server.flush()
    deep_limiter = build(redis_client, 0.15)
    made.append(deep_limiter)
    deep = await spend(deep_limiter, redis_client, permits=24, depth=60)
    print(f"commands per permit: {shallow:.1f} 6 deep, {deep:.1f} 60 deep")
    assert deep <= shallow * 1.25 + 2, (shallow, deep)


async def test_a_full_window_costs_one_try_per_freed_start_not_one_per_release(
    redis_client: aioredis.Redis, made: list[RedisLimiter]
) -> None:
    # MAX permits held and sent fill the window (long: nothing leaves it during the test).
    # A caller waiting meanwhile waits for a release (every permit is held); the first release
    # costs it one try, which finds the window full; the other releases (and their messages)
    # cost no try: only time frees a start.
    limiter = build(redis_client, 3.0)
    made.append(limiter)
    await joined(limiter)
    release = [asyncio.Event() for _ in range(MAX)]
    permits: list[RedisPermit] = []

    async def holder(done: asyncio.Event) -> None:
        async with limiter.permit() as permit:
            await permit.sent()
            permits.append(permit)
            await done.wait()

    holders = [asyncio.create_task(holder(done)) for done in release]
    await until(lambda: len(permits) == MAX and all(p.recorded for p in permits))
    waiter = asyncio.create_task(holder(asyncio.Event()))
    await until(lambda: limiter._waiting_on is Wait.RELEASE)  # its one try: every permit held
    await redis_client.config_resetstat()
    release[0].set()
    await holders[0]
    await until(lambda: limiter._waiting_on is Wait.TIME)  # one try, on that release
    for done in release[1:]:
        done.set()
    await asyncio.gather(*holders[1:])
    await until(lambda: limiter.snapshot().in_flight == 0)
    for _ in range(10):  # any wake-up the releases caused has had its turn
        await asyncio.sleep(0)
    wait = limiter._wake
    assert wait is not None
    assert not wait.done()  # the dispatcher still waits for the window's edge
    stats = await calls(redis_client)
    assert not waiter.done()  # the window (3 s) is still full: nothing could be granted
    assert stats.get("evalsha", 0) == MAX + 1, stats  # the releases, and one try
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
