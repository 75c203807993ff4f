"""The limiter contract, run on real time against every implementation, then Redis's own
promises: one budget for several replicas, fair turns, leases that outlive crashes.

Short windows (0.15-0.3 s) keep it quick. Starts are measured inside the permit, a little after
the limiter counted them, so window checks allow ``SKEW`` for that measuring lag. A start counts
from the permit's ``sent()`` (or its release, if never sent), not from the grant.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from gateway.clock import Clock, ManualClock, SystemClock
from gateway.errors import BackendUnavailable, QueueFull, QueueTimeout
from gateway.limiter import ANONYMOUS, FleetTimings, LimitConfig, Limiter, LimiterSnapshot, Permit
from gateway.limiter.failover import FailoverLimiter
from gateway.limiter.memory import InMemoryLimiter
from gateway.limiter.redis_limiter import RedisLimiter
from gateway.limiter.scheduler import CallerPolicy
from tests.support.processes import RedisServer, free_port
from tests.support.waiting import WITHIN_S, until

SKEW = 0.015
IDLE = LimiterSnapshot(in_flight=0, queued=0)
Build = Callable[..., Any]


LIMIT = LimitConfig(max_concurrent=3, window_s=0.3, max_queue=50, max_wait_s=5.0)
LEASES = FleetTimings(lease_s=5.0)
# Under these a leaked Redis lease never lapses within a test (the in-memory limiter has no
# leases: a leaked permit is leaked for good).
LASTING = FleetTimings(lease_s=3600.0)


def limit(**changes: Any) -> LimitConfig:
    """The contract's limit, with ``changes``."""
    return replace(LIMIT, **changes)


def redis_limiter(
    client: aioredis.Redis,
    config: LimitConfig = LIMIT,
    timings: FleetTimings = LEASES,
    *,
    clock: Clock | None = None,
    namespace: str = "isales:v1",
) -> RedisLimiter:
    return RedisLimiter(client, config, timings, clock=clock or SystemClock(), namespace=namespace)


@pytest.fixture
async def closing() -> AsyncIterator[list[RedisLimiter | FailoverLimiter]]:
    made: list[RedisLimiter | FailoverLimiter] = []
    yield made
    for limiter in made:
        await limiter.close()


@pytest.fixture
async def second_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """Another replica's own connection to the same Redis."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis", "failover"])
def build(request: pytest.FixtureRequest) -> Build:
    """Builds the implementation under test: the contract's limit unless given one, on the
    system clock unless given one (``timings``: the fleet-wide ones' leases, heartbeats)."""
    if request.param == "memory":
        return lambda config=LIMIT, timings=LEASES, clock=None: InMemoryLimiter(
            config, clock=clock or SystemClock()
        )  # no shared state: ``timings`` do not apply
    client = request.getfixturevalue("redis_client")
    closing = request.getfixturevalue("closing")  # set up after the client: closed before it
    kind = RedisLimiter if request.param == "redis" else FailoverLimiter

    def make(
        config: LimitConfig = LIMIT, timings: FleetTimings = LEASES, clock: Clock | None = None
    ) -> RedisLimiter | FailoverLimiter:
        limiter = kind(client, config, timings, clock=clock or SystemClock())
        closing.append(limiter)
        return limiter

    return make


def permit_of(
    limiter: Limiter, caller: str | None, background: bool = False
) -> AbstractAsyncContextManager[Permit]:
    """``permit()`` as the caller-blind tests call it, or with a caller (and background)."""
    if caller is None and not background:
        return limiter.permit()
    return limiter.permit(caller or ANONYMOUS, background=background)


@pytest.fixture
def fair_build(build: Build) -> Build:
    """``build`` for the per-caller promises (every backend schedules per caller)."""
    return build


def policies(**table: CallerPolicy) -> Callable[[str], CallerPolicy]:
    return lambda caller: table.get(caller, CallerPolicy())


class Recorder:
    """Runs callers through a limiter and records when each permit's body ran."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self.order: list[Any] = []

    async def call(
        self, limiter: Limiter, hold: float = 0.0, name: Any = None, caller: str | None = None
    ) -> None:
        async with permit_of(limiter, caller) as permit:
            await permit.sent()
            start = time.monotonic()
            self.order.append(name)
            await asyncio.sleep(hold)
            self.spans.append((start, time.monotonic()))

    def max_in_flight(self) -> int:
        events = sorted([(s, 1) for s, _ in self.spans] + [(e, -1) for _, e in self.spans])
        level = peak = 0
        for _, step in events:  # at a tie an end sorts first: never over-counts
            level += step
            peak = max(peak, level)
        return peak

    def max_starts_within(self, window: float) -> int:
        starts = sorted(s for s, _ in self.spans)
        return max(sum(1 for t in starts[i:] if t < s + window) for i, s in enumerate(starts))


class Holder:
    """A caller that takes a permit, sends at once unless told to wait (``send``), and keeps it
    until ``done`` is set. ``sent_at`` and ``released_at`` are when those happened.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        send_at_once: bool = True,
        caller: str | None = None,
        background: bool = False,
    ) -> None:
        self.caller = caller
        self.background = background
        self.started = asyncio.Event()
        self.send = asyncio.Event()
        self.done = asyncio.Event()
        self.granted_at = self.sent_at = self.released_at = 0.0
        if send_at_once:
            self.send.set()
        self.task = asyncio.create_task(self._run(limiter))

    async def _run(self, limiter: Limiter) -> None:
        async with permit_of(limiter, self.caller, self.background) as permit:
            self.granted_at = time.monotonic()
            self.started.set()
            sending = asyncio.create_task(self._send_when_told(permit))
            await self.done.wait()
            sending.cancel()
            self.released_at = time.monotonic()

    async def _send_when_told(self, permit: Permit) -> None:
        await self.send.wait()
        self.sent_at = time.monotonic()
        await permit.sent()


def queued_is(limiter: Limiter, count: int) -> Callable[[], bool]:
    return lambda: limiter.snapshot().queued == count


def paused_commands(client: aioredis.Redis, count: int) -> Callable[[], Awaitable[bool]]:
    """``until``'s check: ``count`` commands wait on a ``CLIENT PAUSE`` (Redis counts them as
    blocked clients)."""

    async def check() -> bool:
        return int((await client.info("clients"))["blocked_clients"]) >= count

    return check


def zcard_is(client: aioredis.Redis, key: str, size: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int(await client.zcard(key)) == size

    return check


async def finish(*holders: Holder) -> None:
    for holder in holders:
        holder.done.set()
    await asyncio.gather(*(h.task for h in holders))


# The contract: every implementation.


async def test_in_flight_and_starts_per_window_stay_within_the_limit_under_load(
    build: Build,
) -> None:
    limiter = build()
    recorder = Recorder()
    holds = [0.35, 0.0, 0.05] * 4  # long holds bind the concurrency, short ones the window
    await asyncio.gather(*(recorder.call(limiter, hold) for hold in holds))
    assert len(recorder.spans) == 12
    assert recorder.max_in_flight() <= 3
    assert recorder.max_starts_within(0.3 - SKEW) == 3
    assert limiter.snapshot() == IDLE


async def test_callers_that_queue_in_order_are_granted_in_order(build: Build) -> None:
    limiter = build(limit(max_concurrent=1, window_s=0.05))
    recorder = Recorder()
    first = Holder(limiter)
    await first.started.wait()
    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(recorder.call(limiter, name=i)))
        await until(queued_is(limiter, i + 1))
    await finish(first)
    await asyncio.gather(*tasks)
    assert recorder.order == [0, 1, 2, 3, 4]


async def test_a_full_local_queue_rejects_at_once_with_a_retry_after(build: Build) -> None:
    # Nothing frees a place and the wait bound is an hour: only the full queue can answer.
    limiter = build(limit(max_concurrent=1, max_queue=2, max_wait_s=3600.0))
    holders = [Holder(limiter) for _ in range(3)]
    await until(lambda: limiter.snapshot() == LimiterSnapshot(in_flight=1, queued=2))
    with pytest.raises(QueueFull) as caught:
        async with asyncio.timeout(WITHIN_S), limiter.permit():
            pass
    assert limiter.snapshot() == LimiterSnapshot(in_flight=1, queued=2)  # it never queued
    assert caught.value.retry_after > 0
    await finish(*holders)
    assert limiter.snapshot() == IDLE


async def test_a_waiter_past_the_wait_bound_gets_queue_timeout(
    build: Build, clock: ManualClock
) -> None:
    # The bound is on ``clock``.
    limiter = build(limit(max_concurrent=1, max_wait_s=0.2), clock=clock)
    holder = Holder(limiter)

    def granted() -> bool:  # it may wait on a hint, a timer on ``clock`` too
        clock.advance(0.05)
        return holder.started.is_set()

    await until(granted, "the holder is granted")
    waiter = Holder(limiter)
    await until(queued_is(limiter, 1))
    clock.advance(0.2 - SKEW)
    await asyncio.sleep(0.01)  # room for a wrongly early timeout to show
    assert not waiter.task.done()
    clock.advance(SKEW)
    with pytest.raises(QueueTimeout) as caught:
        await asyncio.wait_for(waiter.task, WITHIN_S)
    assert caught.value.retry_after > 0
    assert limiter.snapshot() == LimiterSnapshot(in_flight=1, queued=0)
    await finish(holder)


async def test_cancelled_waiters_and_holders_leave_the_whole_budget_usable(build: Build) -> None:
    limiter = build(limit(max_concurrent=2, max_wait_s=3600.0), LASTING)
    holders = [Holder(limiter) for _ in range(6)]
    await until(lambda: limiter.snapshot() == LimiterSnapshot(in_flight=2, queued=4))
    for holder in holders:
        holder.task.cancel()
    await asyncio.gather(*(h.task for h in holders), return_exceptions=True)
    assert limiter.snapshot() == IDLE
    late = [Holder(limiter) for _ in range(2)]
    # Only the start window may delay them; a leaked permit would block them for good.
    await until(lambda: all(h.started.is_set() for h in late), "the late callers are granted")
    await finish(*late)
    assert limiter.snapshot() == IDLE


async def test_shedding_turns_every_waiter_and_newcomer_away_and_keeps_held_permits(
    build: Build,
) -> None:
    limiter = build(limit(max_concurrent=1))
    holder = Holder(limiter)
    await holder.started.wait()
    waiters = [Holder(limiter) for _ in range(3)]
    await until(lambda: limiter.snapshot().queued == 3)
    limiter.shed()
    outcomes = await asyncio.gather(*(w.task for w in waiters), return_exceptions=True)
    assert all(isinstance(outcome, QueueFull) for outcome in outcomes)
    with pytest.raises(QueueFull):
        async with limiter.permit():
            pass
    assert limiter.snapshot() == LimiterSnapshot(in_flight=1, queued=0)
    await finish(holder)


async def test_an_exception_inside_the_permit_gives_it_back(build: Build) -> None:
    limiter = build(limit(max_concurrent=1, window_s=0.05), LASTING)
    with pytest.raises(RuntimeError):
        async with limiter.permit():
            raise RuntimeError("upstream broke")
    assert limiter.snapshot() == IDLE
    await asyncio.wait_for(Recorder().call(limiter), WITHIN_S)  # leaked: QueueTimeout at 5 s


async def test_a_start_counts_from_when_it_was_sent_not_when_it_was_granted(
    build: Build,
) -> None:
    limiter = build(limit(max_concurrent=1, window_s=0.2))
    late = Holder(limiter, send_at_once=False)
    await late.started.wait()
    await asyncio.sleep(0.15)  # a stall between the grant and the send, longer than any margin
    late.send.set()
    await until(lambda: late.sent_at > 0)
    await finish(late)
    following = Holder(limiter)
    await following.started.wait()
    # Counted from the grant, the start would have left the window 0.15 s earlier.
    assert following.granted_at - late.sent_at >= 0.2 - SKEW
    await finish(following)
    assert limiter.snapshot() == IDLE


async def test_a_permit_granted_ahead_of_the_windows_edge_is_sent_not_before_it(
    build: Build,
) -> None:
    window, ahead = 0.4, 0.04
    limiter = build(limit(max_concurrent=2, window_s=window, grant_ahead_s=ahead))
    spans: list[tuple[float, float]] = []  # (granted, sent() returned: the bytes go out)

    async def call() -> None:
        async with limiter.permit() as permit:
            granted = time.monotonic()
            await permit.sent()
            spans.append((granted, time.monotonic()))

    await asyncio.gather(*(call() for _ in range(8)))
    sends = sorted(sent for _, sent in spans)
    # Every start at least a window after the one two before it: no window holds three.
    # (The 2 ms allow for Redis's clock against this one: a sent() that does not wait for
    # the edge is early by up to ``ahead``.)
    assert all(
        later - earlier >= window - 0.002 for earlier, later in zip(sends, sends[2:], strict=False)
    )
    assert any(sent - granted >= ahead / 4 for granted, sent in spans)  # some were held
    assert limiter.snapshot() == IDLE


async def an_unsent_start_keeps_its_place(limiter: Limiter, unsent_for_s: float) -> None:
    """On a limiter of two permits and a 0.15 s window: a permit granted and not sent for
    ``unsent_for_s``, then one sent; the next is granted only once the sent start has left
    the window, as the window holds the unsent start and the sent one."""
    unsent = Holder(limiter, send_at_once=False)
    await unsent.started.wait()
    await asyncio.sleep(unsent_for_s)  # the holder stalls: its start stays pending
    sent = Holder(limiter)
    await until(lambda: sent.sent_at > 0)
    await finish(sent)
    waiter = Holder(limiter)
    await waiter.started.wait()
    assert waiter.granted_at - sent.sent_at >= 0.15 - SKEW
    await finish(unsent, waiter)


async def test_an_unsent_start_holds_its_place_in_the_window_past_the_window(
    build: Build,
) -> None:
    limiter = build(limit(max_concurrent=2, window_s=0.15))
    await an_unsent_start_keeps_its_place(limiter, 0.3)  # granted two windows ago
    assert limiter.snapshot() == IDLE


async def test_a_permit_released_without_being_sent_counts_its_start_at_release(
    build: Build,
) -> None:
    limiter = build(limit(max_concurrent=1, window_s=0.2))
    failed = Holder(limiter, send_at_once=False)  # the request broke before it was sent
    await failed.started.wait()
    await asyncio.sleep(0.15)  # a stall longer than any margin, then the request breaks
    await finish(failed)
    following = Holder(limiter)
    await following.started.wait()
    assert following.granted_at - failed.released_at >= 0.2 - SKEW
    await finish(following)
    assert limiter.snapshot() == IDLE


# The per-caller contract: fair turns, bounds and caps per caller, background last.


async def test_a_flood_from_one_caller_fills_only_its_own_queue(fair_build: Build) -> None:
    limiter = fair_build(limit(max_concurrent=1, max_queue=2))
    holders = [Holder(limiter, caller="flood") for _ in range(3)]
    await until(queued_is(limiter, 2))
    with pytest.raises(QueueFull):
        async with limiter.permit("flood"):
            pass
    other = Holder(limiter, caller="other")
    await until(queued_is(limiter, 3))
    await finish(*holders, other)
    assert limiter.snapshot() == IDLE


async def test_a_late_caller_is_granted_before_the_flooders_backlog(fair_build: Build) -> None:
    limiter = fair_build(limit(max_concurrent=1, window_s=0.05))
    recorder = Recorder()
    first = Holder(limiter, caller="flood")
    await first.started.wait()
    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(recorder.call(limiter, name="flood", caller="flood")))
        await until(queued_is(limiter, i + 1))
    tasks.append(asyncio.create_task(recorder.call(limiter, name="late", caller="late")))
    await until(queued_is(limiter, 6))
    await finish(first)
    await asyncio.gather(*tasks)
    assert recorder.order.index("late") <= 1, recorder.order


async def test_a_heavier_caller_gets_turns_in_proportion_to_its_weight(
    fair_build: Build,
) -> None:
    weights = policies(heavy=CallerPolicy(weight=3))
    limiter = fair_build(limit(max_concurrent=1, window_s=0.03, policy=weights))
    recorder = Recorder()
    first = Holder(limiter, caller="heavy")
    await first.started.wait()
    tasks = [
        asyncio.create_task(recorder.call(limiter, name=caller, caller=caller))
        for caller in ["heavy", "light"] * 8
    ]
    await until(queued_is(limiter, 16))
    await finish(first)
    await asyncio.gather(*tasks)
    assert recorder.order[:8].count("heavy") == 6, recorder.order


async def test_a_caller_at_its_in_flight_cap_waits_while_others_are_granted(
    fair_build: Build,
) -> None:
    capped = policies(capped=CallerPolicy(max_in_flight=1))
    limiter = fair_build(limit(max_concurrent=3, policy=capped))
    held = Holder(limiter, caller="capped")
    await held.started.wait()
    second = Holder(limiter, caller="capped")
    others = [Holder(limiter, caller="other") for _ in range(2)]
    await asyncio.gather(*(h.started.wait() for h in others))
    assert not second.started.is_set(), "the capped caller holds its one permit"
    await finish(held)
    await second.started.wait()
    await finish(second, *others)
    assert limiter.snapshot() == IDLE


async def test_background_work_waits_while_any_caller_waits(fair_build: Build) -> None:
    limiter = fair_build(limit(max_concurrent=1, window_s=0.05, background_max=1))
    recorder = Recorder()
    first = Holder(limiter, caller="a")
    await first.started.wait()
    refresh = Holder(limiter, background=True)
    await until(queued_is(limiter, 1))
    caller = asyncio.create_task(recorder.call(limiter, name="b", caller="b"))
    await until(queued_is(limiter, 2))
    await finish(first)
    await caller
    await refresh.started.wait()
    assert refresh.granted_at >= recorder.spans[0][0], "the caller that came later went first"
    await finish(refresh)
    assert limiter.snapshot() == IDLE


# Redis only: what one shared budget across replicas promises.


class LatencyProxy:
    """A TCP hop to Redis that delivers every chunk ``delay`` seconds late, both ways."""

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port = target_port
        self.delay = delay
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            self.tasks.add(asyncio.create_task(self._pump(source, sink)))

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        # Each chunk leaves at its arrival + delay: added latency, not a narrower pipe.
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(due - time.monotonic())
                if not data:
                    sink.close()
                    return
                sink.write(data)

        delivering = asyncio.create_task(deliver())
        try:
            while True:
                data = await source.read(65536)
                chunks.put_nowait((time.monotonic() + self.delay, data))
                if not data:
                    break
            await delivering
        finally:
            delivering.cancel()


FAR = 0.01  # the far replica's extra latency to Redis, each way


@pytest.fixture
async def far_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A replica's connection to the same Redis from farther away (``FAR`` each way)."""
    proxy = LatencyProxy(redis_server.port, FAR)
    client = aioredis.Redis(port=await proxy.start())
    yield client
    await client.aclose()
    await proxy.close()


async def test_two_replicas_share_one_budget_and_take_fair_turns(
    redis_client: aioredis.Redis, far_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    # The far replica hears of every freed permit last and would lose every race for it;
    # only the limiter's own fairness gives it its turns.
    shape = limit(max_concurrent=4, window_s=0.15)
    replicas = [redis_limiter(redis_client, shape), redis_limiter(far_client, shape)]
    closing.extend(replicas)
    recorder = Recorder()
    callers = [
        recorder.call(replica, hold=(0.2, 0.0, 0.02)[i % 3], name=r)
        for i in range(30)
        for r, replica in enumerate(replicas)
    ]
    await asyncio.gather(*callers)
    assert recorder.max_in_flight() <= 4
    assert recorder.max_starts_within(0.15 - SKEW - FAR) <= 4  # the far one hears of it late
    # While both still had callers waiting, each got a fair share of the permits.
    first_done = min(len(recorder.order) - recorder.order[::-1].index(r) for r in (0, 1))
    contended = recorder.order[:first_done]
    assert min(contended.count(0), contended.count(1)) >= 0.3 * len(contended)
    assert all(replica.snapshot() == IDLE for replica in replicas)


CRASHING_REPLICA = """
import asyncio, sys
import redis.asyncio as aioredis
from gateway.clock import SystemClock
from gateway.limiter import FleetTimings, LimitConfig
from gateway.limiter.redis_limiter import RedisLimiter

async def main() -> None:
    limiter = RedisLimiter(
        aioredis.Redis.from_url(sys.argv[1]),
        LimitConfig(max_concurrent=3, window_s=0.3, max_queue=5, max_wait_s=5.0),
        FleetTimings(lease_s=0.5),
        clock=SystemClock(),
    )
    permits = [limiter.permit() for _ in range(3)]  # referenced: never finalized, never exited
    for permit in permits:
        await permit.__aenter__()
    print("holding", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_a_killed_replicas_permits_come_back_after_their_lease(
    redis_server: RedisServer, redis_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    survivor = redis_limiter(redis_client, limit(max_wait_s=1.2), FleetTimings(lease_s=0.5))
    closing.append(survivor)
    crashing = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHING_REPLICA, redis_server.url, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert crashing.stdout is not None
        line = await asyncio.wait_for(crashing.stdout.readline(), timeout=10)
        assert line == b"holding\n"
        with pytest.raises(QueueTimeout):  # renewed past its 0.5 s lease while alive
            async with survivor.permit():
                pass
    finally:
        crashing.kill()
        await crashing.wait()
    killed = time.monotonic()
    # It waits for the lapse.
    patient = redis_limiter(redis_client, limit(max_wait_s=3600.0), FleetTimings(lease_s=0.5))
    closing.append(patient)
    holders = [Holder(patient) for _ in range(3)]
    await until(lambda: all(h.started.is_set() for h in holders), "the leases lapse")
    # A lease is at most lease/2 old when renewed (once older than half a beat period, beats
    # every lease/3), so the leases lapse 0.25-0.5 s after the kill; their starts, never
    # marked sent, count a window (0.3 s) longer: it may have sent them as it died.
    assert time.monotonic() - killed >= 0.5 / 2 + 0.3
    await finish(*holders)


async def test_a_call_longer_than_the_lease_keeps_its_permit(
    redis_client: aioredis.Redis, second_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    short = FleetTimings(lease_s=0.2)
    holder_replica = redis_limiter(redis_client, limit(max_concurrent=1), short)
    other_replica = redis_limiter(second_client, limit(max_concurrent=1, max_wait_s=0.5), short)
    closing.extend([holder_replica, other_replica])
    holder = Holder(holder_replica)
    await holder.started.wait()
    with pytest.raises(QueueTimeout):
        async with other_replica.permit():
            pass
    await finish(holder)
    await asyncio.wait_for(Recorder().call(other_replica), WITHIN_S)


async def test_an_unsent_start_keeps_its_place_past_its_lease_while_the_permit_is_held(
    redis_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    limiter = redis_limiter(
        redis_client, limit(max_concurrent=2, window_s=0.15), FleetTimings(lease_s=0.2)
    )
    closing.append(limiter)
    # Past lease + window: renewals kept the start pending.
    await an_unsent_start_keeps_its_place(limiter, 0.5)


async def test_every_key_the_scripts_touch_shares_one_hash_tag(
    redis_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    limiter = redis_limiter(redis_client, limit(max_concurrent=1), namespace="isales:v1")
    closing.append(limiter)
    holder, waiter = Holder(limiter), Holder(limiter)
    await holder.started.wait()
    await until(zcard_is(redis_client, limiter.keys.demand, 1))
    names = {k.decode() if isinstance(k, bytes) else k for k in await redis_client.keys("*")}
    assert names == {
        "{isales:v1:limit}:meta",
        "{isales:v1:limit}:members",
        "{isales:v1:limit}:leases",
        "{isales:v1:limit}:starts",
        "{isales:v1:limit}:demand",
        "{isales:v1:limit}:wants",
        "{isales:v1:limit}:since",
        "{isales:v1:limit}:finish",
        "{isales:v1:limit}:policy",
    }
    assert len({key_slot(name.encode()) for name in names}) == 1
    assert limiter.keys.released.startswith("{isales:v1:limit}:")
    await finish(holder, waiter)


async def test_an_unreachable_redis_fails_fast_with_backend_unavailable_and_keeps_nothing() -> None:
    client = aioredis.Redis(
        port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    limiter = redis_limiter(client, limit(max_wait_s=3600.0))  # a caller left waiting would hang

    async def call() -> None:
        async with limiter.permit():
            pass

    try:
        calls = (call() for _ in range(5))
        gathered = asyncio.gather(*calls, return_exceptions=True)
        outcomes = await asyncio.wait_for(gathered, WITHIN_S)
        assert all(isinstance(outcome, BackendUnavailable) for outcome in outcomes)
        assert limiter.snapshot() == IDLE
    finally:
        await limiter.close()
        await client.aclose()


async def test_a_waiter_on_another_replica_is_woken_by_the_release_not_by_polling(
    redis_client: aioredis.Redis,
    second_client: aioredis.Redis,
    closing: list[RedisLimiter],
    clock: ManualClock,
) -> None:
    # Other script calls within the 0.6 s counted: the waiting replica's first heartbeat (the
    # next comes 1.7 s later: every min(beat_s, lease_s / 3)), and the holder's start
    # being recorded, which may land after the reset.
    shape, timings = limit(max_concurrent=1, window_s=0.05), FleetTimings(lease_s=5.0, beat_s=10.0)
    holding = redis_limiter(redis_client, shape, timings)
    # Its hints are timers on a clock that never moves: only the release message can wake it.
    waiting = redis_limiter(second_client, shape, timings, clock=clock)
    closing.extend([holding, waiting])
    await waiting.beat()  # knows the epoch: no acquire is spent learning it
    holder = Holder(holding)
    await holder.started.wait()
    await redis_client.config_resetstat()
    waiter = Holder(waiting)
    await asyncio.sleep(0.6)  # the span over which the waiter's script calls are counted
    stats = await redis_client.info("commandstats")
    attempts = sum(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0) for cmd in ("eval", "evalsha"))
    await finish(holder)
    await until(waiter.started.is_set, "the waiter is woken by the release message")
    assert attempts <= 4 + 2  # one retry per hint (250 ms + jitter), never a busy loop
    await finish(waiter)


async def test_a_caller_cancelled_while_its_acquire_script_runs_returns_the_permit(
    redis_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    limiter = redis_limiter(redis_client)
    closing.append(limiter)
    await limiter.beat()  # knows the epoch: its first acquire can grant
    await redis_client.client_pause(300, all=False)  # writes, scripts included, wait 300 ms
    caller = Holder(limiter)
    await until(paused_commands(redis_client, 1), "the acquire script waits on the pause")
    caller.task.cancel()
    await asyncio.gather(caller.task, return_exceptions=True)
    assert limiter.snapshot() == IDLE
    keys = limiter.keys
    # The script granted once the pause ended; the permit went straight back.
    await until(zcard_is(redis_client, keys.starts, 1))
    await until(zcard_is(redis_client, keys.leases, 0))
    assert not caller.started.is_set()


async def test_a_holder_cancelled_during_its_release_still_releases(
    redis_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    limiter = redis_limiter(redis_client)
    closing.append(limiter)
    holder = Holder(limiter)
    await holder.started.wait()
    await redis_client.client_pause(300, all=False)
    holder.done.set()
    await until(paused_commands(redis_client, 1), "the release waits on the pause")
    holder.task.cancel()
    await asyncio.gather(holder.task, return_exceptions=True)
    assert limiter.snapshot() == IDLE
    await until(zcard_is(redis_client, limiter.keys.leases, 0))


async def test_a_waiter_that_times_out_leaves_no_demand_in_redis(
    redis_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    # A window of an hour: demand lapses hours after it (2 hints + 0.5 s), so only the
    # waiter's withdrawal can clear it within the test.
    limiter = redis_limiter(redis_client, limit(max_concurrent=1, max_wait_s=0.1, window_s=3600.0))
    closing.append(limiter)
    holder = Holder(limiter)
    await holder.started.wait()
    with pytest.raises(QueueTimeout):
        async with limiter.permit():
            pass
    assert limiter.snapshot() == LimiterSnapshot(in_flight=1, queued=0)
    await until(zcard_is(redis_client, limiter.keys.demand, 0), "the demand is withdrawn")
    assert await redis_client.zcard(limiter.keys.since) == 0
    await finish(holder)


async def test_close_releases_unsent_leases_keeps_sent_ones_stops_listening_and_fails_waiters(
    redis_client: aioredis.Redis,
) -> None:
    limiter = redis_limiter(redis_client, limit(max_concurrent=2))
    sent, unsent = Holder(limiter), Holder(limiter, send_at_once=False)
    await asyncio.gather(sent.started.wait(), unsent.started.wait())
    await until(lambda: sent.sent_at > 0)
    waiter = Holder(limiter)
    channel = limiter.keys.released

    async def subscribers_are(count: int) -> bool:
        return int((await redis_client.pubsub_numsub(channel))[0][1]) == count

    await until(lambda: subscribers_are(1))
    await limiter.close()
    # The sent one may still keep the vendor busy (shutdown mid-call): its lease lapses.
    assert await redis_client.zcard(limiter.keys.leases) == 1
    assert await redis_client.zcard(limiter.keys.demand) == 0
    assert await subscribers_are(0)
    with pytest.raises(BackendUnavailable):
        await waiter.task
    await finish(sent, unsent)
    assert await redis_client.zcard(limiter.keys.leases) == 1


async def test_losing_redis_while_holding_a_permit_still_frees_the_local_slot() -> None:
    server = RedisServer().start()
    server.flush()
    client = aioredis.Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    limiter = redis_limiter(client)
    try:
        holder = Holder(limiter)
        await holder.started.wait()
        server.stop()
        await finish(holder)  # the release fails quietly: the lease lapses by itself
        assert limiter.snapshot() == IDLE
        with pytest.raises(BackendUnavailable):
            async with limiter.permit():
                pass
        assert limiter.snapshot() == IDLE
    finally:
        await limiter.close()
        await client.aclose()
        server.close()


async def test_every_replica_reads_the_fleets_permits_in_flight_and_starts_in_the_window(
    redis_client: aioredis.Redis, second_client: aioredis.Redis, closing: list[RedisLimiter]
) -> None:
    holding, reading = redis_limiter(redis_client), redis_limiter(second_client)
    closing.extend([holding, reading])
    holders = [Holder(holding) for _ in range(2)]
    await until(lambda: all(h.sent_at > 0 for h in holders))
    await until(zcard_is(redis_client, holding.keys.starts, 2), "the starts' records land")
    await reading.beat()
    snapshot = reading.snapshot()
    assert (snapshot.in_flight, snapshot.fleet_in_flight, snapshot.fleet_starts) == (0, 2, 2)
    await finish(*holders)
    await reading.beat()
    assert reading.snapshot().fleet_in_flight == 0
    assert reading.snapshot().fleet_starts == 2  # still in the window


async def test_the_embedded_limiter_counts_itself_as_the_whole_fleet() -> None:
    limiter = InMemoryLimiter(LIMIT, clock=SystemClock())
    holder = Holder(limiter)
    await until(lambda: holder.sent_at > 0)
    assert (limiter.snapshot().fleet_in_flight, limiter.snapshot().fleet_starts) == (1, 1)
    await finish(holder)
    assert (limiter.snapshot().fleet_in_flight, limiter.snapshot().fleet_starts) == (0, 1)
