"""One upstream call as the caller sees it: attempts under permits, retries, the breaker.

Each attempt takes its own permit (a retry is a new start for the vendor), checks it just
before sending (a permit the limiter can no longer vouch for is given back and a fresh one
taken) and tells it when the request goes out (``on_sent``), which is when the vendor counts
the start. An attempt given up on after it went out (timeout, dropped connection) keeps its
permit ``abandoned_hold_s`` longer in the background: the vendor may still be working on it,
while the caller gets its answer at once and a retry takes a fresh permit. Connect errors,
timeouts and 5xx are retried after an exponential backoff with full jitter, within the
request's deadline; a refused AK/SK is not (retrying cannot fix it), nor a 429: the whole
fleet then sends nothing until the upstream's ``Retry-After`` has passed (``UpstreamPause``,
asked before queueing for a permit and again just before sending). Other 4xx answers pass
through as the vendor's verdict. The circuit breaker fails calls fast while the upstream keeps
failing, and lets one probe through later.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.breaker import CircuitBreaker
from gateway.clock import Clock
from gateway.errors import (
    Overloaded,
    PermitLost,
    QueueFull,
    UpstreamAuthRejected,
    UpstreamCircuitOpen,
    UpstreamError,
    UpstreamPaused,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.limiter import ANONYMOUS, Limiter, Permit
from gateway.metrics import GatewayMetrics, result_code_label
from gateway.pause import InMemoryPause, UpstreamPause
from gateway.request_trace import current as current_trace
from gateway.upstream import UpstreamResponse
from gateway.validation import CallResultQuery
from gateway.vendor import SUCCESS


class Fetcher(Protocol):
    async def fetch(
        self,
        query: CallResultQuery,
        locale: str | None = None,
        on_sent: Callable[[], Awaitable[None]] | None = None,
        ready: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """The upstream's answer; ``on_sent`` is awaited as the request goes out (at most once);
        ``ready`` is called just before it does, and what it raises stops the request unsent."""
        ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 2
    base_s: float = 0.2
    max_s: float = 2.0
    deadline_s: float = 60.0


def backoff_delay(retry: int, policy: RetryPolicy, u: float) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**(retry-1))); ``u`` in [0, 1)."""
    return u * min(policy.max_s, policy.base_s * 2.0 ** (retry - 1))


def upstream_outcome(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable):
        return "unavailable"
    if isinstance(exc, UpstreamAuthRejected):
        return "auth_rejected"
    if isinstance(exc, UpstreamRateLimited):
        return "rate_limited"
    return "http_error"


def answer_outcome(response: UpstreamResponse) -> str:
    """The outcome label of an answer that passes through."""
    if response.status != 200:
        return "client_error"  # a 4xx other than 401/429: the vendor's verdict on the request
    return "ok" if response.code == SUCCESS else "business_error"


class UpstreamCaller:
    def __init__(
        self,
        *,
        upstream: Fetcher,
        limiter: Limiter,
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        metrics: GatewayMetrics,
        clock: Clock,
        abandoned_hold_s: float = 0.0,
        rng: random.Random | None = None,
        pause: UpstreamPause | None = None,
    ) -> None:
        self._upstream = upstream
        self._pause = pause or InMemoryPause(clock)
        self._limiter = limiter
        self._breaker = breaker
        self._policy = policy
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._hold_s = abandoned_hold_s
        self._holding: set[asyncio.Task[None]] = set()
        # Holds cut short by shutdown: kept, never released here (a shared lease lapses).
        self._kept: list[contextlib.AsyncExitStack] = []

    @property
    def holding(self) -> int:
        """Permits held for calls the gateway gave up on."""
        return len(self._holding)

    async def close(self) -> None:
        """Stop the holds of abandoned calls without giving their permits back, and the
        pause's background work (shutdown: this caller is the pause's one user)."""
        for task in list(self._holding):
            task.cancel()
        await asyncio.gather(*self._holding, return_exceptions=True)
        await self._pause.close()

    async def call(
        self,
        query: CallResultQuery,
        locale: str | None,
        *,
        caller: str = ANONYMOUS,
        background: bool = False,
    ) -> tuple[UpstreamResponse, str | None]:
        """The upstream's answer and its business code (None for a passed-through 4xx).

        Every attempt's permit comes from ``caller``'s share (``background``: idle permits)."""
        deadline = self._clock.monotonic() + self._policy.deadline_s
        retry = 0
        while True:
            await self._check_pause()
            if not self._breaker.allow():
                self._metrics.rejections.labels("breaker_open").inc()
                raise UpstreamCircuitOpen(self._breaker.retry_after())
            try:
                answer = await self._attempt(query, locale, caller, background)
            except UpstreamPaused:
                self._breaker.abandon()  # not sent: no verdict on the upstream
                raise
            except (UpstreamAuthRejected, UpstreamRateLimited):
                # It answered: alive. Retrying cannot fix our credentials, and must not
                # answer a request to slow down.
                self._breaker.success()
                raise
            except UpstreamError:
                self._breaker.failure()
                retry += 1
                delay = backoff_delay(retry, self._policy, self._rng.random())
                if retry > self._policy.retries or self._clock.monotonic() + delay >= deadline:
                    raise
            except BaseException:  # overload, cancellation: no verdict on the upstream
                self._breaker.abandon()
                raise
            else:
                self._breaker.success()
                return answer
            self._metrics.upstream_retries.inc()
            await self._clock.sleep(delay)

    async def _check_pause(self) -> None:
        """Raise ``UpstreamPaused`` while the fleet pauses after an upstream 429."""
        remaining = await self._pause.remaining()
        if remaining > 0:
            raise UpstreamPaused.after(remaining)

    async def _attempt(
        self, query: CallResultQuery, locale: str | None, caller: str, background: bool
    ) -> tuple[UpstreamResponse, str | None]:
        while True:
            async with contextlib.AsyncExitStack() as stack:
                permit = await stack.enter_async_context(self._permit(caller, background))
                try:
                    permit.check()
                except PermitLost:
                    continue  # given back unsent as the stack closes; queue for a fresh one
                await self._check_pause()  # a 429 may have come while this one queued
                went_out, lost = asyncio.Event(), asyncio.Event()

                async def on_sent(
                    permit: Permit = permit,
                    went_out: asyncio.Event = went_out,
                    lost: asyncio.Event = lost,
                ) -> None:
                    try:
                        await permit.sent()  # held until the window's edge if granted ahead
                    except PermitLost:
                        lost.set()  # it lapsed while held: the client stops, nothing sent
                        raise
                    went_out.set()  # the bytes are written in this loop step

                call = asyncio.ensure_future(self._fetch(query, locale, on_sent, permit.check))
                try:
                    return await asyncio.shield(call)
                except PermitLost:
                    continue  # checked again on the ready connection: stale, nothing was sent
                except asyncio.CancelledError:
                    # Every caller left, but the request is already at the upstream: it still
                    # holds its permit until the answer is in, so the limit stays exact.
                    with contextlib.suppress(Exception):
                        await call
                    raise
                except (UpstreamTimeout, UpstreamUnavailable):
                    if lost.is_set():
                        continue  # lapsed while held for the window's edge: nothing was sent
                    if went_out.is_set() and self._hold_s > 0:
                        self._hold(stack.pop_all())  # the vendor may still be working on it
                    raise

    def _hold(self, permit: contextlib.AsyncExitStack) -> None:
        async def hold() -> None:
            try:
                await self._clock.sleep(self._hold_s)
            except asyncio.CancelledError:
                self._kept.append(permit)
                raise
            await permit.aclose()

        task = asyncio.ensure_future(hold())
        self._holding.add(task)
        task.add_done_callback(self._holding.discard)

    @contextlib.asynccontextmanager
    async def _permit(self, caller: str, background: bool) -> AsyncIterator[Permit]:
        """The limiter's permit, with the queue wait and rejections measured (by caller)."""
        queued_at = self._clock.monotonic()
        try:
            async with self._limiter.permit(caller, background=background) as permit:
                waited = self._clock.monotonic() - queued_at
                if not background:  # idle-permit work would blur what callers wait
                    self._metrics.queue_wait.observe(waited)
                self._metrics.observe_caller_permit(caller, waited)
                trace = current_trace.get()
                if trace is not None:
                    trace.queue_wait_ms = round((trace.queue_wait_ms or 0) + waited * 1000, 3)
                yield permit
        except Overloaded as exc:
            reason = "queue_full" if isinstance(exc, QueueFull) else "queue_timeout"
            if not background:  # a skipped refresh-ahead turns no caller away
                self._metrics.rejections.labels(reason).inc()
            self._metrics.caller_rejections.labels(caller, reason).inc()
            raise

    async def _fetch(
        self,
        query: CallResultQuery,
        locale: str | None,
        on_sent: Callable[[], Awaitable[None]],
        ready: Callable[[], None],
    ) -> tuple[UpstreamResponse, str | None]:
        started = self._clock.monotonic()
        try:
            response = await self._upstream.fetch(query, locale, on_sent=on_sent, ready=ready)
        except UpstreamError as exc:
            self._metrics.upstream_requests.labels(upstream_outcome(exc), "none").inc()
            if isinstance(exc, UpstreamRateLimited):
                await self._pause.pause(exc.retry_after)
            raise
        finally:
            elapsed = self._clock.monotonic() - started
            self._metrics.upstream_duration.observe(elapsed)
            trace = current_trace.get()
            if trace is not None:
                trace.upstream_ms = round((trace.upstream_ms or 0) + elapsed * 1000, 3)
                trace.attempts += 1
        code = response.code
        self._metrics.upstream_requests.labels(
            answer_outcome(response), result_code_label(code)
        ).inc()
        return response, code
