"""One upstream call as the caller sees it: attempts under permits, retries, the breaker.

Each attempt takes its own permit (a retry is a new start for the vendor), checks it just
before sending (a permit the limiter can no longer vouch for is given back and a fresh one
taken) and tells it when the request goes out (``on_sent``), which is when the vendor counts
the start. An attempt given up on after it went out (timeout, dropped connection) keeps its
permit ``abandoned_hold_s`` longer in the background: the vendor may still be working on it,
while the caller gets its answer at once and a retry takes a fresh permit. Connect errors,
timeouts and 5xx are retried after an exponential backoff with full jitter, within the
request's deadline; a refused AK/SK is not (retrying cannot fix it). The circuit breaker
fails calls fast while the upstream keeps failing, and lets one probe through later.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.breaker import CircuitBreaker
from gateway.cache_policy import SUCCESS, business_code
from gateway.clock import Clock
from gateway.errors import (
    Overloaded,
    PermitLost,
    QueueFull,
    UpstreamAuthRejected,
    UpstreamCircuitOpen,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.limiter import ANONYMOUS, Limiter, Permit
from gateway.metrics import GatewayMetrics, result_code_label
from gateway.trace import current as current_trace
from gateway.upstream import UpstreamResponse
from gateway.validation import CallResultQuery


class Fetcher(Protocol):
    async def fetch(
        self,
        query: CallResultQuery,
        locale: str | None = None,
        on_sent: Callable[[], Awaitable[None]] | None = None,
    ) -> UpstreamResponse:
        """The upstream's answer; ``on_sent`` is awaited as the request goes out (at most once)."""
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
    return "http_error"


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
    ) -> None:
        self._upstream = upstream
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
        """Stop the holds of abandoned calls without giving their permits back (shutdown)."""
        for task in list(self._holding):
            task.cancel()
        await asyncio.gather(*self._holding, return_exceptions=True)

    async def call(
        self,
        query: CallResultQuery,
        locale: str | None,
        *,
        caller: str = ANONYMOUS,
        background: bool = False,
    ) -> tuple[UpstreamResponse, str | None]:
        """The upstream's answer and its business code (None if not a vendor answer).

        Every attempt's permit comes from ``caller``'s share (``background``: idle permits)."""
        deadline = self._clock.monotonic() + self._policy.deadline_s
        retry = 0
        while True:
            if not self._breaker.allow():
                self._metrics.rejections.labels("breaker_open").inc()
                raise UpstreamCircuitOpen(self._breaker.retry_after())
            try:
                answer = await self._attempt(query, locale, caller, background)
            except UpstreamAuthRejected:
                self._breaker.success()  # it answered: alive, only our credentials are wrong
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
                went_out = asyncio.Event()

                async def on_sent(
                    permit: Permit = permit, went_out: asyncio.Event = went_out
                ) -> None:
                    went_out.set()
                    await permit.sent()

                call = asyncio.ensure_future(self._fetch(query, locale, on_sent))
                try:
                    return await asyncio.shield(call)
                except asyncio.CancelledError:
                    # Every caller left, but the request is already at the upstream: it still
                    # holds its permit until the answer is in, so the limit stays exact.
                    with contextlib.suppress(Exception):
                        await call
                    raise
                except (UpstreamTimeout, UpstreamUnavailable):
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
        self, query: CallResultQuery, locale: str | None, on_sent: Callable[[], Awaitable[None]]
    ) -> tuple[UpstreamResponse, str | None]:
        started = self._clock.monotonic()
        try:
            response = await self._upstream.fetch(query, locale, on_sent=on_sent)
        except UpstreamError as exc:
            self._metrics.upstream_requests.labels(upstream_outcome(exc), "none").inc()
            raise
        finally:
            elapsed = self._clock.monotonic() - started
            self._metrics.upstream_duration.observe(elapsed)
            trace = current_trace.get()
            if trace is not None:
                trace.upstream_ms = round((trace.upstream_ms or 0) + elapsed * 1000, 3)
                trace.attempts += 1
        code = business_code(response.status, response.body)
        outcome = "ok" if code == SUCCESS else "business_error"
        self._metrics.upstream_requests.labels(outcome, result_code_label(code)).inc()
        return response, code
