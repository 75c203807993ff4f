"""The limiter never fails open: Redis dies under load, the replicas fall back to their local
shares, and when Redis is back they return to the global limit by themselves.

Each test runs a redis-server of its own (stopped, frozen and restarted on the same port);
the session's server is never touched. Short settings: a 0.3 s window, 0.6 s lease (= settle
time), a probe every 0.1 s and a 0.2 s Redis client timeout.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.clock import SystemClock
from gateway.errors import QueueTimeout
from gateway.limiter import LimiterSnapshot
from gateway.limiter_failover import FailoverLimiter, Mode
from gateway.metrics import GatewayMetrics
from tests.support.processes import RedisServer
from tests.test_limiter_contract import IDLE, SKEW, Holder, Recorder, finish, until

WINDOW, SETTLE, PROBE, TIMEOUT = 0.3, 0.6, 0.1, 0.2


class Replica:
    """One gateway replica's limiter on its own short-timeout client, with what it reported."""

    def __init__(self, server: RedisServer, **overrides: Any) -> None:
        self.client = aioredis.Redis.from_url(
            server.url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 1),  # as the app's client: one quick retry
        )
        self.errors = 0
        self.degraded: list[bool] = []
        options: dict[str, Any] = {
            "max_concurrent": 4,
            "window_s": WINDOW,
            "max_queue": 50,
            "max_wait_s": 5.0,
            "lease_s": SETTLE,
            "probe_s": PROBE,
            "clock": SystemClock(),
            "on_error": self._count_error,
            "on_degraded": self.degraded.append,
        }
        options.update(overrides)
        self.limiter = FailoverLimiter(self.client, **options)

    def _count_error(self) -> None:
        self.errors += 1

    async def close(self) -> None:
        await self.limiter.close()
        await self.client.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone, free to stop, freeze and restart."""
    server = RedisServer().start()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)  # a frozen server would not hear SIGTERM
    server.close()


@pytest.fixture
async def replica() -> AsyncIterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(server: RedisServer, **overrides: Any) -> Replica:
        made.append(Replica(server, **overrides))
        return made[-1]

    yield make
    for one in made:
        await one.close()


def modes_are(mode: Mode, *replicas: Replica) -> Callable[[], bool]:
    return lambda: all(r.limiter.mode is mode for r in replicas)


async def call(replica: Replica, hold: float = 0.0) -> None:
    async with replica.limiter.permit():
        await asyncio.sleep(hold)


async def test_two_replicas_keep_the_combined_limit_while_redis_dies_and_comes_back(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    a, b = replica(own_redis, replicas=2), replica(own_redis, replicas=2)
    recorder = Recorder()
    failures: list[BaseException] = []
    running = True

    async def worker(r: Replica, hold: float) -> None:
        while running:
            try:
                await recorder.call(r.limiter, hold)
            except Exception as exc:  # any failure is the finding
                failures.append(exc)

    workers = [
        asyncio.create_task(worker(r, hold)) for hold in (0.15, 0.0, 0.05) * 2 for r in (a, b)
    ]
    await asyncio.sleep(0.5)
    own_redis.stop()
    stopped = time.monotonic()
    await until(modes_are(Mode.FALLBACK, a, b))
    await asyncio.sleep(SETTLE + 0.6)
    own_redis.start()
    restarted = time.monotonic()
    await until(modes_are(Mode.GLOBAL, a, b), within=3.0)
    await asyncio.sleep(0.5)
    running = False
    await asyncio.gather(*workers)

    assert failures == []
    assert recorder.max_in_flight() <= 4
    assert recorder.max_starts_within(WINDOW - SKEW) <= 4
    starts = [s for s, _ in recorder.spans]
    assert not [s for s in starts if stopped + 0.05 < s < stopped + SETTLE]  # settling
    assert len([s for s in starts if stopped + SETTLE <= s < restarted]) >= 4  # local shares
    assert len([s for s in starts if s > restarted + 1.0]) >= 4  # global again
    assert a.limiter.snapshot() == b.limiter.snapshot() == IDLE


async def test_after_redis_restarts_both_replicas_return_to_global_by_themselves(
    own_redis: RedisServer, replica: Callable[..., Replica], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = GatewayMetrics(CollectorRegistry())
    gauge = metrics.degraded.labels("redis")
    a = replica(own_redis, on_degraded=lambda down: gauge.set(int(down)))
    b = replica(own_redis)

    def degraded() -> float | None:
        return metrics.registry.get_sample_value("isales_gateway_degraded", {"component": "redis"})

    with caplog.at_level(logging.INFO, logger="gateway.limiter"):
        own_redis.stop()
        await asyncio.gather(*(call(r) for r in (a, b) for _ in range(10)))
        assert a.limiter.mode is b.limiter.mode is Mode.FALLBACK
        assert degraded() == 1
        assert b.degraded == [True]
        own_redis.start()
        began = time.monotonic()
        await until(modes_are(Mode.GLOBAL, a, b), within=3.0)
    assert time.monotonic() - began < 1.0  # a probe each 0.1 s and the 0.4 s gate
    assert degraded() == 0
    assert b.degraded == [True, False]
    assert a.errors > 0
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING] * 2 + [logging.INFO] * 2, lines
    holders = [Holder(r.limiter) for r in (a, b)]
    await asyncio.gather(*(h.started.wait() for h in holders))
    assert await a.client.zcard(a.limiter.shared.keys.leases) == 2  # global permits again
    await finish(*holders)


async def test_during_an_outage_callers_wait_instead_of_failing_and_pay_no_redis_timeout(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=10)
    await call(r)
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)  # a hung Redis: every call waits its timeout
    try:
        outcomes = await asyncio.gather(*(call(r) for _ in range(20)), return_exceptions=True)
        assert outcomes == [None] * 20  # waited (the settle time), no BackendUnavailable
        assert r.limiter.mode is Mode.FALLBACK
        errors, began = r.errors, time.monotonic()
        for _ in range(20):
            await call(r)
        elapsed = time.monotonic() - began
        # Only the probe's pings (one timeout per probe round) failed meanwhile, not each call.
        assert r.errors - errors <= 3
        assert elapsed < 20 * TIMEOUT / 2
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    await until(modes_are(Mode.GLOBAL, r), within=3.0)


async def test_timeouts_and_cancellations_in_fallback_leave_the_whole_local_share_usable(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=2, max_wait_s=0.3)
    own_redis.stop()
    with pytest.raises(QueueTimeout):  # still settling: waited its bound, then a 503, no 500
        await call(r)
    assert r.limiter.mode is Mode.FALLBACK
    assert r.limiter.snapshot() == IDLE
    await asyncio.sleep(SETTLE)
    holders = [Holder(r.limiter) for _ in range(6)]
    await until(lambda: r.limiter.snapshot() == LimiterSnapshot(in_flight=2, queued=4))
    for holder in holders:
        holder.task.cancel()
    await asyncio.gather(*(h.task for h in holders), return_exceptions=True)
    assert r.limiter.snapshot() == IDLE
    late = [Holder(r.limiter) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*(h.started.wait() for h in late)), timeout=WINDOW * 2)
    await finish(*late)
    assert r.limiter.snapshot() == IDLE


async def test_local_permits_held_across_recovery_count_in_redis_until_released(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=3, lease_s=5.0, settle_s=SETTLE)
    own_redis.stop()
    holders = [Holder(r.limiter) for _ in range(2)]
    await asyncio.gather(*(h.started.wait() for h in holders))
    own_redis.start()
    await until(modes_are(Mode.GLOBAL, r), within=3.0)
    keys = r.limiter.shared.keys
    assert await r.client.zcard(keys.leases) == 2  # adopted: other replicas see them
    third = Holder(r.limiter)
    await third.started.wait()
    waiting = Holder(r.limiter)
    await until(lambda: r.limiter.snapshot() == LimiterSnapshot(in_flight=3, queued=1))
    await finish(*holders)  # released locally and in Redis, long before their 5 s lease
    await asyncio.wait_for(waiting.started.wait(), timeout=0.5)
    await finish(third, waiting)
    assert await r.client.zcard(keys.leases) == 0
    assert r.limiter.snapshot() == IDLE


async def test_a_replica_that_never_saw_the_outage_waits_for_the_fleets_common_start(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    fell, unaware = replica(own_redis, replicas=2), replica(own_redis, replicas=2)
    await call(unaware)  # connected; then idle through the outage
    own_redis.stop()
    await call(fell)
    own_redis.start()
    await until(modes_are(Mode.GLOBAL, fell), within=3.0)
    back = time.monotonic()
    await call(unaware)
    # Nobody is granted before the gate: probe_s + window_s after the first adoption, so a
    # replica still on its local share has noticed and registered its permits by then.
    assert time.monotonic() - back >= PROBE + WINDOW - 0.1
    assert unaware.limiter.mode is Mode.GLOBAL
    assert unaware.errors <= 1  # at most its stale pooled connection, retried at once


async def test_adopted_permits_count_in_the_global_budget_and_nothing_is_granted_before_the_gate(
    redis_client: aioredis.Redis,
) -> None:
    limiter = FailoverLimiter(
        redis_client, max_concurrent=2, window_s=WINDOW, max_queue=5, max_wait_s=2.0,
        lease_s=5.0, clock=SystemClock(),
    )  # fmt: skip
    shared, keys = limiter.shared, limiter.shared.keys
    try:
        began = time.monotonic()
        wait = await shared.adopt(["held"], [("held", 0.0), ("done", 0.02)], hold_s=0.1)
        assert 0.05 < wait <= 0.1
        # A later adopter (another replica) gets the first gate, not one of its own.
        assert await shared.adopt([], [], hold_s=5.0) <= wait
        assert await redis_client.zcard(keys.leases) == 1
        assert await redis_client.zcard(keys.starts) == 2
        async with limiter.permit():  # past the gate, once the older adopted start has left
            assert time.monotonic() - began >= WINDOW - 0.05
            assert await redis_client.zcard(keys.leases) == 2
    finally:
        await limiter.close()


async def test_global_permits_still_held_count_against_the_local_share(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=2)
    long_call = Holder(r.limiter)  # outlives the settle time (longer than any real call)
    await long_call.started.wait()
    own_redis.stop()
    others = [Holder(r.limiter) for _ in range(2)]
    await until(lambda: r.limiter.mode is Mode.FALLBACK)
    await asyncio.sleep(SETTLE + WINDOW)
    assert r.limiter.snapshot() == LimiterSnapshot(in_flight=2, queued=1)
    await finish(long_call)
    await asyncio.wait_for(asyncio.gather(*(h.started.wait() for h in others)), timeout=0.5)
    await finish(*others)
    assert r.limiter.snapshot() == IDLE


async def test_in_fallback_a_local_start_counts_from_when_it_was_sent(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=1)
    own_redis.stop()
    late = Holder(r.limiter, send_at_once=False)
    await late.started.wait()  # a local permit, once settled
    assert r.limiter.mode is Mode.FALLBACK
    await asyncio.sleep(0.2)  # a stall between the grant and the send
    late.send.set()
    await until(lambda: late.sent_at > 0)
    await finish(late)
    following = Holder(r.limiter)
    await following.started.wait()
    assert following.granted_at - late.sent_at >= WINDOW - SKEW
    await finish(following)
    assert r.limiter.snapshot() == IDLE


async def test_an_unsent_global_permit_counts_in_the_local_window_and_its_send_is_recorded(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=2)
    unsent = Holder(r.limiter, send_at_once=False)  # global; may go out during the outage
    await unsent.started.wait()
    own_redis.stop()
    first = Holder(r.limiter)
    await until(lambda: first.sent_at > 0, within=SETTLE + 1.0)
    assert r.limiter.mode is Mode.FALLBACK
    await finish(first)
    second = Holder(r.limiter)
    await second.started.wait()
    # The unsent global start and the first local one fill the local share's window.
    assert second.granted_at - first.sent_at >= WINDOW - SKEW
    await until(lambda: second.sent_at > 0)
    await finish(second)
    await asyncio.sleep(0.05)
    unsent.send.set()  # sent during the outage: Redis cannot hear of it, the local window does
    await until(lambda: unsent.sent_at > 0)
    third = Holder(r.limiter)
    await third.started.wait()
    assert third.granted_at - second.sent_at >= WINDOW - SKEW
    await finish(unsent, third)
    assert r.limiter.snapshot() == IDLE


async def test_a_local_start_still_unsent_at_recovery_is_adopted_pending_and_recorded_when_sent(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, max_concurrent=3, lease_s=5.0, settle_s=SETTLE)
    own_redis.stop()
    holder = Holder(r.limiter, send_at_once=False)
    await holder.started.wait()
    own_redis.start()
    await until(modes_are(Mode.GLOBAL, r), within=3.0)
    starts = r.limiter.shared.keys.starts

    async def start_score_vs_redis_now() -> tuple[float, float]:
        members = await r.client.zrange(starts, 0, -1, withscores=True)
        assert len(members) == 1
        seconds, micros = await r.client.time()
        return float(members[0][1]), float(seconds) * 1000 + float(micros) / 1000

    score, now = await start_score_vs_redis_now()
    assert score > now + 1000, "pending: it counts in the window until it is sent"
    holder.send.set()

    async def recorded() -> bool:
        score, now = await start_score_vs_redis_now()
        return score <= now

    await until(recorded)
    await finish(holder)
    assert r.limiter.snapshot() == IDLE
