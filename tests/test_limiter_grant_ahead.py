"""Granted ahead of the window's edge, sent not before it: the hold in ``Permit.sent()``.

A start leaving the window within ``grant_ahead_s`` counts as gone for a grant, and the
permit granted in its place holds its request in ``sent()`` until that start has left. These
cases run on the injected clock (the hold is a timer on it), with a start put into Redis's
window by hand so that it leaves within ``ahead`` of the acquire that follows; what must hold
whatever happens during the hold: nothing is sent before the edge, and a permit that lapsed
while held (the fence, a lost epoch) is lost, not sent.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from gateway.clock import ManualClock, SystemClock, TimerHandle
from gateway.errors import PermitLost
from gateway.limiter import FleetTimings, LimitConfig, Permit
from gateway.limiter.failover import FailoverLimiter
from gateway.limiter.memory import InMemoryLimiter
from gateway.limiter.redis_limiter import RedisLimiter, RedisPermit
from gateway.limiter.redis_scripts import LimiterKeys
from tests.support.waiting import until

WINDOW_S = 3.0
AHEAD_S = 0.3  # a tenth of the window: the most allowed
# The start put in by hand leaves this long after it is put: the acquire that follows must run
# within it (a bound for a stalled machine, never a speed claim), so it grants ahead.
LEAVES_IN_S = 0.25
ONE = LimitConfig(
    max_concurrent=1, window_s=WINDOW_S, max_queue=5, max_wait_s=60.0, grant_ahead_s=AHEAD_S
)
TIMINGS = FleetTimings(lease_s=30.0, fence_s=1.0)
KEYS = LimiterKeys.for_namespace("isales:v1")


async def settle() -> None:
    """Let every task that can run without the clock moving run."""
    for _ in range(20):
        await asyncio.sleep(0)


async def redis_ms(client: aioredis.Redis) -> float:
    seconds, micros = await client.time()
    return seconds * 1000 + micros / 1000


async def start_leaving_soon(client: aioredis.Redis) -> float:
    """Put one sent start in the window that leaves ``LEAVES_IN_S`` from now (Redis's clock);
    its exit, in Redis ms."""
    now = await redis_ms(client)
    sent = now - WINDOW_S * 1000 + LEAVES_IN_S * 1000
    await client.zadd(KEYS.starts, {"earlier\nstart": sent})
    return sent + WINDOW_S * 1000


class Taker:
    """Takes a permit, calls ``sent()`` when told, keeps the permit until ``done``."""

    def __init__(self, limiter: InMemoryLimiter | RedisLimiter | FailoverLimiter) -> None:
        self.granted = asyncio.Event()
        self.send = asyncio.Event()
        self.done = asyncio.Event()
        self.went_out = asyncio.Event()
        self.permit: Permit | None = None
        self.failure: BaseException | None = None
        self.task = asyncio.create_task(self._run(limiter))
        self.sending: asyncio.Task[None] | None = None

    async def _run(self, limiter: InMemoryLimiter | RedisLimiter | FailoverLimiter) -> None:
        async with limiter.permit() as permit:
            self.permit = permit
            self.granted.set()
            await self.send.wait()
            self.sending = asyncio.create_task(self._send(permit))
            await self.done.wait()
            if not self.sending.done():
                self.sending.cancel()
            await asyncio.gather(self.sending, return_exceptions=True)

    async def _send(self, permit: Permit) -> None:
        try:
            await permit.sent()
        except PermitLost as exc:
            self.failure = exc
            return
        self.went_out.set()

    async def finish(self) -> None:
        self.send.set()
        self.done.set()
        await self.task


async def sent_at_zero(clock: ManualClock) -> InMemoryLimiter:
    """An in-memory limiter on ``clock`` whose one permit was sent at 0 and given back: that
    start leaves the window at ``WINDOW_S``."""
    limiter = InMemoryLimiter(ONE, clock=clock)
    first = Taker(limiter)
    await first.granted.wait()
    first.send.set()
    await first.went_out.wait()
    await first.finish()
    return limiter


async def holding(taker: Taker) -> None:
    """Tell ``taker`` to send, and return once its ``sent()`` runs (and holds, if ahead)."""
    taker.send.set()
    await until(lambda: taker.sending is not None)
    await settle()


def wall_clock() -> ManualClock:
    """A manual clock from now: heartbeats carry a wall-clock "not after"."""
    return ManualClock(time.time())


@pytest.fixture
async def limiters() -> AsyncIterator[list[RedisLimiter | FailoverLimiter]]:
    made: list[RedisLimiter | FailoverLimiter] = []
    yield made
    for limiter in made:
        await limiter.close()


# The in-memory limiter, on its own clock.


async def test_a_permit_granted_ahead_is_held_on_the_injected_clock_until_the_edge() -> None:
    clock = ManualClock()
    limiter = await sent_at_zero(clock)
    second = Taker(limiter)
    second.send.set()
    clock.advance(WINDOW_S - AHEAD_S - 0.01)
    await settle()
    assert not second.granted.is_set()  # not yet within ahead of the edge
    clock.advance(0.01)
    await settle()
    assert second.granted.is_set()  # granted ahead...
    clock.advance(AHEAD_S - 0.001)
    await settle()
    assert not second.went_out.is_set()  # ...and held until the edge
    clock.advance(0.001)
    await settle()
    assert second.went_out.is_set()
    assert limiter.snapshot().fleet_starts == 1  # the first start has left: only its own
    await second.finish()


class LoopTimerClock(ManualClock):
    """A manual clock whose timers wake as the event loop's do: at the whole millisecond after
    they are due (epoll's unit, rounded up) plus a millisecond's wake-up."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        due = self.monotonic() + max(0.0, delay)
        woken = math.ceil(due * 1000) / 1000 + 0.001
        return super().call_later(woken - self.monotonic(), callback)


async def test_a_held_permit_goes_out_in_the_loop_pass_past_its_edge_not_a_timer_tick_later() -> (
    None
):
    clock = LoopTimerClock()
    limiter = await sent_at_zero(clock)
    second = Taker(limiter)
    second.send.set()
    clock.advance(WINDOW_S - AHEAD_S)
    await settle()
    assert second.granted.is_set()
    assert second.permit is not None
    edge = second.permit.not_before
    step = 0.0001
    while not second.went_out.is_set():
        before = clock.monotonic()
        clock.advance(step)
        await settle()
    assert before < edge <= clock.monotonic()  # never before the edge...
    assert clock.monotonic() < edge + step  # ...and out in the step that passed it
    await second.finish()


async def test_a_permit_cancelled_during_its_hold_counts_its_start_from_the_edge() -> None:
    clock = ManualClock()
    limiter = await sent_at_zero(clock)
    second = Taker(limiter)
    clock.advance(WINDOW_S - AHEAD_S)
    await holding(second)
    second.done.set()  # the caller leaves during the hold: nothing went out
    await second.task
    assert not second.went_out.is_set()
    third = Taker(limiter)
    third.send.set()
    # Counted from the edge (WINDOW_S), the second's start lets the third in only ahead of
    # 2 * WINDOW_S; counted from its release (WINDOW_S - AHEAD_S) it would be AHEAD_S sooner.
    clock.advance(WINDOW_S - 0.001)
    await settle()
    assert not third.granted.is_set()
    clock.advance(0.001)
    await settle()
    assert third.granted.is_set()
    await third.finish()


# The Redis limiter: the edge on Redis's clock, the hold on the replica's.


async def granted_ahead(
    client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter], clock: ManualClock
) -> tuple[RedisLimiter, Taker, float]:
    """A Redis limiter on ``clock`` whose one permit was granted ahead of the window's edge
    (a start leaving soon put in first): the limiter, its taker, the edge in Redis ms."""
    limiter = RedisLimiter(client, ONE, TIMINGS, clock=clock)
    limiters.append(limiter)
    edge = await start_leaving_soon(client)
    taker = Taker(limiter)
    await taker.granted.wait()
    assert isinstance(taker.permit, RedisPermit)
    assert taker.permit.not_before > clock.monotonic()  # granted ahead: it holds
    return limiter, taker, edge


async def test_a_redis_permit_granted_ahead_is_held_until_its_edge_on_the_injected_clock(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    clock = wall_clock()
    _, taker, _ = await granted_ahead(redis_client, limiters, clock)
    assert isinstance(taker.permit, RedisPermit)
    hold = taker.permit.not_before - clock.monotonic()
    assert 0 < hold <= LEAVES_IN_S  # from the reply's arrival: the edge's distance, no less
    taker.send.set()
    await settle()
    clock.advance(hold * 0.99)
    await settle()
    assert not taker.went_out.is_set()
    clock.advance(hold * 0.02)
    await until(taker.went_out.is_set)
    await taker.finish()


async def test_a_redis_permit_cancelled_during_its_hold_counts_its_start_from_the_edge(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    clock = wall_clock()
    _, taker, edge = await granted_ahead(redis_client, limiters, clock)
    await holding(taker)
    assert taker.permit is not None
    lease = taker.permit.lease if isinstance(taker.permit, RedisPermit) else ""
    taker.done.set()  # the caller leaves during the hold
    await taker.task
    assert not taker.went_out.is_set()
    await until(lambda: _released(redis_client, lease), "the release landed")
    start = await redis_client.zscore(KEYS.starts, lease)
    assert start is not None
    assert start >= edge  # never counted before the edge


async def _released(client: aioredis.Redis, lease: str) -> bool:
    return await client.zscore(KEYS.leases, lease) is None


async def lost_not_sent(taker: Taker) -> None:
    """``taker``'s held permit ends in ``PermitLost``, and nothing went out on it."""
    await until(lambda: taker.sending is not None and taker.sending.done())
    assert isinstance(taker.failure, PermitLost)
    assert not taker.went_out.is_set()
    await taker.finish()


async def test_a_redis_permit_held_past_the_fence_is_lost_not_sent(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    clock = wall_clock()
    _, taker, _ = await granted_ahead(redis_client, limiters, clock)
    await holding(taker)
    clock.advance(TIMINGS.fence_s + 0.01)  # frozen through the hold and past the fence
    await lost_not_sent(taker)


async def test_a_redis_permit_whose_epoch_is_lost_during_its_hold_is_lost_not_sent(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    clock = wall_clock()
    limiter, taker, _ = await granted_ahead(redis_client, limiters, clock)
    await holding(taker)
    await redis_client.flushall()  # Redis restarted empty during the hold
    await limiter.beat()  # the replica learns of the new epoch
    assert isinstance(taker.permit, RedisPermit)
    clock.advance(taker.permit.not_before - clock.monotonic())
    await lost_not_sent(taker)


async def test_two_replicas_cannot_both_grant_ahead_for_the_same_edge(
    redis_client: aioredis.Redis,
    second_client: aioredis.Redis,
    limiters: list[RedisLimiter | FailoverLimiter],
) -> None:
    clock = wall_clock()
    _, taker, _ = await granted_ahead(redis_client, limiters, clock)
    other = RedisLimiter(second_client, ONE, TIMINGS, clock=clock)
    limiters.append(other)
    waiting = Taker(other)

    async def its_try_ran() -> bool:  # its demand is in Redis: its acquire found no room
        return int(await redis_client.zcard(KEYS.demand)) == 1

    await until(its_try_ran, "the other replica's try")
    assert not waiting.granted.is_set()
    assert int(await redis_client.zcard(KEYS.leases)) == 1
    await taker.finish()
    waiting.task.cancel()
    await asyncio.gather(waiting.task, return_exceptions=True)


async def test_the_failover_limiter_holds_a_global_permit_granted_ahead_until_its_edge(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    clock = wall_clock()
    limiter = FailoverLimiter(redis_client, ONE, TIMINGS, clock=clock)
    limiters.append(limiter)
    await start_leaving_soon(redis_client)
    taker = Taker(limiter)
    await taker.granted.wait()
    taker.send.set()
    await settle()
    assert not taker.went_out.is_set()  # held: the clock has not moved
    clock.advance(LEAVES_IN_S)
    await until(taker.went_out.is_set)
    await taker.finish()


# The start's record: the sooner of Redis's time less the time since, and the grant's time plus it.


async def recorded_start(client: aioredis.Redis, taker: Taker, ceiling: float) -> float:
    """``taker``'s start as Redis recorded it, once recorded (a pending one is scored a lease
    ahead, past ``ceiling``, Redis ms)."""
    assert isinstance(taker.permit, RedisPermit)
    lease = taker.permit.lease

    async def landed() -> bool:
        score = await client.zscore(KEYS.starts, lease)
        return score is not None and score < ceiling

    await until(landed, "the start's record")
    score = await client.zscore(KEYS.starts, lease)
    assert score is not None
    return float(score)


async def test_a_start_whose_record_reaches_redis_late_counts_from_its_grant_not_the_record(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    clock = wall_clock()  # the replica's clock does not move: the request goes out at its grant
    limiter = RedisLimiter(redis_client, ONE, TIMINGS, clock=clock)
    limiters.append(limiter)
    taker = Taker(limiter)
    await taker.granted.wait()
    granted = await redis_ms(redis_client)
    await asyncio.sleep(0.05)  # the record reaches Redis later (a busy loop, a pool wait)
    taker.send.set()
    await until(taker.went_out.is_set)
    start = await recorded_start(redis_client, taker, granted + TIMINGS.lease_s * 500)
    assert start <= granted  # Redis's time at the record (>= granted + 50) would be too late
    await taker.finish()


async def test_a_start_recorded_from_its_grant_is_never_before_it_went_out(
    redis_client: aioredis.Redis, limiters: list[RedisLimiter | FailoverLimiter]
) -> None:
    limiter = RedisLimiter(redis_client, ONE, TIMINGS, clock=SystemClock())
    limiters.append(limiter)
    taker = Taker(limiter)
    await taker.granted.wait()
    await asyncio.sleep(0.05)
    before_send = await redis_ms(redis_client)
    taker.send.set()
    await until(taker.went_out.is_set)
    start = await recorded_start(redis_client, taker, before_send + TIMINGS.lease_s * 500)
    assert start >= before_send
    await taker.finish()


@pytest.fixture
async def second_client(redis_client: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    kwargs = redis_client.connection_pool.connection_kwargs
    client = aioredis.Redis(host=kwargs.get("host", "localhost"), port=kwargs["port"])
    yield client
    await client.aclose()
