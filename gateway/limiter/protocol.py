"""The limiter's contract: what the request path asks of every backend.

``Limiter`` hands out upstream permits; ``Permit`` is what a holder checks and marks as sent.
The backends: ``memory.InMemoryLimiter`` (one process), ``redis_limiter.RedisLimiter`` (the
fleet, through Redis) and ``failover.FailoverLimiter`` (the Redis one, falling back to a local
share when Redis is out of reach; what it uses of the Redis one is ``FleetLimiter``).
``scheduler.FairScheduler`` decides whose turn is next in each of them.
Every backend is built from one ``LimitConfig`` (the limit's shape); the fleet-wide ones also
take ``FleetTimings`` (how their shared state keeps time). Both are checked when made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Final, Protocol

from gateway.errors import QueueFull
from gateway.limiter.scheduler import CallerPolicy, same_policy

# The caller of a request nobody named (auth off, no caller header): one share for all of them.
ANONYMOUS: Final = "anonymous"
# The caller of background work (refresh-ahead): it owns no share, it takes idle permits.
BACKGROUND: Final = "background"


# A fleet-wide limiter counts a replica a member this many heartbeat periods after its beat.
MEMBER_BEATS: Final = 3


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, not {value!r}")


@dataclass(frozen=True, slots=True)
class LimitConfig:
    """The limit's own shape, the same for every backend and on every replica.

    At most ``max_concurrent`` permits held and as many starts per ``window_s`` (seconds, the
    safety margin included); each caller's queue holds ``max_queue`` waiters (unless its policy
    sets its own) for at most ``max_wait_s``. ``policy`` gives each caller its weight and caps;
    ``background_max`` is how many permits (held, and granted per window) background work may
    take, 0 for none. ``replicas`` is the fleet's size: cut off from the shared state, each
    replica keeps to its ``share``. ``grant_ahead_s``: a permit may be granted this long before
    the window's edge allows its start (a start leaving the window that soon counts as gone); its
    ``sent()`` then holds the request until the edge (at most a tenth of the window). Raises
    ``ValueError`` naming the field that is out of range.
    """

    max_concurrent: int
    window_s: float
    max_queue: int
    max_wait_s: float
    policy: Callable[[str], CallerPolicy] = same_policy
    background_max: int = 0
    replicas: int = 1
    grant_ahead_s: float = 0.0

    def __post_init__(self) -> None:
        _require(self.max_concurrent >= 1, "max_concurrent", ">= 1", self.max_concurrent)
        _require(self.window_s > 0, "window_s", "> 0", self.window_s)
        _require(
            0 <= self.grant_ahead_s <= self.window_s / 10,
            "grant_ahead_s",
            f"between 0 and a tenth of window_s ({self.window_s / 10})",
            self.grant_ahead_s,
        )
        _require(self.max_queue >= 0, "max_queue", ">= 0", self.max_queue)
        _require(self.max_wait_s >= 0, "max_wait_s", ">= 0", self.max_wait_s)
        _require(
            0 <= self.background_max <= self.max_concurrent,
            "background_max",
            f"between 0 and max_concurrent ({self.max_concurrent})",
            self.background_max,
        )
        _require(
            1 <= self.replicas <= self.max_concurrent,
            "replicas",
            f"between 1 and max_concurrent ({self.max_concurrent}): each needs a share",
            self.replicas,
        )

    @property
    def share(self) -> int:
        """What one replica may use on its own (cut off): the shares add up to the limit."""
        return self.max_concurrent // self.replicas


@dataclass(frozen=True, slots=True)
class FleetTimings:
    """How a fleet-wide limiter keeps time in its shared state (seconds; the same on every
    replica): ``lease_s`` outlives any request's time at the vendor; a heartbeat every
    ``beat_s`` claims membership, and counts only if applied within ``claim_s`` of its sending;
    a permit is sent within ``fence_s`` of the call that granted it, or not at all;
    ``skew_s`` is the most the replicas' and Redis's wall clocks may differ (an assumption).
    Raises ``ValueError`` naming the field that is out of range.
    """

    lease_s: float
    beat_s: float = 0.5
    fence_s: float = 1.0
    claim_s: float = 1.0
    skew_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("lease_s", "beat_s", "fence_s", "claim_s"):
            value = getattr(self, name)
            _require(value > 0, name, "> 0", value)
        _require(self.skew_s >= 0, "skew_s", ">= 0", self.skew_s)

    @property
    def member_s(self) -> float:
        """How long a heartbeat keeps its replica a member."""
        return MEMBER_BEATS * self.beat_s


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
        """The request is about to be sent: await it just before the bytes are written. A
        permit granted ahead of the window's edge (``LimitConfig.grant_ahead_s``) waits here
        until the edge has passed; the start then counts from the moment it returns.

        Idempotent. Never raises for a backend failure: the start then stays pending (counted
        as in the window) until the permit is released, which is the safe side. Raises
        ``PermitLost`` if the permit lapsed while it waited (nothing may be sent on it).
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

    @property
    def not_before(self) -> float:
        """When its request may go out (monotonic): the window's edge it was granted ahead of,
        or its grant."""
        ...


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
