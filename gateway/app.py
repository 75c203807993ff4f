"""The app factory: builds every part from the settings and wires the request path.

Backends (cache store, limiter, coalescer) are chosen here and nowhere else; tests inject
their own clock, registry or backends. No globals: two apps in one process share nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.auth import AccessKeys, Callers, KeyRing, load_callers
from gateway.breaker import CircuitBreaker
from gateway.cache import CacheStore, InMemoryCacheStore
from gateway.cache_policy import CachePolicy
from gateway.cache_tiered import shared_cache
from gateway.clock import Clock, SystemClock
from gateway.coalesce import Coalescer, InProcessCoalescer
from gateway.coalesce_redis import RedisCoalescer
from gateway.handlers import add_routes
from gateway.health import probe_redis_at_start
from gateway.limiter import FleetTimings, LimitConfig, Limiter
from gateway.limiter.failover import FailoverLimiter
from gateway.limiter.memory import InMemoryLimiter
from gateway.limiter.scheduler import DEFAULT_POLICY, CallerPolicy, same_policy
from gateway.metrics import BREAKER_STATES, GatewayMetrics
from gateway.openapi import add_openapi_route
from gateway.otel import RequestSpans
from gateway.pause import InMemoryPause
from gateway.pause_redis import RedisPause
from gateway.popularity import Popularity, RefreshRule
from gateway.redis_client import AnyRedis, check_server, connect
from gateway.reload import KeyReloader
from gateway.service import CallResultService
from gateway.settings import Settings, load_settings
from gateway.state import BREAKER, PARTS, SERVICE, Parts
from gateway.upstream import UpstreamClient, UpstreamResponse, send_trace, ssl_context
from gateway.upstream_call import RetryPolicy, UpstreamCaller

log = logging.getLogger("gateway")


def _known(count: int | None) -> float:
    return math.nan if count is None else count


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


# A granted permit is sent within this long of its grant (plus the connect time), or taken
# afresh (``Permit.check``).
PERMIT_FENCE_S = 1.0


def limiter_lease_s(settings: Settings) -> float:
    """How long one permit may keep the vendor busy after its grant: the send allowance, the
    connection, the call, and the hold of a call the gateway gave up on. A lease in Redis
    lapses only after that, so a frozen or dead holder's request is surely over by then.
    """
    up = settings.upstream
    return PERMIT_FENCE_S + (up.connect_timeout_ms + up.timeout_ms + up.abandoned_hold_ms) / 1000


def caller_policy(roster: Callable[[], Callers | None]) -> Callable[[str], CallerPolicy]:
    """Each caller's share from the callers file in force (``roster``, read again after a
    reload); everyone else (anonymous, other) weight 1."""
    cached: list[tuple[Callers | None, dict[str, CallerPolicy]]] = []

    def policy(name: str) -> CallerPolicy:
        callers = roster()
        if not cached or cached[0][0] is not callers:
            table = {
                c.name: CallerPolicy(c.weight, c.max_in_flight, c.max_queue)
                for c in (callers.callers if callers is not None else ())
            }
            cached[:] = [(callers, table)]
        return cached[0][1].get(name, DEFAULT_POLICY)

    return policy


def background_permits(settings: Settings) -> int:
    """Permits refresh-ahead may hold (and take per window): its share of the budget, 0 = off."""
    if settings.cache.refresh_ahead_s <= 0 or not settings.cache.enabled:
        return 0
    return math.floor(settings.cache.refresh_max_share * settings.limit.max_concurrent)


def build_limiter(
    settings: Settings,
    clock: Clock,
    redis: AnyRedis | None,
    metrics: GatewayMetrics,
    policy: Callable[[str], CallerPolicy] | None = None,
) -> Limiter:
    lim = settings.limit
    limit = LimitConfig(
        max_concurrent=lim.max_concurrent,
        window_s=(lim.window_ms + lim.margin_ms) / 1000,
        max_queue=lim.max_queue,
        max_wait_s=lim.max_wait_ms / 1000,
        policy=policy or same_policy,
        background_max=background_permits(settings),
        replicas=lim.replicas,
        grant_ahead_s=lim.grant_ahead_ms / 1000,
    )
    if redis is None:
        return InMemoryLimiter(limit, clock=clock)
    timings = FleetTimings(
        lease_s=limiter_lease_s(settings),
        # Checked again once connected: the allowance covers the connection's set-up.
        fence_s=PERMIT_FENCE_S + settings.upstream.connect_timeout_ms / 1000,
        skew_s=lim.clock_skew_ms / 1000,
    )
    degraded = metrics.degraded.labels("redis")
    # The global limiter, falling back to floor(max_concurrent / replicas) per replica when
    # Redis fails (never failing open).
    return FailoverLimiter(
        redis,
        limit,
        timings,
        clock=clock,
        on_error=metrics.redis_errors.labels("limiter").inc,
        on_degraded=lambda down: degraded.set(int(down)),
        namespace=settings.redis.namespace,
    )


def popularity(settings: Settings) -> Popularity | None:
    """Hit counts for refresh-ahead, when it is on (the limiter grants background permits)."""
    if background_permits(settings) == 0:
        return None
    c = settings.cache
    rule = RefreshRule(min_hits=c.refresh_min_hits, lead_s=c.refresh_ahead_s, max_ttl=c.ttl_open_s)
    return Popularity(rule, max_keys=c.max_entries)


def access_keys(settings: Settings, config_file: str | None = None) -> AccessKeys:
    """The callers and admin key to use: from the files as they are now.

    With ``config_file``, the settings are read again (file and environment) for
    ``admin.key_sha256`` and ``auth.callers_file``; whether authentication is on stays as at
    start-up. Raises ``ConfigError`` naming what is wrong.
    """
    fresh = settings if config_file is None else load_settings(config_file)
    callers = load_callers(fresh.auth.callers_file) if settings.auth.enabled else None
    return AccessKeys(callers, fresh.admin.key_sha256)


def create_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    registry: CollectorRegistry | None = None,
    cache: CacheStore | None = None,
    limiter: Limiter | None = None,
    coalescer: Coalescer[UpstreamResponse] | None = None,
    config_file: str | None = None,
    spans: RequestSpans | None = None,
) -> web.Application:
    """A ready-to-run gateway app. Parts not given are built from ``settings``.

    ``config_file``: the file ``settings`` came from, read again by a key reload.
    """
    if spans is None and settings.tracing.otlp_endpoint:
        spans = RequestSpans(settings.tracing.otlp_endpoint, settings.tracing.service_name)
    clock = clock or SystemClock()
    redis = None if settings.embedded else connect(settings.redis)
    metrics = GatewayMetrics(
        registry or CollectorRegistry(),
        redis=redis is not None,
        cache=cache is not None or settings.cache.enabled,
        auth=settings.auth.enabled,
    )
    # The callers file names the callers and their shares; with auth off it is still read
    # for that (its keys are then not checked). A reload of the keys applies new shares.
    roster = load_callers(settings.auth.callers_file) if settings.auth.callers_file else None
    metrics.observe_callers(c.name for c in (roster.callers if roster is not None else ()))
    keys = KeyRing(access_keys(settings))
    policy = caller_policy(lambda: keys.current.callers or roster)
    if limiter is None:
        limiter = build_limiter(settings, clock, redis, metrics, policy)
    if cache is None and settings.cache.enabled:
        cache = (
            InMemoryCacheStore(max_entries=settings.cache.max_entries, clock=clock)
            if redis is None
            else shared_cache(
                redis,
                clock=clock,
                local_max_bytes=settings.cache.local_max_bytes,
                namespace=settings.redis.namespace,
            )
        )
    if coalescer is None:
        coalescer = (
            InProcessCoalescer[UpstreamResponse]()
            if redis is None
            else RedisCoalescer(
                redis,
                lease_s=COALESCE_LEASE_S,
                max_wait_s=_call_budget_s(settings),
                clock=clock,
                namespace=settings.redis.namespace,
            )
        )
    pause = (  # after an upstream 429, the fleet sends nothing for a while
        InMemoryPause(clock)
        if redis is None
        else RedisPause(
            redis,
            clock=clock,
            on_error=metrics.redis_errors.labels("limiter").inc,
            namespace=settings.redis.namespace,
        )
    )
    lim = settings.limit
    metrics.observe_limiter(
        lim.max_concurrent,
        (lim.window_ms + lim.margin_ms) / 1000,
        in_flight=lambda: limiter.snapshot().in_flight,
        queued=lambda: limiter.snapshot().queued,
        fleet_in_flight=lambda: _known(limiter.snapshot().fleet_in_flight),
        fleet_starts=lambda: _known(limiter.snapshot().fleet_starts),
    )
    # No middlewares: ``front.FrontDoor`` (serve the app with ``front.GatewayRunner``) gives
    # every request its id, metrics, access line and errors as answers.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    reloader = KeyReloader(
        keys,
        lambda: access_keys(settings, config_file),
        paths=[settings.auth.callers_file if settings.auth.enabled else "", config_file or ""],
        metrics=metrics,
        clock=clock,
        interval_s=settings.auth.reload_interval_s,
    )
    parts = app[PARTS] = Parts(
        settings=settings,
        clock=clock,
        metrics=metrics,
        cache=cache,
        limiter=limiter,
        mode="embedded" if redis is None else "redis",
        keys=keys,
        reloader=reloader,
        redis=redis,
        caller_names=frozenset(c.name for c in (roster.callers if roster is not None else ())),
        spans=spans,
    )

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        up = settings.upstream
        connector = aiohttp.TCPConnector(limit=lim.max_concurrent * 2, ssl=ssl_context(up))
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            trace_configs=[send_trace()],
            # HTTPS_PROXY/HTTP_PROXY/NO_PROXY, unless upstream.proxy names one.
            trust_env=up.trust_env and not up.proxy,
        ) as session:
            breaker = CircuitBreaker(
                failures=up.breaker_failures, open_s=up.breaker_open_ms / 1000, clock=clock
            )
            app[BREAKER] = breaker
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
                abandoned_hold_s=up.abandoned_hold_ms / 1000,
                pause=pause,
            )
            service = CallResultService(
                cache=cache,
                policy=cache_policy(settings),
                coalescer=coalescer,
                caller=caller,
                metrics=metrics,
                clock=clock,
                no_cache_min_age=settings.cache.no_cache_min_age_s,
                popularity=popularity(settings),
                locale=settings.upstream.locale or None,
                undocumented=settings.validation.undocumented,
            )
            app[SERVICE] = service
            yield
            await service.close()

    async def backends_ctx(app: web.Application) -> AsyncIterator[None]:
        # Every backend's lifetime, Redis or not. At exit the order matters: the limiter first
        # (it gives back what it holds, through Redis), then the coalescer and the cache (their
        # subscriptions), and the shared Redis client last, once nothing uses it.
        if redis is not None:
            await check_server(redis)  # ConfigError: allkeys-*, a cluster below Redis 7
        limiter.start()
        probe = None
        if redis is not None:
            probe = asyncio.ensure_future(
                probe_redis_at_start(
                    redis,
                    limiter,
                    metrics.degraded.labels("redis"),
                    metrics.redis_errors.labels("ping").inc,
                    clock,
                )
            )
        yield
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        await limiter.close()
        await coalescer.close()
        if cache is not None:
            await cache.close()
        if redis is not None:
            await redis.aclose()
        if spans is not None:
            spans.shutdown()

    async def reload_ctx(app: web.Application) -> AsyncIterator[None]:
        watcher = asyncio.ensure_future(reloader.watch())
        yield
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher

    async def draining(app: web.Application) -> None:
        parts.lifecycle.draining = True
        # Queued callers get their 503 (or stale copy) now, so shutdown takes as long as the
        # calls already at the vendor, well within server.shutdown_timeout_s.
        limiter.shed()

    app.cleanup_ctx.append(backends_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(reload_ctx)
    app.on_shutdown.append(draining)
    add_routes(app)
    add_openapi_route(app)
    return app
