"""The request path after validation: cache lookup, coalescing, permit, upstream, store.

No HTTP here: handlers turn an ``Answer`` into a response. Cache hits never wait for a permit;
misses for the same key share one upstream call; every upstream call holds a permit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

from gateway.cache import CacheStore
from gateway.cache_policy import (
    CacheEntry,
    CachePolicy,
    Freshness,
    age_seconds,
    business_code,
    cache_key,
    fresh_ttl,
    freshness,
)
from gateway.clock import Clock
from gateway.coalesce import Coalescer
from gateway.errors import (
    Overloaded,
    QueueFull,
    UpstreamAuthRejected,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.limiter import Limiter
from gateway.metrics import GatewayMetrics
from gateway.upstream import UpstreamResponse
from gateway.validation import CallResultQuery


class Fetcher(Protocol):
    async def fetch(
        self, query: CallResultQuery, locale: str | None = None
    ) -> UpstreamResponse: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """What the caller gets: the upstream's status and bytes, plus cache headers."""

    status: int
    body: bytes
    content_type: str
    cache: str
    age: int
    warning: str | None = None


def upstream_outcome(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    if isinstance(exc, UpstreamAuthRejected):
        return "auth_rejected"
    return "http_error"


class CallResultService:
    def __init__(
        self,
        *,
        cache: CacheStore | None,
        policy: CachePolicy,
        limiter: Limiter,
        coalescer: Coalescer[UpstreamResponse],
        upstream: Fetcher,
        metrics: GatewayMetrics,
        clock: Clock,
    ) -> None:
        self._cache = cache
        self._policy = policy
        self._limiter = limiter
        self._coalescer = coalescer
        self._upstream = upstream
        self._metrics = metrics
        self._clock = clock

    async def answer(self, query: CallResultQuery, *, locale: str | None, refresh: bool) -> Answer:
        """Answer from cache when fresh, else from one (shared) upstream call.

        ``refresh`` (the caller's ``Cache-Control: no-cache``) skips the lookup, not the limit.
        When no permit can be had or the upstream fails, a stale copy is served if one exists.
        """
        key = cache_key(query, locale)
        stale: CacheEntry | None = None
        if self._cache is not None and not refresh:
            entry = await self._cache.get(key)
            now = self._clock.time()
            state = freshness(entry, now) if entry is not None else Freshness.EXPIRED
            if entry is not None and state is Freshness.FRESH:
                self._metrics.cache_lookups.labels("hit").inc()
                return Answer(200, entry.body, entry.content_type, "HIT", age_seconds(entry, now))
            if entry is not None and state is Freshness.STALE:
                stale = entry
            self._metrics.cache_lookups.labels("stale" if stale else "miss").inc()
        try:
            response, led = await self._coalescer.run(
                key, lambda: self._fetch_and_store(query, key, locale)
            )
        except (Overloaded, UpstreamError) as exc:
            if stale is None:
                raise
            return Answer(
                200,
                stale.body,
                stale.content_type,
                "STALE",
                age_seconds(stale, self._clock.time()),
                warning=f'110 isales-gateway "Response is stale: {exc.message}"',
            )
        if not led:
            label = "COALESCED"
        elif self._cache is None or refresh:
            label = "BYPASS"
        else:
            label = "MISS"
        return Answer(response.status, response.body, response.content_type, label, 0)

    async def _fetch_and_store(
        self, query: CallResultQuery, key: str, locale: str | None
    ) -> UpstreamResponse:
        response = await self._call_upstream(query, locale)
        code = business_code(response.status, response.body)
        self._metrics.upstream_requests.labels(
            "ok" if code == "0200000" else "business_error"
        ).inc()
        now = self._clock.time()
        ttl = fresh_ttl(query, code, _utc_date(now), self._policy)
        if self._cache is not None and ttl > 0:
            entry = CacheEntry(response.body, response.content_type, now, ttl, self._policy.stale)
            await self._cache.put(key, entry)
        return response

    async def _call_upstream(self, query: CallResultQuery, locale: str | None) -> UpstreamResponse:
        queued_at = self._clock.monotonic()
        try:
            async with self._limiter.permit():
                started = self._clock.monotonic()
                self._metrics.queue_wait.observe(started - queued_at)
                try:
                    return await self._upstream.fetch(query, locale)
                except UpstreamError as exc:
                    self._metrics.upstream_requests.labels(upstream_outcome(exc)).inc()
                    raise
                finally:
                    self._metrics.upstream_duration.observe(self._clock.monotonic() - started)
        except Overloaded as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            self._metrics.rejections.labels(reason).inc()
            raise


def _utc_date(epoch: float) -> date:
    return datetime.fromtimestamp(epoch, UTC).date()
