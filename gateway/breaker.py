"""The upstream circuit breaker: stop calling an upstream that keeps failing, probe it later.

closed --(``failures`` consecutive failures)--> open --(``open_s`` elapsed)--> half-open
half-open lets exactly one probe through: success closes, failure opens again.
Time is the injected clock's; no I/O.
"""

from __future__ import annotations

from enum import Enum

from gateway.clock import Clock


class BreakerState(Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"


class CircuitBreaker:
    def __init__(self, *, failures: int, open_s: float, clock: Clock) -> None:
        self._threshold = failures
        self._open_s = open_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> BreakerState:
        if self._opened_at is None:
            return BreakerState.CLOSED
        if self._clock.monotonic() - self._opened_at >= self._open_s:
            return BreakerState.HALF_OPEN
        return BreakerState.OPEN

    def retry_after(self) -> float:
        """Seconds until the next probe may go out (0 when calls are allowed)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._open_s - self._clock.monotonic())

    def allow(self) -> bool:
        """May a call go out now? In half-open, only the one probe may."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self._threshold:
            self._opened_at = self._clock.monotonic()
        self._probing = False

    def abandon(self) -> None:
        """A call that was allowed ended without a verdict (cancelled): free the probe slot."""
        self._probing = False
