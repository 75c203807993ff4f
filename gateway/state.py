"""Typed application state: the keys under which the app factory stores its parts."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web
from redis.asyncio import Redis

from gateway.auth import Callers
from gateway.cache import CacheStore
from gateway.clock import Clock
from gateway.limiter import Limiter
from gateway.metrics import GatewayMetrics
from gateway.service import CallResultService
from gateway.settings import Settings


@dataclass(frozen=True, slots=True)
class Parts:
    """What the app is built from; fixed when the app factory returns."""

    settings: Settings
    clock: Clock
    metrics: GatewayMetrics
    cache: CacheStore | None
    limiter: Limiter
    mode: str
    redis: Redis | None = None
    callers: Callers | None = None  # None: caller authentication switched off
    # The configured caller names (from the callers file, auth on or off): the bounded set a
    # limit.caller_header value may name.
    caller_names: frozenset[str] = frozenset()


PARTS = web.AppKey("parts", Parts)
# Set by the upstream cleanup context once the HTTP client session exists.
SERVICE = web.AppKey("service", CallResultService)
# Per request: the id echoed in X-Request-ID and carried by every log line of the request.
REQUEST_ID = web.RequestKey("request_id", str)
# Per request: the authenticated caller's name, for the access log.
CALLER = web.RequestKey("caller", str)
