"""The one pub/sub subscription helper: confirmed before it is live, resubscribed after Redis
comes back, every loss reported (``gateway.redis_bus``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.clock import ManualClock, SystemClock
from gateway.errors import BackendUnavailable
from gateway.redis_bus import RedisBus
from tests.support.processes import RedisServer, free_port
from tests.support.waiting import until


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


async def test_a_subscription_hears_what_is_published_once_live(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    bus = RedisBus(client, clock=SystemClock())
    heard: list[bytes] = []
    subscription = bus.subscribe("ns:chan", heard.append)
    try:
        await subscription.ready(5.0)
        assert subscription.heard_within(1.0)
        await bus.publish("ns:chan", b"one")
        await bus.publish("ns:other", b"not for us")
        await bus.publish("ns:chan", "two")
        await until(lambda: len(heard) == 2)
        assert heard == [b"one", b"two"]
    finally:
        await subscription.close()
        await client.aclose()
    assert not subscription.live


async def test_after_redis_restarts_the_subscription_is_lost_reported_and_back(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    bus = RedisBus(client, clock=SystemClock())
    heard: list[bytes] = []
    losses: list[BackendUnavailable] = []
    subscription = bus.subscribe("ns:chan", heard.append, on_lost=losses.append)
    try:
        await subscription.ready(5.0)
        own_redis.restart_empty()
        await until(lambda: bool(losses))
        await subscription.ready(10.0)
        await bus.publish("ns:chan", b"after")
        await until(lambda: heard == [b"after"])
    finally:
        await subscription.close()
        await client.aclose()


async def test_no_redis_means_not_ready_and_a_publish_that_fails_clearly() -> None:
    client = aioredis.Redis(port=free_port(), socket_connect_timeout=0.2)
    bus = RedisBus(client, clock=SystemClock())
    losses: list[BackendUnavailable] = []
    subscription = bus.subscribe("ns:chan", lambda _: None, on_lost=losses.append)
    try:
        with pytest.raises(BackendUnavailable):
            await subscription.ready(0.5)
        await until(lambda: bool(losses))  # each failed attempt is reported
        assert not subscription.heard_within(10.0)
        with pytest.raises(BackendUnavailable, match="publish"):
            await bus.publish("ns:chan", b"x")
    finally:
        await subscription.close()
        await client.aclose()


async def test_a_listener_that_raises_does_not_end_the_subscription(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    bus = RedisBus(client, clock=SystemClock())
    heard: list[bytes] = []

    def fragile(data: bytes) -> None:
        heard.append(data)
        if data == b"bad":
            raise ValueError("a bug in a listener")

    subscription = bus.subscribe("ns:chan", fragile)
    try:
        await subscription.ready(5.0)
        await bus.publish("ns:chan", b"bad")
        await bus.publish("ns:chan", b"good")
        await until(lambda: heard == [b"bad", b"good"])
        assert subscription.live
    finally:
        await subscription.close()
        await client.aclose()


async def test_a_subscription_closed_at_any_moment_of_its_start_ends(
    own_redis: RedisServer,
) -> None:
    # A cancellation can be lost inside redis-py (its connect's wait_for on Python 3.11, its
    # pub/sub ping); close() must end the loop anyway. The manual clock never ends the retry
    # pause, so a loop that went on would never finish.
    client = aioredis.Redis.from_url(own_redis.url)
    bus = RedisBus(client, clock=ManualClock())
    try:
        for step in range(60):
            subscription = bus.subscribe("ns:chan", lambda _: None)
            for _ in range(step % 6):
                await asyncio.sleep(0)  # close at a different point of the start each time
            closing = asyncio.ensure_future(subscription.close())
            await until(closing.done, f"close() returned (step {step})", within=10.0)
    finally:
        await client.aclose()
