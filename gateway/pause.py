"""The fleet-wide upstream pause: after the upstream answers 429, nobody sends for a while.

The vendor documents no 429, only "at most 10 concurrent, more than 1 s between batches"; a
server that says 429 anyway is told to be left alone until its ``Retry-After`` has passed (or
``upstream.pause_ms`` when it gives none), by every replica. ``UpstreamCaller`` asks
``remaining()`` before it queues for a permit and again just before it sends.

``UpstreamPause`` is the protocol; ``InMemoryPause`` serves one process (embedded mode) and
``pause_redis.RedisPause`` the fleet. A pause is only ever extended, never shortened.
"""

from __future__ import annotations

import math
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Protocol

from gateway.clock import Clock


class UpstreamPause(Protocol):
    async def pause(self, seconds: float) -> None:
        """Send nothing upstream for ``seconds`` from now (a longer pause in force stays)."""
        ...

    async def remaining(self) -> float:
        """Seconds until the upstream may be called again; 0 when it may now. Never raises."""
        ...

    async def close(self) -> None: ...


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Seconds a ``Retry-After`` value asks for (delta-seconds or an HTTP date), else None.

    ``now`` is epoch seconds (for the date form). A date in the past asks for 0 seconds.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text[:12]))  # 12 digits: far beyond any cap, never a huge int
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # RFC 9110 dates are GMT
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - now)


def pause_seconds(value: str | None, now: float, *, default_s: float, max_s: float) -> float:
    """How long to pause after a 429: its ``Retry-After``, else ``default_s``; at most ``max_s``.

    Never less than one second: a 429 always costs the upstream a breather.
    """
    asked = retry_after_seconds(value, now)
    seconds = default_s if asked is None or not math.isfinite(asked) else asked
    return min(max_s, max(1.0, seconds))


class InMemoryPause:
    """``UpstreamPause`` for one process, on the injected clock."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._until = 0.0  # clock.time() at which sending may resume

    async def pause(self, seconds: float) -> None:
        self._until = max(self._until, self._clock.time() + seconds)

    async def remaining(self) -> float:
        return max(0.0, self._until - self._clock.time())

    async def close(self) -> None:
        """Nothing to release."""
