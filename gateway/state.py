"""Typed application state: the keys under which the app factory stores its parts."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from gateway.auth import KeyRing
from gateway.breaker import CircuitBreaker
from gateway.cache import CacheStore
from gateway.clock import Clock
from gateway.limiter import Limiter
from gateway.metrics import GatewayMetrics
from gateway.otel import RequestSpans
from gateway.redis_client import AnyRedis
from gateway.reload import KeyReloader
from gateway.service import CallResultService
from gateway.settings import Settings


@dataclass(slots=True)
class Lifecycle:
    """What changes while the app runs: ``draining`` is set when shutdown begins (/readyz 503)."""

    draining: bool = False


@dataclass(frozen=True, slots=True)
class Parts:
    """What the app is built from; fixed when the app factory returns."""

    settings: Settings
    clock: Clock
    metrics: GatewayMetrics
    cache: CacheStore | None
    limiter: Limiter
    mode: str
    keys: KeyRing
    reloader: KeyReloader
    redis: AnyRedis | None = None
    # The configured caller names (from the callers file, auth on or off): the bounded set a
    # limit.caller_header value may name.
    caller_names: frozenset[str] = frozenset()
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    spans: RequestSpans | None = None  # OpenTelemetry export, off by default


PARTS = web.AppKey("parts", Parts)
# Set by the upstream cleanup context once the HTTP client session exists.
SERVICE = web.AppKey("service", CallResultService)
# Set by the upstream cleanup context: the breaker whose state /readyz reports.
BREAKER = web.AppKey("breaker", CircuitBreaker)
