"""The app factory: builds every part from the settings and wires the request path.

Backends (cache store, limiter, coalescer) are chosen here and nowhere else; tests inject
their own clock, registry or backends. No globals: two apps in one process share nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from gateway.auth import load_callers
from gateway.breaker import CircuitBreaker
from gateway.cache import CacheStore, InMemoryCacheStore
from gateway.cache_local import shared_cache
from gateway.cache_policy import CachePolicy
from gateway.clock import Clock, SystemClock
from gateway.coalesce import Coalescer, InProcessCoalescer
from gateway.coalesce_redis import RedisCoalescer
from gateway.handlers import add_routes
from gateway.limiter import InMemoryLimiter, Limiter
from gateway.limiter_failover import FailoverLimiter
from gateway.metrics import BREAKER_STATES, GatewayMetrics
from gateway.middleware import error_middleware, observe_middleware
from gateway.openapi import add_openapi_route
from gateway.redis_client import connect
from gateway.retry import RetryPolicy, UpstreamCaller
from gateway.service import CallResultService
from gateway.settings import Settings
from gateway.state import PARTS, SERVICE, Parts
from gateway.upstream import UpstreamClient, UpstreamResponse, send_trace, ssl_context

log = logging.getLogger("gateway")


def cache_policy(settings: Settings) -> CachePolicy:
    c = settings.cache
    return CachePolicy(
        ttl_closed=c.ttl_closed_s,
        ttl_open=c.ttl_open_s,
        stale=c.stale_s,
        negative=c.negative_ttl_s,
        swr=c.swr_s,
    )


# Identical misses across replicas wait on one lock; its lease is renewed while the leader
# lives, so it only bounds how long a crashed leader's followers wait before one takes over.
COALESCE_LEASE_S = 5.0


def _call_budget_s(settings: Settings) -> float:
    """The longest one miss can take: queue wait plus the upstream timeout."""
    return (settings.limit.max_wait_ms + settings.upstream.timeout_ms) / 1000 + 1


def build_limiter(
    settings: Settings, clock: Clock, redis: Redis | None, metrics: GatewayMetrics
) -> Limiter:
    lim = settings.limit
    window_s = (lim.window_ms + lim.margin_ms) / 1000
    if redis is None:
        return InMemoryLimiter(
            max_concurrent=lim.max_concurrent,
            window_s=window_s,
            max_queue=lim.max_queue,
            max_wait_s=lim.max_wait_ms / 1000,
            clock=clock,
        )
    degraded = metrics.degraded.labels("redis")
    # The global limiter, falling back to floor(max_concurrent / replicas) per replica when
    # Redis fails (never failing open). A lease outlives the upstream timeout, so a permit
    # cannot lapse under a live call even if renewals stall; a crashed holder's permits
    # return within this time.
    return FailoverLimiter(
        redis,
        max_concurrent=lim.max_concurrent,
        window_s=window_s,
        max_queue=lim.max_queue,
        max_wait_s=lim.max_wait_ms / 1000,
        lease_s=settings.upstream.timeout_ms / 1000 + 1,
        clock=clock,
        replicas=lim.replicas,
        on_error=metrics.redis_errors.labels("limiter").inc,
        on_degraded=lambda down: degraded.set(int(down)),
    )


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    cache: CacheStore | None = None,
    limiter: Limiter | None = None,
    coalescer: Coalescer[UpstreamResponse] | None = None,
) -> web.Application:
    """A ready-to-run gateway app. Parts not given are built from ``settings``."""
    clock = clock or SystemClock()
    metrics = GatewayMetrics(registry or CollectorRegistry())
    redis = None if settings.embedded else connect(settings.redis)
    if limiter is None:
        limiter = build_limiter(settings, clock, redis, metrics)
    if cache is None and settings.cache.enabled:
        cache = (
            InMemoryCacheStore(max_entries=settings.cache.max_entries, clock=clock)
            if redis is None
            else shared_cache(redis, clock=clock, local_max_bytes=settings.cache.local_max_bytes)
        )
    if coalescer is None:
        coalescer = (
            InProcessCoalescer[UpstreamResponse]()
            if redis is None
            else RedisCoalescer(
                redis, lease_s=COALESCE_LEASE_S, max_wait_s=_call_budget_s(settings), clock=clock
            )
        )
    lim = settings.limit
    metrics.observe_limiter(
        lim.max_concurrent,
        (lim.window_ms + lim.margin_ms) / 1000,
        in_flight=lambda: limiter.snapshot().in_flight,
        queued=lambda: limiter.snapshot().queued,
    )
    app = web.Application(
        middlewares=[observe_middleware, error_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    app[PARTS] = Parts(
        settings=settings,
        clock=clock,
        metrics=metrics,
        cache=cache,
        limiter=limiter,
        mode="embedded" if redis is None else "redis",
        redis=redis,
        callers=load_callers(settings.auth.callers_file) if settings.auth.enabled else None,
    )

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        up = settings.upstream
        connector = aiohttp.TCPConnector(limit=lim.max_concurrent * 2, ssl=ssl_context(up))
        async with aiohttp.ClientSession(
            connector=connector, auto_decompress=True, trace_configs=[send_trace()]
        ) as session:
            breaker = CircuitBreaker(
                failures=up.breaker_failures, open_s=up.breaker_open_ms / 1000, clock=clock
            )
            metrics.breaker_state.set_function(lambda: BREAKER_STATES[breaker.state.value])
            caller = UpstreamCaller(
                upstream=UpstreamClient(up, settings.upstream_host, session, clock),
                limiter=limiter,
                breaker=breaker,
                policy=RetryPolicy(
                    retries=up.retries,
                    base_s=up.retry_base_ms / 1000,
                    max_s=up.retry_max_ms / 1000,
                    deadline_s=up.deadline_ms / 1000,
                ),
                metrics=metrics,
                clock=clock,
            )
            service = CallResultService(
                cache=cache,
                policy=cache_policy(settings),
                coalescer=coalescer,
                caller=caller,
                metrics=metrics,
                clock=clock,
            )
            app[SERVICE] = service
            yield
            await service.close()

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await limiter.close()
        await coalescer.close()
        if cache is not None:
            await cache.close()
        if redis is not None:
            await redis.aclose()

    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    add_routes(app)
    add_openapi_route(app)
    return app
