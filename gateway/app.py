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

from gateway.cache import CacheStore, InMemoryCacheStore
from gateway.cache_policy import CachePolicy
from gateway.clock import Clock, SystemClock
from gateway.coalesce import Coalescer, InProcessCoalescer
from gateway.handlers import add_routes
from gateway.limiter import InMemoryLimiter, Limiter
from gateway.metrics import GatewayMetrics
from gateway.middleware import error_middleware, observe_middleware
from gateway.service import CallResultService
from gateway.settings import Settings
from gateway.state import PARTS, SERVICE, Parts
from gateway.upstream import UpstreamClient, UpstreamResponse, ssl_context

log = logging.getLogger("gateway")


def cache_policy(settings: Settings) -> CachePolicy:
    c = settings.cache
    return CachePolicy(
        ttl_closed=c.ttl_closed_s, ttl_open=c.ttl_open_s, stale=c.stale_s, negative=c.negative_ttl_s
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
    lim = settings.limit
    if limiter is None:
        limiter = InMemoryLimiter(
            max_concurrent=lim.max_concurrent,
            window_s=(lim.window_ms + lim.margin_ms) / 1000,
            max_queue=lim.max_queue,
            max_wait_s=lim.max_wait_ms / 1000,
            clock=clock,
        )
    if cache is None and settings.cache.enabled:
        cache = InMemoryCacheStore(max_entries=settings.cache.max_entries, clock=clock)
    metrics.observe_limiter(
        lim.max_concurrent,
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
        mode="embedded" if settings.embedded else "redis",
    )
    coalescer = coalescer or InProcessCoalescer[UpstreamResponse]()

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        up = settings.upstream
        connector = aiohttp.TCPConnector(limit=lim.max_concurrent * 2, ssl=ssl_context(up))
        async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as session:
            app[SERVICE] = CallResultService(
                cache=cache,
                policy=cache_policy(settings),
                limiter=limiter,
                coalescer=coalescer,
                upstream=UpstreamClient(up, settings.upstream_host, session, clock),
                metrics=metrics,
                clock=clock,
            )
            yield

    app.cleanup_ctx.append(upstream_ctx)
    add_routes(app)
    return app
