"""The limiter's contract: what the request path asks of every backend.

``Limiter`` hands out upstream permits; ``Permit`` is what a holder checks and marks as sent.
The backends: ``memory.InMemoryLimiter`` (one process), ``redis_limiter.RedisLimiter`` (the
fleet, through Redis) and ``failover.FailoverLimiter`` (the Redis one, falling back to a local
share when Redis is out of reach; what it uses of the Redis one is ``FleetLimiter``).
``scheduler.FairScheduler`` decides whose turn is next in each of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final, Protocol

from gateway.errors import QueueFull

# The caller of a request nobody named (auth off, no caller header): one share for all of them.
ANONYMOUS: Final = "anonymous"
# The caller of background work (refresh-ahead): it owns no share, it takes idle permits.
BACKGROUND: Final = "background"


@dataclass(frozen=True, slots=True)
class LimiterSnapshot:
    in_flight: int
    queued: int
    # By caller, for metrics; left out of equality so a snapshot compares as (held, queued).
    queued_by_caller: Mapping[str, int] = field(default_factory=dict, compare=False)
    # What proves compliance: the whole fleet's permits in flight and starts in the current
    # window as the limiter counts them (None: not known now, e.g. cut off from Redis).
    fleet_in_flight: int | None = field(default=None, compare=False)
    fleet_starts: int | None = field(default=None, compare=False)


def shutting_down() -> QueueFull:
    """What a waiter gets when its limiter sheds its queue (the process is going away)."""
    return QueueFull(1.0, "The gateway is shutting down; retry (another replica answers).")


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
    def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AbstractAsyncContextManager[Permit]:
        """An async context manager holding one upstream permit for its body.

        Permits are shared fairly between callers (``caller``: a name from a bounded set);
        ``background`` work (refresh-ahead) only gets a permit nobody else waits for.
        Call ``sent()`` on the permit it yields when the request goes out; a permit released
        without that counts its start at release.

        Raises ``QueueFull`` at once when the caller's queue is at its bound and
        ``QueueTimeout`` when no permit came within the wait bound.
        """
        ...

    def snapshot(self) -> LimiterSnapshot: ...

    def start(self) -> None:
        """Start background work (a shared limiter claims its membership); ``permit()`` does
        it too. Call it at start-up so a backend down from the start shows at once.
        """
        ...

    def shed(self) -> None:
        """The process is shutting down: every waiter, and every caller from now on, gets
        ``QueueFull`` at once (a 503, or a stale copy) instead of waiting; held permits stay.
        """
        ...

    async def close(self) -> None:
        """Stop background work and give back what is held (at shutdown)."""
        ...


class FleetPermit(Permit, Protocol):
    """A permit of a fleet-wide limiter, named by its lease in the shared state."""

    @property
    def lease(self) -> str: ...


class FleetLimiter(Protocol):
    """What ``failover.FailoverLimiter`` uses of the fleet-wide limiter it wraps
    (``redis_limiter.RedisLimiter``): the ``Limiter`` calls, with permits named by lease, and
    the membership it steers while Redis fails.
    """

    beating: bool
    """Whether heartbeats claim membership now (off while on the fallback share)."""

    @property
    def claimed_at(self) -> float:
        """When the latest membership claim was sent (monotonic): settling counts from it."""
        ...

    def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AbstractAsyncContextManager[FleetPermit]: ...

    def snapshot(self) -> LimiterSnapshot: ...

    def start(self) -> None: ...

    def shed(self) -> None: ...

    async def close(self) -> None: ...

    async def probe(self) -> None:
        """Raise ``BackendUnavailable`` unless the shared state takes a write now."""
        ...

    async def beat(self) -> int:
        """Claim membership now (and renew held leases); the number of members. Raises
        ``BackendUnavailable``, also for a claim that arrived too late to count."""
        ...
