"""The fleet-wide upstream pause (``UpstreamPause``): one contract, every implementation.

Both run on a ``ManualClock``; the Redis one against the private redis-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import redis.asyncio as aioredis

from gateway.clock import ManualClock
from gateway.pause import InMemoryPause, UpstreamPause, pause_seconds, retry_after_seconds
from gateway.pause_redis import PAUSE_KEY, RedisPause

NOW = 1_800_000_000.0


@pytest.fixture(params=["memory", "redis"])
async def backend(
    request: pytest.FixtureRequest, redis_client: aioredis.Redis
) -> AsyncIterator[tuple[UpstreamPause, ManualClock]]:
    clock = ManualClock(start=NOW)
    pause: UpstreamPause = (
        InMemoryPause(clock) if request.param == "memory" else RedisPause(redis_client, clock=clock)
    )
    yield pause, clock
    await pause.close()


async def test_nothing_is_paused_at_first(backend: tuple[UpstreamPause, ManualClock]) -> None:
    pause, _ = backend
    assert await pause.remaining() == 0


async def test_a_pause_lasts_its_seconds_then_ends(
    backend: tuple[UpstreamPause, ManualClock],
) -> None:
    pause, clock = backend
    await pause.pause(5)
    assert await pause.remaining() == pytest.approx(5)
    clock.advance(4)
    assert await pause.remaining() == pytest.approx(1)
    clock.advance(1)
    assert await pause.remaining() == 0


async def test_a_shorter_pause_never_shortens_a_longer_one(
    backend: tuple[UpstreamPause, ManualClock],
) -> None:
    pause, clock = backend
    await pause.pause(10)
    await pause.pause(2)
    clock.advance(3)
    assert await pause.remaining() == pytest.approx(7)
    await pause.pause(20)
    assert await pause.remaining() == pytest.approx(20)


async def test_a_pause_set_by_one_replica_stops_another(redis_client: aioredis.Redis) -> None:
    clock = ManualClock(start=NOW)
    one, other = RedisPause(redis_client, clock=clock), RedisPause(redis_client, clock=clock)
    await one.pause(3)
    assert await other.remaining() == pytest.approx(3)
    ttl_ms = await redis_client.pttl(PAUSE_KEY)
    assert 0 < ttl_ms <= 3000, "Redis forgets the pause when it ends"


async def test_a_redis_replica_remembers_its_pause_when_redis_loses_it(
    redis_client: aioredis.Redis,
) -> None:
    clock = ManualClock(start=NOW)
    pause = RedisPause(redis_client, clock=clock)
    await pause.pause(3)
    await redis_client.flushall()
    assert await pause.remaining() == pytest.approx(3)


async def test_a_value_that_is_not_a_pause_never_stops_calls(redis_client: aioredis.Redis) -> None:
    await redis_client.set(PAUSE_KEY, b"not a number")
    assert await RedisPause(redis_client, clock=ManualClock(start=NOW)).remaining() == 0
    await redis_client.set(PAUSE_KEY, b"inf")
    assert await RedisPause(redis_client, clock=ManualClock(start=NOW)).remaining() == 0


async def test_with_redis_down_a_pause_is_kept_locally_and_nothing_raises() -> None:
    client = aioredis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    clock = ManualClock(start=NOW)
    errors: list[int] = []
    pause = RedisPause(client, clock=clock, on_error=lambda: errors.append(1))
    assert await pause.remaining() == 0
    await pause.pause(4)
    assert await pause.remaining() == pytest.approx(4)
    assert len(errors) == 2
    await client.aclose()


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("7", 7.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        (format_datetime(datetime.fromtimestamp(NOW + 30, UTC), usegmt=True), 30.0),
        (format_datetime(datetime.fromtimestamp(NOW - 30, UTC), usegmt=True), 0.0),
        ("-5", None),
        ("soon", None),
        ("", None),
        (None, None),
        ("9" * 400, 999999999999.0),
    ],
)
def test_retry_after_is_read_as_seconds_or_an_http_date(
    value: str | None, seconds: float | None
) -> None:
    assert retry_after_seconds(value, NOW) == seconds


def test_the_pause_is_the_retry_after_else_the_default_within_one_second_and_the_cap() -> None:
    def pause(value: str | None) -> float:
        return pause_seconds(value, NOW, default_s=5, max_s=300)

    assert pause("7") == 7
    assert pause(None) == pause("garbage") == 5
    assert pause("0") == 1
    assert pause("86400") == 300
