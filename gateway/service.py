"""The request path after validation: cache lookup, coalescing, permit, upstream, store.

No HTTP here: handlers turn an ``Answer`` into a response. Cache hits never wait for a permit;
misses for the same key share one upstream call; every upstream call holds a permit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Protocol

from gateway.cache import CacheStore
from gateway.cache_policy import (
    SUCCESS,
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
    BackendUnavailable,
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
            try:
                entry = await self._cache.get(key)
            except BackendUnavailable:
                entry = None  # the cache fails open: a miss, never an error to the caller
                self._metrics.cache_lookups.labels("error").inc()
            else:
                now = self._clock.time()
                state = freshness(entry, now) if entry is not None else Freshness.EXPIRED
                if entry is not None and state is Freshness.FRESH:
                    self._metrics.cache_lookups.labels("hit").inc()
                    age = age_seconds(entry, now)
                    return Answer(200, entry.body, entry.content_type, "HIT", age)
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
        async with self._permit():
            call = asyncio.ensure_future(self._call_upstream(query, locale))
            try:
                response, code = await asyncio.shield(call)
            except asyncio.CancelledError:
                # Every caller left, but the request is already at the upstream: finish it
                # under its permit and keep the answer; only then give up.
                with contextlib.suppress(Exception):
                    await self._store(query, key, *await call)
                raise
        await self._store(query, key, response, code)
        return response

    @contextlib.asynccontextmanager
    async def _permit(self) -> AsyncIterator[None]:
        """The limiter's permit, with the queue wait and rejections measured."""
        queued_at = self._clock.monotonic()
        try:
            async with self._limiter.permit():
                self._metrics.queue_wait.observe(self._clock.monotonic() - queued_at)
                yield
        except Overloaded as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            self._metrics.rejections.labels(reason).inc()
            raise

    async def _call_upstream(
        self, query: CallResultQuery, locale: str | None
    ) -> tuple[UpstreamResponse, str | None]:
        """The upstream's answer and its business code (None if not a vendor answer)."""
        started = self._clock.monotonic()
        try:
            response = await self._upstream.fetch(query, locale)
        except UpstreamError as exc:
            self._metrics.upstream_requests.labels(upstream_outcome(exc)).inc()
            raise
        finally:
            self._metrics.upstream_duration.observe(self._clock.monotonic() - started)
        code = business_code(response.status, response.body)
        self._metrics.upstream_requests.labels("ok" if code == SUCCESS else "business_error").inc()
        return response, code

    async def _store(
        self, query: CallResultQuery, key: str, response: UpstreamResponse, code: str | None
    ) -> None:
        now = self._clock.time()
        ttl = fresh_ttl(query, code, _utc_date(now), self._policy)
        if self._cache is not None and ttl > 0:
            entry = CacheEntry(response.body, response.content_type, now, ttl, self._policy.stale)
            with contextlib.suppress(BackendUnavailable):  # fails open: the answer still goes out
                await self._cache.put(key, entry)


def _utc_date(epoch: float) -> date:
    return datetime.fromtimestamp(epoch, UTC).date()
