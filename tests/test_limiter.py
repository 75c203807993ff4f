"""The in-memory limiter, driven by a manual clock: time is advanced, never slept."""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.clock import ManualClock
from gateway.errors import QueueFull, QueueTimeout
from gateway.limiter import InMemoryLimiter, WindowBudget


def make_limiter(
    clock: ManualClock,
    *,
    max_concurrent: int = 10,
    window_s: float = 1.1,
    max_queue: int = 100,
    max_wait_s: float = 30.0,
) -> InMemoryLimiter:
    return InMemoryLimiter(
        max_concurrent=max_concurrent,
        window_s=window_s,
        max_queue=max_queue,
        max_wait_s=max_wait_s,
        clock=clock,
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Holder:
    """A caller that takes a permit and holds it until told to let go."""

    def __init__(self, limiter: InMemoryLimiter) -> None:
        self.limiter = limiter
        self.started = asyncio.Event()
        self.done = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.limiter.permit():
            self.started.set()
            await self.done.wait()


def test_budget_allows_n_starts_then_waits_for_the_oldest_to_leave_the_window() -> None:
    budget = WindowBudget(max_concurrent=2, window=1.0)
    budget.start(0.0)
    budget.finish()
    budget.start(0.3)
    budget.finish()
    assert budget.delay(0.5) == pytest.approx(0.5)
    assert budget.delay(1.0) == 0.0


def test_budget_blocks_without_end_while_all_permits_are_held() -> None:
    budget = WindowBudget(max_concurrent=1, window=1.0)
    budget.start(0.0)
    assert budget.delay(5.0) == math.inf
    budget.finish()
    assert budget.delay(5.0) == 0.0


async def test_ten_callers_start_at_once_and_the_eleventh_waits_for_the_window() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock)
    holders = [Holder(limiter) for _ in range(11)]
    await settle()
    assert sum(h.started.is_set() for h in holders) == 10
    for h in holders[:10]:
        h.done.set()
    await settle()
    assert not holders[10].started.is_set(), "start window still full"
    clock.advance(1.09)
    await settle()
    assert not holders[10].started.is_set()
    clock.advance(0.02)
    await settle()
    assert holders[10].started.is_set()
    holders[10].done.set()
    await asyncio.gather(*(h.task for h in holders))
    assert limiter.snapshot().in_flight == 0


async def test_concurrency_bound_holds_even_when_the_window_has_room() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=2, window_s=0.1)
    holders = [Holder(limiter) for _ in range(3)]
    await settle()
    clock.advance(10)
    await settle()
    assert [h.started.is_set() for h in holders] == [True, True, False]
    holders[0].done.set()
    await settle()
    assert holders[2].started.is_set()
    for h in holders:
        h.done.set()
    await asyncio.gather(*(h.task for h in holders))


async def test_waiters_are_served_in_arrival_order() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1, window_s=1.0)
    order: list[int] = []

    async def caller(i: int) -> None:
        async with limiter.permit():
            order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(caller(i)))
        await settle()
    for _ in range(5):
        clock.advance(1.0)
        await settle()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_full_queue_rejects_at_once_with_an_honest_retry_after() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1, window_s=1.0, max_queue=2)
    holders = [Holder(limiter) for _ in range(3)]
    await settle()
    assert limiter.snapshot().queued == 2
    with pytest.raises(QueueFull) as caught:
        async with limiter.permit():
            pass
    assert caught.value.retry_after == pytest.approx(3.0)
    assert caught.value.headers() == {"Retry-After": "3"}
    for h in holders:
        h.done.set()
    clock.advance(5)
    await settle()
    clock.advance(5)
    await asyncio.gather(*(h.task for h in holders))


async def test_a_waiter_past_the_wait_bound_gets_queue_timeout() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1, window_s=1.0, max_wait_s=2.0)
    holder = Holder(limiter)
    await settle()
    waiter = asyncio.create_task(limiter.permit().__aenter__())
    await settle()
    clock.advance(2.0)
    await settle()
    with pytest.raises(QueueTimeout):
        await waiter
    assert limiter.snapshot() == limiter.snapshot().__class__(in_flight=1, queued=0)
    holder.done.set()
    await holder.task
    assert limiter.snapshot().in_flight == 0


async def test_cancelled_waiters_and_holders_leak_no_permit() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=2, window_s=1.0)
    holders = [Holder(limiter) for _ in range(6)]
    await settle()
    assert limiter.snapshot() == limiter.snapshot().__class__(in_flight=2, queued=4)
    for h in holders:
        h.task.cancel()
    await asyncio.gather(*(h.task for h in holders), return_exceptions=True)
    assert limiter.snapshot().in_flight == 0
    assert limiter.snapshot().queued == 0
    clock.advance(1.0)
    late = [Holder(limiter) for _ in range(2)]
    await settle()
    assert all(h.started.is_set() for h in late), "both permits came back"
    for h in late:
        h.done.set()
    await asyncio.gather(*(h.task for h in late))


async def test_a_caller_cancelled_in_the_tick_it_was_granted_returns_the_permit() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1, window_s=0.5)
    first = limiter.permit()
    await first.__aenter__()
    second = Holder(limiter)
    await settle()
    clock.advance(0.5)  # the start window is free again; only the held permit blocks
    await first.__aexit__(None, None, None)
    # The release granted the permit to `second`; it is cancelled before it runs.
    second.task.cancel()
    await asyncio.gather(second.task, return_exceptions=True)
    assert not second.started.is_set()
    assert limiter.snapshot().in_flight == 0


async def test_an_error_inside_the_permit_gives_it_back() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1)
    with pytest.raises(RuntimeError):
        async with limiter.permit():
            raise RuntimeError("upstream broke")
    assert limiter.snapshot().in_flight == 0
