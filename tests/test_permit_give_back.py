"""An answered call's permit goes back after its answer, not before it.

With Redis, giving a permit back is a round trip; the caller's answer does not wait for it.
Until it is back the permit counts as held (the limit only errs on the safe side), and
shutting down waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import aiohttp
from prometheus_client import CollectorRegistry

from gateway.breaker import CircuitBreaker
from gateway.clock import SystemClock
from gateway.limiter import ANONYMOUS, LimitConfig, LimiterSnapshot, Permit
from gateway.limiter.memory import InMemoryLimiter
from gateway.metrics import GatewayMetrics
from gateway.upstream import UpstreamClient, send_trace
from gateway.upstream_call import RetryPolicy, UpstreamCaller
from gateway.validation import parse_request
from tests.conftest import StartSimulator, gateway_settings


class SlowToTakeBack:
    """An in-memory limiter whose permits go back only once ``take_back`` is set, as a
    Redis round trip would be slow."""

    def __init__(self) -> None:
        limit = LimitConfig(max_concurrent=1, window_s=0.1, max_queue=10, max_wait_s=5.0)
        self.inner = InMemoryLimiter(limit, clock=SystemClock())
        self.take_back = asyncio.Event()

    def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AbstractAsyncContextManager[Permit]:
        return self._permit(caller, background)

    @asynccontextmanager
    async def _permit(self, caller: str, background: bool) -> AsyncIterator[Permit]:
        async with self.inner.permit(caller, background=background) as permit:
            yield permit
            await self.take_back.wait()

    def snapshot(self) -> LimiterSnapshot:
        return self.inner.snapshot()

    def start(self) -> None:
        self.inner.start()

    def shed(self) -> None:
        self.inner.shed()

    async def close(self) -> None:
        await self.inner.close()


async def test_the_answer_does_not_wait_for_its_permit_to_go_back(
    start_simulator: StartSimulator,
) -> None:
    upstream = await start_simulator(latency_ms=0)
    settings = gateway_settings(upstream.url)
    clock, limiter = SystemClock(), SlowToTakeBack()
    async with aiohttp.ClientSession(trace_configs=[send_trace()]) as session:
        caller = UpstreamCaller(
            upstream=UpstreamClient(settings.upstream, settings.upstream_host, session, clock),
            limiter=limiter,  # type: ignore[arg-type]
            breaker=CircuitBreaker(failures=100, open_s=1.0, clock=clock),
            policy=RetryPolicy(retries=0),
            metrics=GatewayMetrics(CollectorRegistry()),
            clock=clock,
        )
        query = parse_request("11", "3", b'{"pageSize":10}')

        async with asyncio.timeout(5):
            response, code = await caller.call(query, None)
        held_after_the_answer = limiter.snapshot().in_flight
        closing = asyncio.ensure_future(caller.close())
        await asyncio.sleep(0.1)
        closed_before_the_permit_was_back = closing.done()
        limiter.take_back.set()
        async with asyncio.timeout(5):
            await closing

    assert (response.status, code) == (200, "0200000")
    assert held_after_the_answer == 1  # answered, and still counted until it is back
    assert not closed_before_the_permit_was_back
    assert limiter.snapshot().in_flight == 0
    assert upstream.state.stats()["requests_total"] == 1
