"""The fleet-wide upstream pause (``UpstreamPause``): one contract, every implementation.

Both run on a ``ManualClock``; the Redis one against the private redis-server. How replicas
hear of each other's pauses (a subscription, the key read once it is confirmed, the key read
on every check while it is not) runs on real time against a redis-server of the test's own,
whose ``INFO commandstats`` counts the reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest
import redis.asyncio as aioredis

from gateway.clock import ManualClock, SystemClock
from gateway.pause import InMemoryPause, UpstreamPause, pause_seconds, retry_after_seconds
from gateway.pause_redis import PAUSE_KEY, RedisPause
from tests.support.processes import RedisServer
from tests.support.waiting import until

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
    try:
        await one.pause(3)
        assert await other.remaining() == pytest.approx(3)
    finally:
        await one.close()
        await other.close()
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
    await pause.close()


async def test_a_value_that_is_not_a_pause_never_stops_calls(redis_client: aioredis.Redis) -> None:
    for value in (b"not a number", b"inf"):
        await redis_client.set(PAUSE_KEY, value)
        pause = RedisPause(redis_client, clock=ManualClock(start=NOW))
        assert await pause.remaining() == 0
        await pause.close()


async def test_with_redis_down_a_pause_is_kept_locally_and_nothing_raises() -> None:
    client = aioredis.Redis(port=1, socket_connect_timeout=0.2)  # nothing listens on port 1
    clock = ManualClock(start=NOW)
    errors: list[int] = []
    pause = RedisPause(client, clock=clock, on_error=lambda: errors.append(1))
    assert await pause.remaining() == 0
    await pause.pause(4)
    assert await pause.remaining() == pytest.approx(4)
    assert len(errors) == 2
    await pause.close()
    await client.aclose()


# How replicas hear of each other's pauses, on a redis-server of each test's own.


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def replicas(own_redis: RedisServer) -> AsyncIterator[Replicas]:
    made = Replicas(own_redis)
    yield made
    await made.close()


class Replicas:
    """``RedisPause``s on one Redis, each with a client of its own, as replicas have."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self._made: list[tuple[RedisPause, aioredis.Redis]] = []

    def new(self, namespace: str = "gw", url: str | None = None) -> RedisPause:
        client = aioredis.Redis.from_url(url or self.server.url)
        pause = RedisPause(client, clock=SystemClock(), namespace=namespace)
        self._made.append((pause, client))
        return pause

    async def gets(self) -> int:
        """GETs Redis has run so far (a script's own included)."""
        client = aioredis.Redis.from_url(self.server.url)
        try:
            stats = await client.info("commandstats")
        finally:
            await client.aclose()
        return int(stats.get("cmdstat_get", {}).get("calls", 0))

    async def close(self) -> None:
        for pause, client in self._made:
            await pause.close()
            await client.aclose()


async def caught_up(pause: RedisPause) -> bool:
    await pause.remaining()
    return pause.trusted


async def test_a_pause_set_on_one_replica_reaches_another_without_it_reading_the_key(
    replicas: Replicas,
) -> None:
    one, other = replicas.new(), replicas.new()
    await until(lambda: caught_up(other), "the other replica subscribed and caught up")
    await one.pause(30)  # its script reads the key once: counted before the other looks
    reads = await replicas.gets()

    async def stopped() -> bool:
        return await other.remaining() > 0

    await until(stopped, "the other replica stops for the pause")
    assert await other.remaining() == pytest.approx(30, abs=2)
    assert await replicas.gets() == reads, "it heard of the pause; it never read the key"


async def test_a_pause_set_while_a_replica_was_unsubscribed_stops_it_once_it_is_back(
    replicas: Replicas, own_redis: RedisServer
) -> None:
    one, other = replicas.new(), replicas.new()
    await until(lambda: caught_up(other), "the other replica subscribed and caught up")
    admin = own_redis.client()
    try:
        assert admin.client_kill_filter(_type="pubsub") == 1  # the other replica's only
        await until(lambda: not other.subscribed, "the other replica saw its link drop")
        await one.pause(30)  # published to nobody
        await until(lambda: other.subscribed, "the other replica subscribed again")
    finally:
        admin.close()
    assert await other.remaining() == pytest.approx(30, abs=2)


async def test_a_replica_that_cannot_subscribe_reads_the_key_on_every_check(
    replicas: Replicas, own_redis: RedisServer
) -> None:
    admin = own_redis.client()
    try:  # a user that may read and write keys but not subscribe to any channel
        admin.acl_setuser("deaf", enabled=True, passwords=["+pw"], keys="*", commands=["+@all"])
        admin.acl_log_reset()
        one = replicas.new()
        deaf = replicas.new(url=f"redis://deaf:pw@127.0.0.1:{own_redis.port}/0")
        assert await deaf.remaining() == 0
        await until(lambda: bool(admin.acl_log()), "its subscription was refused")
        await one.pause(30)
        assert await deaf.remaining() == pytest.approx(30, abs=2)
        assert not deaf.trusted
    finally:
        admin.close()


async def test_namespaces_keep_their_pauses_apart(replicas: Replicas) -> None:
    first, second, listener = replicas.new("t1"), replicas.new("t2"), replicas.new("t2")
    await until(lambda: caught_up(listener), "the listener subscribed and caught up")
    await first.pause(30)
    await second.pause(2)  # published after the other namespace's, on the same Redis

    async def stopped() -> bool:
        return await listener.remaining() > 0

    await until(stopped, "the listener hears its own namespace's pause")
    assert await listener.remaining() <= 2, "the other namespace's pause was not heard"


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
