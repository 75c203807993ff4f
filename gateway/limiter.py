"""The upstream limit: at most N requests in flight and N starts per (window + margin).

The vendor counts a start when the request arrives, so a start counts from when it is sent,
not from when its permit was granted: the holder calls ``Permit.sent()`` as the request goes
out. Until then the start is pending and counts as in the window however long it waits (a
stalled event loop or a slow TLS handshake cannot bunch starts up); a permit released without
``sent()`` counts its start at release (the request may have reached the vendor).

``WindowBudget`` is the pure decision (times are inputs). ``InMemoryLimiter`` is the
single-instance backend: callers wait in FIFO order in a bounded queue with a bounded wait,
and every permit is given back on success, error, timeout and cancellation.
The Redis backend (fleet-wide) implements the same ``Limiter`` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from gateway.clock import Clock, Rearm
from gateway.errors import QueueFull, QueueTimeout


@dataclass(frozen=True, slots=True)
class LimiterSnapshot:
    in_flight: int
    queued: int


class Permit(Protocol):
    def check(self) -> None:
        """Raise ``PermitLost`` unless a request may be sent on this permit now (call it just
        before sending). A permit of a lost shared state, or one not used in time, is not.
        """
        ...

    async def sent(self) -> None:
        """The request is being sent now: its start counts from this moment.

        Idempotent. Never raises for a backend failure: the start then stays pending (counted
        as in the window) until the permit is released, which is the safe side.
        """
        ...


class Limiter(Protocol):
    def permit(self) -> AbstractAsyncContextManager[Permit]:
        """An async context manager holding one upstream permit for its body.

        Call ``sent()`` on the permit it yields when the request goes out; a permit released
        without that counts its start at release.

        Raises ``QueueFull`` at once when the queue is at its bound and ``QueueTimeout``
        when no permit came within the wait bound.
        """
        ...

    def snapshot(self) -> LimiterSnapshot: ...

    def start(self) -> None:
        """Start background work (a shared limiter claims its membership); ``permit()`` does
        it too. Call it at start-up so a backend down from the start shows at once.
        """
        ...

    async def close(self) -> None:
        """Stop background work and give back what is held (at shutdown)."""
        ...


class WindowBudget:
    """Concurrency plus sliding-window start budget. All times in seconds on one clock.

    A granted permit's start is pending (it counts as in the window whatever the time) until
    ``sent``; then it counts for ``window`` from the time it was sent.
    """

    def __init__(self, max_concurrent: int, window: float) -> None:
        self.max_concurrent = max_concurrent
        self.window = window
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
        while self._starts and self._starts[0] <= now - self.window:
            self._starts.popleft()
        if len(self._starts) + self.pending + pending_elsewhere < self.max_concurrent:
            return 0.0
        if not self._starts:
            return math.inf  # only pending starts: none leaves before it is sent
        return self._starts[0] + self.window - now

    def grant(self) -> None:
        """A permit is taken: one more in flight, its start pending."""
        self.in_flight += 1
        self.pending += 1

    def sent(self, now: float) -> None:
        """A pending start went out at ``now``."""
        self.pending -= 1
        self.record(now)

    def record(self, now: float) -> None:
        """A start at ``now`` that this budget did not grant (it counts all the same)."""
        self._starts.append(now)

    def finish(self) -> None:
        self.in_flight -= 1

    def retry_after(self, ahead: int) -> float:
        """An honest estimate of when a caller with ``ahead`` waiters before it gets a start."""
        return (ahead // self.max_concurrent + 1) * self.window


class BudgetPermit:
    """A permit whose start ``record`` notes at ``sent()``, or at ``close()`` (release)
    if it was never sent; once either way.
    """

    __slots__ = ("_record",)

    def __init__(self, record: Callable[[], None]) -> None:
        self._record: Callable[[], None] | None = record

    def check(self) -> None:
        """A local permit stays good while held."""

    async def sent(self) -> None:
        self.close()

    def close(self) -> None:
        record, self._record = self._record, None
        if record is not None:
            record()


class InMemoryLimiter:
    """The single-process limiter: one ``WindowBudget`` and a FIFO queue of waiters.

    No dispatcher task: the queue is served whenever a permit is released, a waiter joins,
    or the window timer fires, so an idle limiter costs nothing.
    """

    def __init__(
        self,
        *,
        max_concurrent: int,
        window_s: float,
        max_queue: int,
        max_wait_s: float,
        clock: Clock,
    ) -> None:
        self._budget = WindowBudget(max_concurrent, window_s)
        self._max_queue = max_queue
        self._max_wait = max_wait_s
        self._clock = clock
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer = Rearm(clock, self._serve)

    def snapshot(self) -> LimiterSnapshot:
        return LimiterSnapshot(self._budget.in_flight, len(self._waiters))

    def start(self) -> None:
        """Nothing runs in the background."""

    async def close(self) -> None:
        """Nothing to give back: the budget dies with the process."""

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[Permit]:
        await self._acquire()
        permit = BudgetPermit(self._sent)
        try:
            yield permit
        finally:
            permit.close()  # never sent: it may have reached the vendor, count it from now
            self._budget.finish()
            self._serve()

    def _sent(self) -> None:
        # No re-serve: the oldest sent start, which the timer waits for, is unchanged.
        self._budget.sent(self._clock.monotonic())

    async def _acquire(self) -> None:
        now = self._clock.monotonic()
        if not self._waiters and self._budget.delay(now) == 0:
            self._budget.grant()
            return
        ahead = len(self._waiters)
        if ahead >= self._max_queue:
            raise QueueFull(self._budget.retry_after(ahead))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        deadline = self._clock.call_later(self._max_wait, lambda: self._expire(waiter))
        self._serve()
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted in the same tick the caller went away: hand the permit back.
                self._sent()
                self._budget.finish()
            self._remove(waiter)
            self._serve()
            raise
        finally:
            deadline.cancel()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        ahead = self._waiters.index(waiter) if waiter in self._waiters else 0
        self._remove(waiter)
        waiter.set_exception(QueueTimeout(self._budget.retry_after(ahead)))

    def _remove(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):  # already served or expired
            self._waiters.remove(waiter)

    def _serve(self) -> None:
        """Grant permits to the head of the queue while the budget allows."""
        while self._waiters:
            now = self._clock.monotonic()
            delay = self._budget.delay(now)
            if delay > 0:
                if delay != math.inf:
                    self._timer.arm(now + delay)
                return
            waiter = self._waiters.popleft()
            if waiter.done():
                continue
            self._budget.grant()
            waiter.set_result(None)
