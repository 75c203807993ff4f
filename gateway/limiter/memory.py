"""The upstream limit: at most N requests in flight and N starts per (window + margin).

The vendor counts a start when the request arrives, so a start counts from when it is sent,
not from when its permit was granted: the holder calls ``Permit.sent()`` as the request goes
out. Until then the start is pending and counts as in the window however long it waits (a
stalled event loop or a slow TLS handshake cannot bunch starts up); a permit released without
``sent()`` counts its start at release (the request may have reached the vendor).

A permit may be granted up to ``grant_ahead_s`` before the window's edge allows its start (a
start leaving the window that soon counts as gone); its ``sent()`` holds the request until
that edge, so no start is ever earlier than the window allows, and the time from the grant to
the bytes on the wire (signing, the client's set-up) is spent before the edge, not after it.

``WindowBudget`` is the pure decision (times are inputs). ``InMemoryLimiter`` is the
single-instance backend: waiters queue per caller and ``FairScheduler`` (``scheduler``)
decides whose turn is next; each caller's queue and wait are bounded, and every permit is
given back on success, error, timeout and cancellation.
The Redis backend (fleet-wide) implements the same ``Limiter`` protocol.
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from gateway.clock import Clock, Rearm
from gateway.errors import QueueTimeout
from gateway.limiter.protocol import (
    ANONYMOUS,
    LimitConfig,
    LimiterSnapshot,
    Permit,
    shutting_down,
)
from gateway.limiter.scheduler import FairScheduler, Turn


class WindowBudget:
    """Concurrency plus sliding-window start budget. All times in seconds on one clock.

    A granted permit's start is pending (it counts as in the window whatever the time) until
    ``sent``; then it counts for ``window`` from the time it was sent. A start leaving the
    window within ``ahead`` counts as gone for a grant, whose permit then waits for that exit
    (``not_before``).
    """

    def __init__(self, max_concurrent: int, window: float, ahead: float = 0.0) -> None:
        self.max_concurrent = max_concurrent
        self.window = window
        self.ahead = ahead
        self.in_flight = 0
        self.pending = 0
        self._starts: deque[float] = deque()  # sent times, appended in order: sorted

    def delay(self, now: float, pending_elsewhere: int = 0) -> float:
        """Seconds until a start is allowed: 0 now, ``inf`` until a permit is released or
        a pending start is sent. ``pending_elsewhere``: unsent starts this budget does not hold
        (counted as pending too).
        """
        if self.in_flight >= self.max_concurrent:
            return math.inf
        self._expire(now)
        soon = self._leaving(now)  # the oldest ``soon`` starts leave within ``ahead``
        live = len(self._starts) - soon
        if live + self.pending + pending_elsewhere < self.max_concurrent:
            return 0.0
        if not live:
            return math.inf  # only pending starts: none leaves before it is sent
        return max(0.0, self._starts[soon] + self.window - self.ahead - now)

    def not_before(self, now: float, pending_elsewhere: int = 0) -> float:
        """When the permit just granted (``delay`` said 0) may be sent: ``now``, or the exit of
        the latest start it counted as gone, so the starts in the window stay within the limit.
        """
        self._expire(now)
        over = len(self._starts) + self.pending + pending_elsewhere - self.max_concurrent
        return now if over <= 0 else max(now, self._starts[over - 1] + self.window)

    def grant(self) -> None:
        """A permit is taken: one more in flight, its start pending."""
        self.in_flight += 1
        self.pending += 1

    def sent(self, now: float) -> None:
        """A pending start went out at ``now``."""
        self.pending -= 1
        self.record(now)

    def starts_in_window(self, now: float) -> int:
        """Starts counted in the window at ``now``, pending ones included."""
        self._expire(now)
        return len(self._starts) + self.pending

    def record(self, now: float) -> None:
        """A start at ``now`` that this budget did not grant (it counts all the same)."""
        bisect.insort(self._starts, now)  # a release unsent may count from a later edge

    def _expire(self, now: float) -> None:
        while self._starts and self._starts[0] <= now - self.window:
            self._starts.popleft()

    def _leaving(self, now: float) -> int:
        """How many of the (unexpired) starts leave the window within ``ahead`` of ``now``."""
        if self.ahead <= 0:
            return 0
        return bisect.bisect_right(self._starts, now + self.ahead - self.window)

    def finish(self) -> None:
        self.in_flight -= 1

    def retry_after(self, ahead: int) -> float:
        """An honest estimate of when a caller with ``ahead`` waiters before it gets a start."""
        return (ahead // self.max_concurrent + 1) * self.window


class BudgetPermit:
    """A permit whose start ``record`` notes at ``sent()``, or at ``close()`` (release)
    if it was never sent; once either way, never before ``not_before`` (monotonic).
    """

    __slots__ = ("_clock", "_record", "not_before")

    def __init__(self, record: Callable[[float], None], not_before: float, clock: Clock) -> None:
        self._record: Callable[[float], None] | None = record
        self.not_before = not_before
        self._clock = clock

    def check(self) -> None:
        """A local permit stays good while held."""

    async def sent(self) -> None:
        await hold_until(self._clock, self.not_before)
        self.close()

    def close(self) -> None:
        record, self._record = self._record, None
        if record is not None:
            # Released unsent before its edge: it may only have gone out from the edge on.
            record(max(self._clock.monotonic(), self.not_before))


# The event loop's timers wake late: epoll counts whole milliseconds (Python rounds the
# timeout up) and the wake-up itself takes a while, about 1.5 ms at the window's edge in a
# 500-miss storm (median). So the hold's timer is aimed this much before the edge and the last
# stretch is spent loop pass by loop pass, reading the clock: out at the first pass past it.
_LAST_STRETCH_S = 0.002


async def hold_until(clock: Clock, not_before: float) -> bool:
    """Wait until ``not_before`` (monotonic) has passed (no loop step at all if it has);
    whether it waited (a holder that waited checks its permit again).

    Never returns before ``not_before`` on ``clock``; the timer wakes up to
    ``_LAST_STRETCH_S`` early and the rest is a check per loop pass (other tasks run between),
    so the hold ends within a pass of the edge instead of a timer tick after it.
    """
    wait = not_before - clock.monotonic()
    if wait <= 0:
        return False
    if wait > _LAST_STRETCH_S:
        await clock.sleep(wait - _LAST_STRETCH_S)
    while clock.monotonic() < not_before:  # noqa: ASYNC110 - a poll by design: no event marks the edge
        await asyncio.sleep(0)
    return True


class InMemoryLimiter:
    """The single-process limiter: one ``WindowBudget`` and a ``FairScheduler`` of waiters.

    No dispatcher task: the queues are served whenever a permit is released, a waiter joins,
    or the window timer fires, so an idle limiter costs nothing. One process is the whole
    fleet: ``limit.replicas`` does not apply.
    """

    def __init__(self, limit: LimitConfig, *, clock: Clock) -> None:
        self._budget = WindowBudget(limit.max_concurrent, limit.window_s, limit.grant_ahead_s)
        self._scheduler: FairScheduler[asyncio.Future[float]] = FairScheduler(
            budget=limit.max_concurrent,
            window_s=limit.window_s,
            max_queue=limit.max_queue,
            policy=limit.policy,
            background_max=limit.background_max,
        )
        self._max_wait = limit.max_wait_s
        self._clock = clock
        self._timer = Rearm(clock, self._serve)
        self._shedding = False

    def snapshot(self) -> LimiterSnapshot:
        in_flight = self._budget.in_flight
        return LimiterSnapshot(
            in_flight,
            self._scheduler.queued(),
            self._scheduler.queued_by_caller(),
            fleet_in_flight=in_flight,  # one process: it is the fleet
            fleet_starts=self._budget.starts_in_window(self._clock.monotonic()),
        )

    def start(self) -> None:
        """Nothing runs in the background."""

    def shed(self) -> None:
        self._shedding = True
        for waiter in self._scheduler.drain():
            if not waiter.done():
                waiter.set_exception(shutting_down())

    async def close(self) -> None:
        """Nothing to give back: the budget dies with the process."""

    @asynccontextmanager
    async def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AsyncIterator[Permit]:
        not_before = await self._acquire(caller, background)
        permit = BudgetPermit(self._sent, not_before, self._clock)
        try:
            yield permit
        finally:
            permit.close()  # never sent: it may have reached the vendor, count it from now
            self._release(caller, background)

    def _sent(self, at: float) -> None:
        # No re-serve: the oldest sent start, which the timer waits for, is unchanged.
        self._budget.sent(at)

    def _release(self, caller: str, background: bool) -> None:
        self._budget.finish()
        self._scheduler.finished(caller, background=background)
        self._serve()

    async def _acquire(self, caller: str, background: bool) -> float:
        """Wait for a permit; when it may be sent (monotonic)."""
        if self._shedding:
            raise shutting_down()
        now = self._clock.monotonic()
        if self._scheduler.ready(caller, now, background=background) and (
            self._budget.delay(now) == 0
        ):
            self._scheduler.started(caller, now, background=background)
            self._budget.grant()
            return self._budget.not_before(now)
        waiter: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._scheduler.join(caller, waiter, background=background)  # may raise QueueFull
        deadline = self._clock.call_later(self._max_wait, lambda: self._expire(waiter, caller))
        self._serve()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted in the same tick the caller went away: hand the permit back.
                self._sent(max(self._clock.monotonic(), waiter.result()))
                self._release(caller, background)
            elif self._scheduler.leave(waiter):
                self._serve()
            raise
        finally:
            deadline.cancel()

    def _expire(self, waiter: asyncio.Future[float], caller: str) -> None:
        if waiter.done() or not self._scheduler.leave(waiter):
            return
        waiter.set_exception(QueueTimeout(self._scheduler.retry_after(caller)))

    def _serve(self) -> None:
        """Grant permits in the scheduler's order while the budget allows."""
        while self._scheduler.queued():
            now = self._clock.monotonic()
            delay = self._budget.delay(now)
            # The next turn, or when to look again: the budget's room first, then the caps.
            turn = now + delay if delay > 0 else self._scheduler.next_live(now, still_waiting)
            if not isinstance(turn, Turn):
                if turn != math.inf:  # inf: a release or a join serves the queues again
                    self._timer.arm(turn)
                return
            self._budget.grant()
            turn.item.set_result(self._budget.not_before(now))


def still_waiting(waiter: asyncio.Future[Any]) -> bool:
    """A waiter not done yet (a done one went away and is not yet out of its queue)."""
    return not waiter.done()
