"""The limiter never fails open: Redis dies, refuses writes, loses its data or is cut off from
one replica, and the fleet keeps the combined limit, falling back to local shares and coming
back to the global limit by itself.

Each test runs a redis-server of its own (stopped, frozen, flushed and restarted on the same
port); the session's server is never touched. Short settings: a 0.3 s window, a 0.3 s lease,
a heartbeat every 0.1 s, claims valid 0.2 s, a probe every 0.1 s and a 0.2 s Redis client
timeout: a replica cut off settles ``SETTLE`` = 0.2 + 0.3 + 0.3 + 0.3 = 1.1 s after its
latest claim; a new epoch holds grants ``HOLD`` = lease + window = 0.6 s.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.app import limiter_lease_s
from gateway.clock import SystemClock
from gateway.errors import PermitLost, QueueTimeout
from gateway.limiter import FleetTimings, LimitConfig, LimiterSnapshot
from gateway.limiter.failover import FailoverLimiter, Mode, settle_time
from gateway.limiter.redis_limiter import RedisLimiter
from gateway.metrics import GatewayMetrics
from gateway.settings import load_settings
from tests.support.processes import RedisServer
from tests.support.waiting import WITHIN_S, until
from tests.test_limiter_contract import IDLE, SKEW, Holder, Recorder, finish

WINDOW, LEASE, BEAT, CLAIM, PROBE, TIMEOUT = 0.3, 0.3, 0.1, 0.2, 0.1, 0.2
TIMINGS = FleetTimings(lease_s=LEASE, beat_s=BEAT, claim_s=CLAIM, skew_s=0.0)
SETTLE = settle_time(TIMINGS, WINDOW)
HOLD = LEASE + WINDOW
LIMIT = LimitConfig(max_concurrent=4, window_s=WINDOW, max_queue=50, max_wait_s=5.0)


def limit(**changes: Any) -> LimitConfig:
    """This file's limit, with ``changes``."""
    return replace(LIMIT, **changes)


class Replica:
    """One gateway replica's limiter on its own short-timeout client, with what it reported."""

    def __init__(
        self,
        server: RedisServer,
        config: LimitConfig = LIMIT,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = aioredis.Redis.from_url(
            server.url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 1),  # as the app's client: one quick retry
        )
        self.errors = 0
        self.degraded: list[bool] = []
        self.limiter = FailoverLimiter(
            self.client,
            config,
            TIMINGS,
            clock=SystemClock(),
            probe_s=PROBE,
            on_error=self._count_error,
            on_degraded=on_degraded or self.degraded.append,
        )

    def _count_error(self) -> None:
        self.errors += 1

    async def close(self) -> None:
        await self.limiter.close()
        await self.client.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone, free to stop, freeze and restart; its limiter
    state starts known-empty (a restart later loses it for real).
    """
    server = RedisServer().start()
    server.flush()
    yield server
    if server.proc is not None:
        server.proc.send_signal(signal.SIGCONT)  # a frozen server would not hear SIGTERM
    server.close()


@pytest.fixture
async def replica() -> AsyncIterator[Callable[..., Replica]]:
    made: list[Replica] = []

    def make(server: RedisServer, *args: Any, **kwargs: Any) -> Replica:
        made.append(Replica(server, *args, **kwargs))
        made[-1].limiter.start()
        return made[-1]

    yield make
    for one in made:
        await one.close()


def modes_are(mode: Mode, *replicas: Replica) -> Callable[[], bool]:
    return lambda: all(r.limiter.mode is mode for r in replicas)


async def call(replica: Replica, hold: float = 0.0) -> None:
    async with replica.limiter.permit():
        await asyncio.sleep(hold)


# The rules, without I/O.


def test_a_cut_off_replica_settles_until_the_fleet_surely_counts_it_gone() -> None:
    # claim may land late + clocks + counted a member three beats + its grants end + window
    timings = FleetTimings(lease_s=24, beat_s=0.5, claim_s=1, skew_s=0.5)
    assert settle_time(timings, window_s=1.1) == 28.1


def test_the_defaults_keep_the_fallbacks_settle_time_within_the_wait_bound() -> None:
    s = load_settings(None, {}, require_upstream=False)
    lease = limiter_lease_s(s)
    assert lease == 1 + (s.upstream.connect_timeout_ms + s.upstream.timeout_ms) / 1000 + (
        s.upstream.abandoned_hold_ms / 1000
    )
    window = (s.limit.window_ms + s.limit.margin_ms) / 1000
    timings = FleetTimings(lease_s=lease, beat_s=0.5, claim_s=1.0, skew_s=0.5)
    settle = settle_time(timings, window)
    assert settle <= s.limit.max_wait_ms / 1000


# Whole outages.


async def test_two_replicas_keep_the_combined_limit_while_redis_dies_and_comes_back_empty(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    a, b = replica(own_redis, limit(replicas=2)), replica(own_redis, limit(replicas=2))
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
    await asyncio.sleep(0.5)  # the load runs in global mode for a while, then Redis goes
    stopping = time.monotonic()
    own_redis.stop()  # blocks this loop until Redis has exited (under load: a while)
    stopped = time.monotonic()
    await until(modes_are(Mode.FALLBACK, a, b))
    await asyncio.sleep(SETTLE + 0.6)  # the load runs on the local shares for a while
    own_redis.start()  # empty: the limiter's state is lost
    restarted = time.monotonic()
    await until(
        modes_are(Mode.GLOBAL, a, b),
    )
    await asyncio.sleep(HOLD + 0.6)  # and in global mode again, on an empty Redis
    running = False
    await asyncio.gather(*workers)

    assert failures == []
    assert recorder.max_in_flight() <= 4
    assert recorder.max_starts_within(WINDOW - SKEW) <= 4
    starts = [s for s, _ in recorder.spans]
    # Settling: the latest claim was at most a beat before the stop began; what Redis granted
    # before it died may be recorded once the loop runs again.
    assert not [s for s in starts if stopped + 0.05 < s < stopping + SETTLE - BEAT - SKEW]
    assert len([s for s in starts if stopped + SETTLE <= s < restarted]) >= 4  # local shares
    assert len([s for s in starts if s > restarted + HOLD + 0.3]) >= 4  # global again
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
        await until(modes_are(Mode.GLOBAL, a, b))  # by their probes: nothing else is asked
    assert degraded() == 0
    assert b.degraded == [True, False]
    assert a.errors > 0
    lines = [r.getMessage() for r in caplog.records]
    assert sum("Redis unavailable" in line for line in lines) == 2, lines
    assert sum("Redis is back" in line for line in lines) == 2, lines
    holders = [Holder(r.limiter) for r in (a, b)]
    await asyncio.gather(*(h.started.wait() for h in holders))
    assert await a.client.zcard(a.limiter.shared.keys.leases) == 2  # global permits again
    await finish(*holders)


async def test_during_an_outage_callers_wait_instead_of_failing_and_pay_no_redis_timeout(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=10))
    await call(r)
    assert own_redis.proc is not None
    own_redis.proc.send_signal(signal.SIGSTOP)  # a hung Redis: every call waits its timeout
    try:
        outcomes = await asyncio.gather(*(call(r) for _ in range(20)), return_exceptions=True)
        assert outcomes == [None] * 20  # waited (the settle time), no BackendUnavailable
        assert r.limiter.mode is Mode.FALLBACK
        errors = r.errors
        for _ in range(20):
            await call(r)
        # Only the probe's writes (one timeout per probe round) failed meanwhile, not each call:
        # a call that went to the frozen Redis would have paid, and counted, a timeout.
        assert r.errors - errors <= 3
        assert r.limiter.mode is Mode.FALLBACK
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
    await until(
        modes_are(Mode.GLOBAL, r),
    )


async def test_timeouts_and_cancellations_in_fallback_leave_the_whole_local_share_usable(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=2, max_wait_s=0.3))
    own_redis.stop()
    with pytest.raises(QueueTimeout):  # still settling: waited its bound, then a 503, no 500
        await call(r)
    assert r.limiter.mode is Mode.FALLBACK
    assert r.limiter.snapshot() == IDLE
    await asyncio.sleep(SETTLE)  # settled (real time: the fleet must count this replica gone)
    holders = [Holder(r.limiter) for _ in range(6)]
    await until(lambda: r.limiter.snapshot() == LimiterSnapshot(in_flight=2, queued=4))
    for holder in holders:
        holder.task.cancel()
    await asyncio.gather(*(h.task for h in holders), return_exceptions=True)
    assert r.limiter.snapshot() == IDLE
    late = [Holder(r.limiter) for _ in range(2)]
    await until(lambda: all(h.started.is_set() for h in late), "a leaked permit blocks for good")
    await finish(*late)
    assert r.limiter.snapshot() == IDLE


async def test_a_replica_rejoins_only_once_its_local_permits_have_ended_and_left_the_window(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=3))
    own_redis.stop()
    holder = Holder(r.limiter)  # a local permit, once settled
    await holder.started.wait()
    own_redis.start()
    await until(
        modes_are(Mode.RECOVERING, r),
    )
    await asyncio.sleep(0.3)  # several recovery checks' time, with the local permit held
    assert r.limiter.mode is Mode.RECOVERING  # not counted in Redis: it must end first
    await finish(holder)
    ended = time.monotonic()
    await until(
        modes_are(Mode.GLOBAL, r),
    )
    assert time.monotonic() - ended >= WINDOW - SKEW - (ended - holder.sent_at)
    assert r.limiter.snapshot() == IDLE


# Partial failures: one replica cut off, a Redis that refuses writes or lost its data.


async def test_the_fleet_sets_aside_the_share_of_a_replica_it_does_not_hear_from(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    # Two replicas of four permits: each may use 2 on its own when cut off from Redis.
    a = replica(own_redis, limit(replicas=2, max_wait_s=0.4))
    held = [Holder(a.limiter) for _ in range(2)]
    await asyncio.gather(*(h.started.wait() for h in held))
    with pytest.raises(QueueTimeout):  # the silent replica's share is not the fleet's
        await call(a)
    b = replica(own_redis, limit(replicas=2))  # heard from now: its share is back in the pool
    await until(lambda: a.limiter.shared.members == 2)
    more = [Holder(a.limiter) for _ in range(2)]
    await until(lambda: all(h.started.is_set() for h in more), "the share is back in the pool")
    await finish(*held, *more)
    await b.close()


async def test_a_redis_that_refuses_writes_sends_replicas_to_their_share_on_time(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    primary = RedisServer().start()
    try:
        r = replica(own_redis, limit(max_concurrent=2))
        await call(r)
        admin = aioredis.Redis(port=own_redis.port)
        await admin.replicaof("127.0.0.1", primary.port)  # PING answers; writes are refused
        holder = Holder(r.limiter)
        # Failed probes (READONLY) every 0.1 s meanwhile did not postpone the local share: each
        # would postpone it past the next one, for good (this waits many settle times).
        await until(holder.started.is_set, "the local share is granted")
        assert r.limiter.mode is Mode.FALLBACK
        await finish(holder)
        await admin.replicaof("NO", "ONE")
        await until(
            modes_are(Mode.GLOBAL, r),
        )
        await asyncio.wait_for(call(r), WITHIN_S)  # the synced state was empty
        await admin.aclose()
    finally:
        primary.close()


async def test_a_heartbeat_that_reaches_redis_late_claims_nothing(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=TIMEOUT)
    limiter = RedisLimiter(
        client,
        limit(max_concurrent=2, max_queue=5, max_wait_s=1.0),
        FleetTimings(lease_s=LEASE, claim_s=CLAIM),
        clock=SystemClock(),
    )
    admin = aioredis.Redis(port=own_redis.port)
    try:
        await admin.client_pause(600, all=False)  # writes (scripts too) wait 0.6 s
        with pytest.raises(Exception):  # noqa: B017, PT011 - a client timeout, of some kind
            await limiter.beat()
        await admin.set("after-the-pause", 1)  # a write: it runs after the paused script
        # The script ran after the pause, past its "not after": no membership was claimed.
        assert await admin.zscore(limiter.keys.members, limiter.replica) is None
        await limiter.beat()
        assert await admin.zscore(limiter.keys.members, limiter.replica) is not None
    finally:
        await limiter.close()
        await client.aclose()
        await admin.aclose()


async def test_a_flushed_redis_grants_nothing_until_every_older_lease_has_lapsed(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=2))
    unsent = Holder(r.limiter, send_at_once=False)
    await unsent.started.wait()
    admin = aioredis.Redis(port=own_redis.port)
    await admin.flushall()
    flushed = time.monotonic()
    waiting = Holder(r.limiter)
    await until(waiting.started.is_set, "granted in the new epoch")
    # Not before the new epoch's gate: the lease and the window of any permit nobody saw.
    assert time.monotonic() - flushed >= HOLD - SKEW
    assert r.limiter.mode is Mode.GLOBAL  # lost data is no outage: no fallback share
    await finish(unsent, waiting)
    await admin.aclose()


async def test_a_permit_of_a_lost_epoch_or_not_used_in_time_may_not_be_sent(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    limiter = RedisLimiter(
        client,
        limit(max_concurrent=2, max_queue=5, max_wait_s=2.0),
        FleetTimings(lease_s=LEASE, fence_s=0.2),
        clock=SystemClock(),
    )
    try:
        async with limiter.permit() as permit:
            permit.check()  # fresh
            await asyncio.sleep(0.25)  # the caller stalls past the fence
            with pytest.raises(PermitLost):  # frozen past its fence: its lease may be gone
                permit.check()
        async with limiter.permit() as permit:
            await client.flushall()
            await limiter.beat()  # learns of the new epoch
            with pytest.raises(PermitLost):
                permit.check()
    finally:
        await limiter.close()
        await client.aclose()


# Accounting on the local share.


async def test_global_permits_still_held_count_against_the_local_share(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=2))
    long_call = Holder(r.limiter)  # outlives the settle time (longer than any real call)
    await long_call.started.wait()
    own_redis.stop()
    others = [Holder(r.limiter) for _ in range(2)]
    await until(lambda: r.limiter.mode is Mode.FALLBACK)
    await asyncio.sleep(SETTLE + WINDOW)  # settled, and a window: only the held permit blocks
    assert r.limiter.snapshot() == LimiterSnapshot(in_flight=2, queued=1)
    await finish(long_call)
    await until(lambda: all(h.started.is_set() for h in others), "the local share is free")
    await finish(*others)
    assert r.limiter.snapshot() == IDLE


async def test_in_fallback_a_local_start_counts_from_when_it_was_sent(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=1))
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


async def test_an_unsent_global_permit_counts_in_the_local_window(
    own_redis: RedisServer, replica: Callable[..., Replica]
) -> None:
    r = replica(own_redis, limit(max_concurrent=2))
    unsent = Holder(r.limiter, send_at_once=False)  # global; may go out during the outage
    await unsent.started.wait()
    own_redis.stop()
    first = Holder(r.limiter)
    await until(lambda: first.sent_at > 0)
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
