"""The in-memory limiter, driven by a manual clock: time is advanced, never slept.

A start counts from when its permit says the request was sent (``Permit.sent()``), as the
vendor counts it on arrival: pending until then, or until release if it never was.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from gateway.clock import ManualClock
from gateway.errors import QueueFull, QueueTimeout
from gateway.limiter import ANONYMOUS, FleetTimings, LimitConfig, Permit
from gateway.limiter.memory import InMemoryLimiter, WindowBudget
from gateway.limiter.scheduler import CallerPolicy


def make_limiter(
    clock: ManualClock,
    *,
    max_concurrent: int = 10,
    window_s: float = 1.1,
    max_queue: int = 100,
    max_wait_s: float = 30.0,
    policies: dict[str, CallerPolicy] | None = None,
    background_max: int = 0,
) -> InMemoryLimiter:
    table = policies or {}
    limit = LimitConfig(
        max_concurrent=max_concurrent,
        window_s=window_s,
        max_queue=max_queue,
        max_wait_s=max_wait_s,
        policy=lambda caller: table.get(caller, CallerPolicy()),
        background_max=background_max,
    )
    return InMemoryLimiter(limit, clock=clock)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Holder:
    """A caller that takes a permit, sends at once unless told to wait (``send``), and holds
    it until told to let go (``done``).
    """

    def __init__(
        self,
        limiter: InMemoryLimiter,
        *,
        send_at_once: bool = True,
        caller: str = ANONYMOUS,
        background: bool = False,
    ) -> None:
        self.limiter = limiter
        self.caller = caller
        self.background = background
        self.started = asyncio.Event()
        self.send = asyncio.Event()
        self.done = asyncio.Event()
        if send_at_once:
            self.send.set()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.limiter.permit(self.caller, background=self.background) as permit:
            self.started.set()
            sending = asyncio.create_task(self._send_when_told(permit))
            await self.done.wait()
            sending.cancel()

    async def _send_when_told(self, permit: Permit) -> None:
        await self.send.wait()
        await permit.sent()


def one_start(budget: WindowBudget, sent_at: float) -> None:
    budget.grant()
    budget.sent(sent_at)
    budget.finish()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_concurrent", 0),
        ("window_s", 0.0),
        ("max_queue", -1),
        ("max_wait_s", -0.5),
        ("background_max", -1),
        ("background_max", 4),  # more than the whole budget
        ("replicas", 0),
        ("replicas", 4),  # a replica with no share of its own
        ("grant_ahead_s", -0.01),
        ("grant_ahead_s", 0.12),  # more than a tenth of the window
    ],
)
def test_a_limit_out_of_range_is_refused_naming_its_field(field: str, value: float) -> None:
    shape = {"max_concurrent": 3, "window_s": 1.1, "max_queue": 10, "max_wait_s": 5.0}
    LimitConfig(**shape)  # in range as it is
    with pytest.raises(ValueError, match=rf"^{field} must be .*, not {value!r}$"):
        LimitConfig(**{**shape, field: value})


@pytest.mark.parametrize("field", ["lease_s", "beat_s", "fence_s", "claim_s", "skew_s"])
def test_fleet_timings_out_of_range_are_refused_naming_the_field(field: str) -> None:
    FleetTimings(lease_s=5.0, skew_s=0.0)  # no skew assumed: in range
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        FleetTimings(**{"lease_s": 5.0, field: -1.0})


def test_each_replica_of_the_fleet_gets_a_whole_share_and_the_shares_add_up() -> None:
    shares = {n: LimitConfig(10, 1.1, 10, 5.0, replicas=n).share for n in (1, 2, 3, 10)}
    assert shares == {1: 10, 2: 5, 3: 3, 10: 1}


def test_budget_allows_n_starts_then_waits_for_the_oldest_to_leave_the_window() -> None:
    budget = WindowBudget(max_concurrent=2, window=1.0)
    one_start(budget, 0.0)
    one_start(budget, 0.3)
    assert budget.delay(0.5) == pytest.approx(0.5)
    assert budget.delay(1.0) == 0.0


def test_budget_blocks_without_end_while_all_permits_are_held() -> None:
    budget = WindowBudget(max_concurrent=1, window=1.0)
    budget.grant()
    budget.sent(0.0)
    assert budget.delay(5.0) == math.inf
    budget.finish()
    assert budget.delay(5.0) == 0.0


def test_budget_counts_a_start_from_when_it_was_sent_not_when_it_was_granted() -> None:
    budget = WindowBudget(max_concurrent=1, window=1.1)
    budget.grant()  # at 0
    budget.sent(0.5)
    budget.finish()
    assert budget.delay(1.5) == pytest.approx(0.1)
    assert budget.delay(1.6) == 0.0


def test_budget_counts_a_pending_start_in_the_window_however_long_it_waits() -> None:
    budget = WindowBudget(max_concurrent=2, window=1.0)
    budget.grant()  # held, not sent
    one_start(budget, 0.0)
    assert budget.delay(0.5) == pytest.approx(0.5)
    assert budget.delay(100.0) == 0.0
    one_start(budget, 100.0)
    assert budget.delay(100.5) == pytest.approx(0.5), "the pending start still counts"
    budget.sent(100.7)
    budget.finish()
    assert budget.delay(100.9) == pytest.approx(0.1)
    one_start(budget, 101.0)
    assert budget.delay(101.2) == pytest.approx(0.5), "sent at 100.7, it leaves at 101.7"


def test_budget_counts_starts_pending_elsewhere_and_waits_without_end_on_them_alone() -> None:
    budget = WindowBudget(max_concurrent=3, window=1.0)
    one_start(budget, 0.0)
    assert budget.delay(0.5, pending_elsewhere=1) == 0.0
    assert budget.delay(0.5, pending_elsewhere=2) == pytest.approx(0.5)
    assert budget.delay(5.0, pending_elsewhere=3) == math.inf


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


async def test_ten_permits_sent_late_push_the_eleventh_start_a_window_past_the_sending() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock)  # window 1.1 s
    holders = [Holder(limiter, send_at_once=False) for _ in range(11)]
    await settle()
    assert sum(h.started.is_set() for h in holders) == 10
    clock.advance(0.5)  # granted at 0, sent at 0.5: a stall between grant and send
    for h in holders[:10]:
        h.send.set()
        await settle()
        h.done.set()
    await settle()
    clock.advance(1.09)
    await settle()
    assert not holders[10].started.is_set(), "counted from the grant it would start at 1.1"
    clock.advance(0.02)
    await settle()
    assert holders[10].started.is_set()
    holders[10].done.set()
    await asyncio.gather(*(h.task for h in holders))


async def test_an_unsent_start_holds_its_place_in_the_window_until_it_is_sent() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=2)
    unsent = Holder(limiter, send_at_once=False)
    early = Holder(limiter)
    await settle()
    early.done.set()
    clock.advance(100)  # long past any window: only the unsent start is left in it
    late = Holder(limiter)
    await settle()
    late.done.set()
    waiter = Holder(limiter)
    await settle()
    assert late.started.is_set()
    assert not waiter.started.is_set(), "the unsent start and the late one fill the window"
    clock.advance(0.5)
    unsent.send.set()  # sent at 100.5: the late start (100.0) is still the first to leave
    await settle()
    clock.advance(0.59)
    await settle()
    assert not waiter.started.is_set()
    clock.advance(0.02)
    await settle()
    assert waiter.started.is_set()
    for h in (unsent, waiter):
        h.done.set()
    await asyncio.gather(*(h.task for h in (unsent, early, late, waiter)))
    assert limiter.snapshot().in_flight == 0


async def test_a_permit_released_without_being_sent_counts_its_start_at_release() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1)
    failed = Holder(limiter, send_at_once=False)  # the request broke before it was sent
    waiter = Holder(limiter)
    await settle()
    clock.advance(0.7)
    failed.done.set()
    await settle()
    clock.advance(1.09)
    await settle()
    assert not waiter.started.is_set()
    clock.advance(0.02)
    await settle()
    assert waiter.started.is_set()
    waiter.done.set()
    await asyncio.gather(failed.task, waiter.task)


async def test_a_permit_sent_twice_counts_one_start_from_the_first_time() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=2)
    async with limiter.permit() as permit:
        await permit.sent()
        clock.advance(0.5)
        await permit.sent()
    waiter = Holder(limiter)
    await settle()
    assert waiter.started.is_set(), "one start in the window, not two"
    second = Holder(limiter)
    await settle()
    clock.advance(0.59)  # the first start (at 0) leaves at 1.1, not 1.6
    await settle()
    assert not second.started.is_set()
    clock.advance(0.02)
    await settle()
    assert second.started.is_set()
    for h in (waiter, second):
        h.done.set()
    await asyncio.gather(waiter.task, second.task)


async def test_a_late_caller_waits_for_one_window_not_behind_the_flooders_backlog() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=2, window_s=1.0, max_queue=300)
    flood = [Holder(limiter, caller="flood") for _ in range(200)]
    await settle()
    for h in flood:
        h.done.set()
    clock.advance(0.5)
    late = Holder(limiter, caller="late")
    await settle()
    assert limiter.snapshot().queued_by_caller == {"flood": 198, "late": 1}
    clock.advance(0.5)
    await settle()
    assert late.started.is_set(), "one of the two permits of the next window is its turn"
    late.done.set()
    for h in flood:
        h.task.cancel()
    await asyncio.gather(late.task, *(h.task for h in flood), return_exceptions=True)
    assert limiter.snapshot().in_flight == 0


async def test_a_callers_full_queue_rejects_it_alone_with_its_own_retry_after() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1, window_s=1.0, max_queue=3)
    flood = [Holder(limiter, caller="flood") for _ in range(4)]
    await settle()
    with pytest.raises(QueueFull) as caught:
        async with limiter.permit("flood"):
            pass
    assert caught.value.retry_after == pytest.approx(4.0), "its 3 waiters, then its turn"
    other = Holder(limiter, caller="other")
    await settle()
    assert limiter.snapshot().queued == 4
    for h in [*flood, other]:
        h.done.set()
    for _ in range(6):
        clock.advance(1.0)
        await settle()
    await asyncio.gather(*(h.task for h in [*flood, other]))


async def test_a_background_permit_goes_only_to_an_idle_budget_and_never_ahead_of_a_caller() -> (
    None
):
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=1, window_s=1.0, background_max=1)
    holder = Holder(limiter, caller="a")
    await settle()
    refresh = Holder(limiter, background=True)
    await settle()
    caller = Holder(limiter, caller="b")
    await settle()
    holder.done.set()
    clock.advance(1.0)
    await settle()
    assert caller.started.is_set()
    assert not refresh.started.is_set(), "the caller that came later goes first"
    caller.done.set()
    clock.advance(1.0)
    await settle()
    assert refresh.started.is_set()
    refresh.done.set()
    await asyncio.gather(holder.task, refresh.task, caller.task)
    assert limiter.snapshot().in_flight == 0


async def test_a_capped_caller_waits_at_its_cap_while_the_budget_serves_others() -> None:
    clock = ManualClock()
    limiter = make_limiter(clock, max_concurrent=3, policies={"c": CallerPolicy(max_in_flight=1)})
    capped = [Holder(limiter, caller="c") for _ in range(2)]
    others = [Holder(limiter, caller="o") for _ in range(2)]
    await settle()
    assert [h.started.is_set() for h in capped + others] == [True, False, True, True]
    capped[0].done.set()
    clock.advance(1.1)  # the window has room again: only the cap held it back
    await settle()
    assert capped[1].started.is_set()
    for h in capped + others:
        h.done.set()
    await asyncio.gather(*(h.task for h in capped + others))


def test_a_start_leaving_within_ahead_counts_as_gone_and_its_exit_is_the_new_permits_edge() -> None:
    budget = WindowBudget(max_concurrent=2, window=1.0, ahead=0.05)
    one_start(budget, 0.0)
    one_start(budget, 0.02)
    assert budget.delay(0.5) == pytest.approx(0.45)  # aimed at the oldest exit less ``ahead``
    assert budget.delay(0.949) > 0
    assert budget.delay(0.95) == 0  # the start of 0.0 leaves at 1.0: within ahead
    budget.grant()
    assert budget.not_before(0.95) == 1.0  # sent no sooner than that start has left
    # The start of 0.02 leaves at 1.02, within ahead too: a second grant waits for it.
    assert budget.delay(0.97) == 0
    budget.grant()
    assert budget.not_before(0.97) == pytest.approx(1.02)


def test_without_ahead_a_grant_waits_for_the_exit_itself_and_is_sent_at_once() -> None:
    budget = WindowBudget(max_concurrent=1, window=1.0)
    one_start(budget, 0.0)
    assert budget.delay(0.99) == pytest.approx(0.01)
    assert budget.delay(1.0) == 0
    budget.grant()
    assert budget.not_before(1.0) == 1.0


def test_pending_starts_are_never_counted_as_leaving_ahead() -> None:
    budget = WindowBudget(max_concurrent=2, window=1.0, ahead=0.05)
    one_start(budget, 0.0)
    budget.grant()  # pending: counts until sent, whatever the time
    assert budget.delay(0.96) == 0  # the sent one leaves within ahead
    budget.grant()
    assert budget.not_before(0.96) == 1.0
    assert budget.delay(5.0) == math.inf  # two pending: nothing leaves before one is sent


def test_a_start_recorded_at_a_later_edge_keeps_the_window_in_order() -> None:
    budget = WindowBudget(max_concurrent=2, window=1.0)
    budget.record(0.5)  # released unsent, counted from its edge
    budget.record(0.3)
    assert budget.delay(1.31) == 0  # 0.3 left; 0.5 still in: one free
    budget.record(1.31)
    assert budget.delay(1.32) == pytest.approx(0.18)
