"""Readiness: what ``/readyz`` reports, and the Redis probe that runs from start-up.

``/readyz`` answers 503 only while the replica cannot serve at all: ``starting`` (the
upstream client is not built yet) or ``draining`` (shutdown began). A Redis outage or an open
breaker leave it at 200 with the component listed under ``degraded``: every replica shares
Redis and the upstream, so failing readiness for them would take the whole fleet out of the
Service at once, while the replica still answers (local share of the budget, cache misses,
stale copies, fast 502/503 with Retry-After).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import Gauge

from gateway.breaker import BreakerState, CircuitBreaker
from gateway.clock import Clock
from gateway.limiter import Limiter
from gateway.limiter.failover import FailoverLimiter, Mode
from gateway.redis_client import REDIS_FAILURES, AnyRedis

PING_TIMEOUT_S = 1.0


async def redis_answers(redis: AnyRedis, timeout_s: float = PING_TIMEOUT_S) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await redis.ping())
    except REDIS_FAILURES:
        return False


def limiter_mode(limiter: Limiter) -> str | None:
    """``global``, ``fallback`` or ``recovering`` for the fleet limiter; None for others."""
    return limiter.mode.value if isinstance(limiter, FailoverLimiter) else None


async def probe_redis_at_start(
    redis: AnyRedis,
    limiter: Limiter,
    degraded: Gauge,
    on_error: Callable[[], None],
    clock: Clock,
    every_s: float = 1.0,
) -> None:
    """Degraded from the first second when Redis is down at start-up, until it first answers.

    The limiter sets the same gauge when it leaves or regains its global mode, but only
    notices an outage on its first permit; this covers the time before. Once Redis answers,
    the gauge goes back to 0 unless the limiter itself reports degraded (then it owns it).
    """
    while not await redis_answers(redis):
        on_error()
        degraded.set(1)
        await clock.sleep(every_s)
    if limiter_mode(limiter) in (None, Mode.GLOBAL.value):
        degraded.set(0)


def readiness(
    *,
    started: bool,
    draining: bool,
    mode: str,
    redis_up: bool | None,
    limiter: Limiter,
    breaker: CircuitBreaker | None,
    callers: int | None,
) -> tuple[int, dict[str, object]]:
    """The status and JSON body of ``/readyz`` (never a secret)."""
    degraded = []
    redis: dict[str, object] | None = None
    if redis_up is not None:
        lim = limiter_mode(limiter)
        redis = {"reachable": redis_up, "limiter": lim}
        if not redis_up or lim not in (None, Mode.GLOBAL.value):
            degraded.append("redis")
    state = None if breaker is None else breaker.state
    if state is not None and state is not BreakerState.CLOSED:
        degraded.append("upstream")
    status = "draining" if draining else "ready" if started else "starting"
    body: dict[str, object] = {
        "status": status,
        "mode": mode,
        "degraded": degraded,
        "redis": redis,
        "upstream": {"breaker": None if state is None else state.value},
        "callers": callers,
    }
    return (200 if status == "ready" else 503), body
