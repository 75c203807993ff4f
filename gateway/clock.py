"""Time as an input.

Limiter windows, wait bounds, cache ages, the breaker and signature timestamps all read a
``Clock`` that the app factory injects, so tests move time with ``ManualClock.advance``
instead of sleeping. What Redis times (the global limiter's windows and leases on its
``TIME``, key expiry) runs on Redis's clock: those tests use short real windows.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Final, Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back; only differences mean anything."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch (UTC)."""
        ...

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` on the event loop after ``delay`` seconds of this clock."""
        ...

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds of this clock."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``time.time`` and the running loop's timers."""

    # The functions themselves, not methods calling them: read on every request.
    monotonic: Final = staticmethod(time.monotonic)
    time: Final = staticmethod(time.time)

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        return asyncio.get_running_loop().call_later(max(0.0, delay), callback)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(0.0, delay))


class _ManualTimer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualClock:
    """A clock that only moves when told to; timers fire inside ``advance``."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = 0.0
        self._epoch = start
        self._timers: list[tuple[float, int, _ManualTimer]] = []
        self._seq = itertools.count()

    def monotonic(self) -> float:
        return self._now

    def time(self) -> float:
        return self._epoch + self._now

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        timer = _ManualTimer(callback)
        heapq.heappush(self._timers, (self._now + max(0.0, delay), next(self._seq), timer))
        return timer

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def wake() -> None:
            if not future.done():
                future.set_result(None)

        handle = self.call_later(delay, wake)
        try:
            await future
        finally:
            handle.cancel()

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in order (each sees its own due time)."""
        target = self._now + seconds
        while self._timers and self._timers[0][0] <= target:
            due, _, timer = heapq.heappop(self._timers)
            self._now = max(self._now, due)
            if not timer.cancelled:
                timer.callback()
        self._now = target


class Rearm:
    """One re-armable timer on ``clock``: ``callback`` runs once at the earliest due time asked.

    ``arm(due)`` (seconds on ``clock.monotonic``) keeps an earlier pending timer as it is, so
    callers may re-arm on every pass without stacking timers; the callback re-arms if it must.
    """

    __slots__ = ("_callback", "_clock", "_due", "_handle")

    def __init__(self, clock: Clock, callback: Callable[[], None]) -> None:
        self._clock = clock
        self._callback = callback
        self._handle: TimerHandle | None = None
        self._due = math.inf

    def arm(self, due: float) -> None:
        if self._handle is not None and self._due <= due:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._due = due
        self._handle = self._clock.call_later(due - self._clock.monotonic(), self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle, self._due = None, math.inf

    def _fire(self) -> None:
        self._handle, self._due = None, math.inf
        self._callback()
