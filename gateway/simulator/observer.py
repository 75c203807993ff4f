"""Watches the vendor's rate limit as the upstream would see it, on arrival.

Pure: the caller passes ``now`` (seconds on a monotonic clock), so tests give explicit times.
The vendor asks for at most ``max_concurrent`` requests in flight and more than one window
between batches; this is read as: at every arrival, at most ``max_concurrent`` in flight
(counting the arrival) and at most ``max_concurrent`` arrivals in the half-open interval
``(now - window, now]`` (counting the arrival). An arrival breaking either is one violation.
"""

from __future__ import annotations

from collections import deque


class LimitObserver:
    """Counts in-flight requests and recent starts; records maxima and violations."""

    def __init__(self, max_concurrent: int, window_s: float) -> None:
        self.max_concurrent = max_concurrent
        self.window_s = window_s
        self.in_flight = 0
        self._starts: deque[float] = deque()
        self.max_in_flight = 0
        self.max_starts_in_window = 0
        self.violations = 0

    def arrive(self, now: float) -> bool:
        """Record an arrival at ``now``; True if it breaks the limit.

        Every ``arrive`` must be paired with one ``depart`` (use try/finally).
        """
        self.in_flight += 1
        self._starts.append(now)
        horizon = now - self.window_s
        while self._starts and self._starts[0] <= horizon:
            self._starts.popleft()
        starts = len(self._starts)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_starts_in_window = max(self.max_starts_in_window, starts)
        violated = self.in_flight > self.max_concurrent or starts > self.max_concurrent
        if violated:
            self.violations += 1
        return violated

    def depart(self) -> None:
        """A request's response is finished (or it was abandoned)."""
        self.in_flight -= 1

    def starts_in_window(self, now: float) -> int:
        """Arrivals in ``(now - window, now]``."""
        horizon = now - self.window_s
        return sum(1 for t in self._starts if horizon < t <= now)

    def reset(self) -> None:
        """Zero the maxima and the violation count.

        ``in_flight`` and the recent starts are live state, not counters: they are kept so
        that requests in flight across a reset still depart correctly and the window the
        upstream sees stays true.
        """
        self.max_in_flight = 0
        self.max_starts_in_window = 0
        self.violations = 0
