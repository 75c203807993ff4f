"""Bursts beyond the upstream budget: bounded queue, bounded wait, no permit ever leaked."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.test_utils import TestClient

from tests.conftest import StartGateway, StartSimulator, gateway_settings
from tests.support.fleet import path
from tests.support.waiting import until

Check = Callable[[], Awaitable[bool]]
JSON = {"Content-Type": "application/json; charset=UTF-8"}


def gauge(metrics_text: str, name: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def gauges_are(gateway: TestClient[web.Request, web.Application], **expected: float) -> Check:
    """A check for ``until``: the gateway's gauges (``name=value``, without the prefix)."""

    async def check() -> bool:
        text = await (await gateway.get("/metrics")).text()
        return all(gauge(text, f"isales_gateway_{n}") == v for n, v in expected.items())

    return check


async def test_a_full_queue_answers_503_with_retry_after_and_no_upstream_call(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(latency_ms=400)
    settings = gateway_settings(upstream.url, limit__max_concurrent=1, limit__max_queue=1)
    gateway = await start_gateway(settings)
    running = asyncio.ensure_future(gateway.post(path(1), json={}))
    queued = asyncio.ensure_future(gateway.post(path(2), json={}))
    await until(gauges_are(gateway, permits_in_flight=1, queue_depth=1), "one running, one queued")
    rejected = await gateway.post(path(3), json={})
    body = await rejected.json()
    assert rejected.status == 503
    assert body["resultCode"] == "GW50300"
    assert int(rejected.headers["Retry-After"]) >= 1
    assert [r.status for r in await asyncio.gather(running, queued)] == [200, 200]
    assert upstream.requests == 2


async def test_a_caller_past_the_wait_bound_gets_503_with_retry_after(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(latency_ms=600)
    settings = gateway_settings(upstream.url, limit__max_concurrent=1, limit__max_wait_ms=100)
    gateway = await start_gateway(settings)
    running = asyncio.ensure_future(gateway.post(path(1), json={}))
    await until(lambda: upstream.requests == 1, "the first call holds the only permit")
    waited = await gateway.post(path(2), json={})
    assert waited.status == 503
    assert (await waited.json())["resultCode"] == "GW50301"
    assert int(waited.headers["Retry-After"]) >= 1
    assert (await running).status == 200
    assert upstream.requests == 1


async def test_callers_that_hang_up_leave_no_permit_or_queue_slot_behind(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(latency_ms=300)
    settings = gateway_settings(upstream.url, limit__max_concurrent=2, limit__window_ms=100)
    gateway = await start_gateway(settings)
    url = str(gateway.make_url(""))

    async def impatient(campaign: int) -> None:
        async with ClientSession(timeout=ClientTimeout(total=0.05)) as session:
            try:
                async with session.post(url + path(campaign), json={}):
                    pass
            except TimeoutError:
                pass

    await asyncio.gather(*(impatient(c) for c in range(1, 9)))
    # The two calls already at the upstream finish and return their permits; a leaked permit
    # or queue slot never comes back and fails this.
    await until(gauges_are(gateway, permits_in_flight=0, queue_depth=0), "nothing held")
    assert upstream.requests == 2, "callers that left the queue cost no upstream call"
    answers = await asyncio.gather(*(gateway.post(path(c), json={}) for c in range(20, 24)))
    assert [a.status for a in answers] == [200] * 4
    # Queued behind any waiter still left over, the four new calls are the only ones since.
    assert upstream.requests == 2 + 4, "callers that left the queue cost no upstream call"
