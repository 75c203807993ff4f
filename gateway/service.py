"""The request path after validation: cache lookup, coalescing, permit, upstream, store.

No HTTP here: handlers turn an ``Answer`` into a response. Cache hits never wait for a permit;
misses for the same key share one upstream call; every upstream call holds a permit.

The caller whose call reached the upstream is answered as soon as the upstream answers; the
round goes on without it: the answer is stored, then the coalescer ends the round (publishes
it to followers and frees the key's lock). The lock is held until the store has landed, so a
miss that takes it next finds the answer in the cache (``_recheck``): identical misses still
cost the upstream one call fleet-wide.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Coroutine
from datetime import UTC, date, datetime
from typing import NamedTuple

from gateway.cache import CacheStore
from gateway.cache_policy import (
    HIT,
    STALE,
    CacheEntry,
    CachePolicy,
    Fetch,
    FromCache,
    Revalidate,
    age_seconds,
    cache_key,
    fetched_label,
    fresh_ttl,
    on_lookup,
    reusable,
    stale_reason,
    stale_warning,
)
from gateway.clock import Clock
from gateway.coalesce import Coalescer
from gateway.errors import (
    BackendUnavailable,
    GatewayError,
    Overloaded,
    UpstreamError,
)
from gateway.limiter import ANONYMOUS, BACKGROUND
from gateway.metrics import GatewayMetrics
from gateway.popularity import Popularity
from gateway.upstream import UpstreamResponse
from gateway.upstream_call import UpstreamCaller
from gateway.validation import CallResultQuery, refuse_undocumented

log = logging.getLogger("gateway.service")


class Answer(NamedTuple):
    """What the caller gets: the upstream's status and bytes, plus cache headers. (A named
    tuple: one is made per request, and a frozen dataclass costs a call per field.)"""

    status: int
    body: bytes
    content_type: str
    cache: str
    age: int
    warning: str | None = None
    # COALESCED: the X-Request-ID of the request that made the upstream call.
    source_request_id: str | None = None
    gzip: bytes | None = None  # the same body gzip-compressed, when the cache kept it so


class CallResultService:
    def __init__(
        self,
        *,
        cache: CacheStore | None,
        policy: CachePolicy,
        coalescer: Coalescer[UpstreamResponse],
        caller: UpstreamCaller,
        metrics: GatewayMetrics,
        clock: Clock,
        no_cache_min_age: float = 0.0,
        popularity: Popularity | None = None,
        locale: str | None = None,
        undocumented: str = "forward",
    ) -> None:
        self._cache = cache
        self._no_cache_min_age = no_cache_min_age
        self._popularity = popularity
        self._locale = locale  # ``upstream.locale``: sent when the caller sends none
        self._reject_undocumented = undocumented == "reject"
        self._policy = policy
        self._coalescer = coalescer
        self._caller = caller
        self._metrics = metrics
        self._clock = clock
        self._refreshing: set[asyncio.Task[object]] = set()
        self._finishing: set[asyncio.Future[tuple[UpstreamResponse, bool]]] = set()

    async def answer(
        self,
        query: CallResultQuery,
        *,
        locale: str | None,
        refresh: bool,
        caller: str = ANONYMOUS,
    ) -> Answer:
        """Answer from cache when fresh, else from one (shared) upstream call.

        ``refresh`` (the caller's ``Cache-Control: no-cache``) skips the lookup, not the limit,
        and takes an answer that landed within ``no_cache_min_age`` instead of a new call.
        ``caller`` is whose share of the upstream budget a call is taken from (the leader's,
        when identical misses coalesce). A stale copy is served at once while it is being
        revalidated (within ``swr``), and instead of an error when no permit can be had or the
        upstream fails. Popular open-ended hits near their TTL end are refreshed ahead.
        """
        if self._reject_undocumented:
            refuse_undocumented(query)
        locale = locale or self._locale  # the one locale both the key and the call use
        key = cache_key(query, locale)
        stale: CacheEntry | None = None
        if self._cache is not None and not refresh:
            try:
                entry = await self._cache.get(key)
            except BackendUnavailable:
                entry = None  # the cache fails open: a miss, never an error to the caller
                self._metrics.cache_lookups_by["error"].inc()
                self._metrics.redis_errors.labels("cache_get").inc()
            else:
                now = self._clock.time()
                decision = on_lookup(entry, now, self._policy)
                self._metrics.cache_lookups_by[decision.lookup].inc()
                if isinstance(decision, FromCache):
                    hit = decision.entry
                    if self._popularity is not None and self._popularity.hit(key, hit, now):
                        self._refresh_ahead(query, key, locale, hit)
                    return Answer(
                        200,
                        hit.body,
                        hit.content_type,
                        HIT,
                        decision.age,
                        source_request_id=hit.request_id,  # whose upstream call stored it
                        gzip=hit.gzip,
                    )
                if isinstance(decision, Revalidate):
                    self._revalidate(query, key, locale, caller)
                    return self._stale(decision.entry, "revalidate", "revalidating")
                assert isinstance(decision, Fetch)
                stale = decision.stale
        asked = self._clock.monotonic()
        # no-cache: an answer that landed within no_cache_min_age is as good as a new call.
        since = self._clock.time() - self._no_cache_min_age if refresh else 0.0
        try:
            response, led = await self._round(query, key, locale, since, caller)
        except (Overloaded, UpstreamError) as exc:
            if stale is None:
                raise
            return self._stale(
                stale, stale_reason(overloaded=isinstance(exc, Overloaded)), exc.message
            )
        cached = led and response.cached_age is not None
        label = fetched_label(
            led=led, cached=cached, cache_on=self._cache is not None, refresh=refresh
        )
        if not led:
            self._metrics.coalesced_wait.observe(self._clock.monotonic() - asked)
            source = response.request_id
            return Answer(
                response.status, response.body, response.content_type, label, 0, None, source
            )
        if response.cached_age is not None:
            return Answer(200, response.body, response.content_type, label, response.cached_age)
        return Answer(response.status, response.body, response.content_type, label, 0)

    async def _round(
        self, query: CallResultQuery, key: str, locale: str | None, since: float, caller: str
    ) -> tuple[UpstreamResponse, bool]:
        """``coalescer.run``'s result, or as soon as this caller's own upstream call is
        answered, that answer (led): the store and the round's end then go on without it."""
        answered: asyncio.Future[UpstreamResponse] = asyncio.get_running_loop().create_future()
        round_ = asyncio.ensure_future(
            self._coalescer.run(
                key, lambda: self._fetch_and_store(query, key, locale, since, caller, answered)
            )
        )
        try:
            await asyncio.wait((answered, round_), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            round_.cancel()  # the caller left, as if it had awaited the round itself
            raise
        if round_.done():
            return round_.result()
        self._finishing.add(round_)
        round_.add_done_callback(self._finished)
        return answered.result(), True

    def _finished(self, round_: asyncio.Future[tuple[UpstreamResponse, bool]]) -> None:
        self._finishing.discard(round_)
        if not round_.cancelled() and (exc := round_.exception()) is not None:
            log.error("a round failed after its caller was answered", exc_info=exc)

    def _stale(self, entry: CacheEntry, reason: str, why: str) -> Answer:
        self._metrics.stale_served.labels(reason).inc()
        age = age_seconds(entry, self._clock.time())
        warning = stale_warning(why)
        return Answer(200, entry.body, entry.content_type, STALE, age, warning, gzip=entry.gzip)

    def _revalidate(
        self, query: CallResultQuery, key: str, locale: str | None, caller: str
    ) -> None:
        """Refresh one key in the background (on the asking caller's share); coalescing makes
        concurrent refreshes one."""

        async def refresh() -> object:
            with contextlib.suppress(GatewayError):
                await self._coalescer.run(
                    key, lambda: self._fetch_and_store(query, key, locale, 0.0, caller)
                )
            return None

        self._spawn(refresh())

    def _refresh_ahead(
        self, query: CallResultQuery, key: str, locale: str | None, entry: CacheEntry
    ) -> None:
        """Refresh a popular entry before its TTL ends, on an idle permit only.

        Not coalesced: a caller's miss must never wait behind a background wait. Skipped if
        another call stored a newer answer meanwhile (``since``), or no idle permit came.
        """

        async def refresh() -> object:
            result = "ok"
            try:
                since = math.nextafter(entry.stored_at, math.inf)
                await self._fetch_and_store(query, key, locale, since, BACKGROUND, background=True)
            except Overloaded:
                result = "skipped"
                if self._popularity is not None:
                    self._popularity.failed(key, entry)
            except GatewayError:
                result = "error"
            self._metrics.refresh_ahead.labels(result).inc()
            return None

        self._spawn(refresh())

    def _spawn(self, work: Coroutine[object, object, object]) -> None:
        task = asyncio.ensure_future(work)
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def close(self) -> None:
        """Let answered rounds store and end (their locks then free), stop background
        refreshes (at shutdown)."""
        await asyncio.gather(*self._finishing, return_exceptions=True)
        for task in list(self._refreshing):
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        await self._caller.close()

    async def _fetch_and_store(
        self,
        query: CallResultQuery,
        key: str,
        locale: str | None,
        since: float,
        caller: str,
        answered: asyncio.Future[UpstreamResponse] | None = None,
        *,
        background: bool = False,
    ) -> UpstreamResponse:
        """Call the upstream and store the answer, unless an answer stored at or after
        ``since`` is already fresh in the cache: another replica's call may have finished
        between this caller's lookup and its turn to lead (double-checked, so a burst still
        costs the upstream one call). ``answered`` gets the upstream's answer before the
        store."""
        fresh = await self._recheck(key, since)
        if fresh is not None:
            return fresh
        response, code = await self._caller.call(
            query, locale, caller=caller, background=background
        )
        if answered is not None and not answered.done():
            answered.set_result(response)
        now = self._clock.time()
        ttl = fresh_ttl(query, code, _utc_date(now), self._policy)
        if self._cache is not None and ttl > 0:
            entry = CacheEntry(
                response.body,
                response.content_type,
                now,
                ttl,
                self._policy.stale,
                request_id=response.request_id,
            )
            try:
                await self._cache.put(key, entry)
            except BackendUnavailable:  # fails open: the answer still goes out
                self._metrics.redis_errors.labels("cache_put").inc()
        return response

    async def _recheck(self, key: str, since: float) -> UpstreamResponse | None:
        if self._cache is None:
            return None
        try:
            entry = await self._cache.get(key)
        except BackendUnavailable:
            self._metrics.redis_errors.labels("cache_get").inc()
            return None
        now = self._clock.time()
        if entry is None or not reusable(entry, since, now):
            return None
        return UpstreamResponse(200, entry.body, entry.content_type, age_seconds(entry, now))


def _utc_date(epoch: float) -> date:
    return datetime.fromtimestamp(epoch, UTC).date()
