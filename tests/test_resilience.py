"""The upstream fails or overloads: retries, the breaker, stale copies, clear errors."""

from __future__ import annotations

import asyncio

from aiohttp import ClientSession

from gateway.clock import ManualClock
from gateway.upstream_call import RetryPolicy, backoff_delay
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.processes import free_port
from tests.support.waiting import until

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/3"


async def set_behaviour(upstream: Upstream, **behaviour: float) -> None:
    async with (
        ClientSession() as session,
        session.post(upstream.url + "/__sim/behaviour", json=behaviour) as response,
    ):
        assert response.status == 200, await response.text()


def test_backoff_doubles_up_to_its_cap_with_full_jitter() -> None:
    policy = RetryPolicy(retries=5, base_s=0.2, max_s=1.0)
    assert [backoff_delay(r, policy, 0.999999) for r in (1, 2, 3, 4)] == [
        0.2 * 0.999999,
        0.4 * 0.999999,
        0.8 * 0.999999,
        1.0 * 0.999999,
    ]
    assert backoff_delay(3, policy, 0.0) == 0.0


async def test_a_failing_upstream_is_retried_then_answered_with_502(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(error_rate=1.0)
    settings = gateway_settings(upstream.url, upstream__retries=2, upstream__retry_base_ms=1)
    gateway = await start_gateway(settings)
    response = await gateway.post(PATH, json={})
    assert response.status == 502
    assert (await response.json())["resultCode"] == "GW50201"
    assert upstream.requests == 3, "one attempt and two retries, each a start at the upstream"


async def test_a_hanging_upstream_gives_504_and_an_absent_one_502(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(timeout_rate=1.0, hang_s=5)
    hanging = await start_gateway(
        gateway_settings(
            upstream.url,
            upstream__retries=0,
            upstream__timeout_ms=200,
            upstream__connect_timeout_ms=100,
        )
    )
    timed_out = await hanging.post(PATH, json={})
    assert (timed_out.status, (await timed_out.json())["resultCode"]) == (504, "GW50400")

    absent = await start_gateway(
        gateway_settings(f"http://127.0.0.1:{free_port()}", upstream__retries=0)
    )
    refused = await absent.post(PATH, json={})
    assert (refused.status, (await refused.json())["resultCode"]) == (502, "GW50200")


async def test_the_breaker_opens_after_consecutive_failures_and_closes_after_a_probe(
    start_simulator: StartSimulator, start_gateway: StartGateway, clock: ManualClock
) -> None:
    upstream = await start_simulator(error_rate=1.0)
    settings = gateway_settings(
        upstream.url,
        upstream__retries=0,
        upstream__breaker_failures=3,
        upstream__breaker_open_ms=300,
    )
    gateway = await start_gateway(settings, clock=clock)
    for campaign in (1, 2, 3):
        await gateway.post(f"/rest/isales/v1/openapi/campaigns/11/callresult/{campaign}", json={})
    fast_fail = await gateway.post(PATH, json={})
    assert (fast_fail.status, (await fast_fail.json())["resultCode"]) == (503, "GW50302")
    assert "Retry-After" in fast_fail.headers
    assert upstream.requests == 3, "an open breaker sends nothing"
    metrics = await (await gateway.get("/metrics")).text()
    assert "isales_gateway_upstream_breaker_state 2.0" in metrics

    await set_behaviour(upstream, error_rate=0.0)
    clock.advance(0.35)
    probe = await gateway.post(PATH, json={})
    assert probe.status == 200
    metrics = await (await gateway.get("/metrics")).text()
    assert "isales_gateway_upstream_breaker_state 0.0" in metrics


async def test_a_stale_copy_is_served_when_the_upstream_fails(
    start_simulator: StartSimulator, start_gateway: StartGateway, clock: ManualClock
) -> None:
    upstream = await start_simulator()
    settings = gateway_settings(
        upstream.url, cache__ttl_open_s=30, cache__swr_s=0, upstream__retries=0
    )
    gateway = await start_gateway(settings, clock=clock)
    fresh = await gateway.post(PATH, json={})
    await set_behaviour(upstream, error_rate=1.0)
    clock.advance(45)
    stale = await gateway.post(PATH, json={})
    assert stale.status == 200
    assert stale.headers["X-Cache"] == "STALE"
    assert stale.headers["Age"] == "45"
    assert stale.headers["Warning"].startswith('110 isales-gateway "Response is stale')
    assert await stale.read() == await fresh.read()
    assert upstream.requests == 2


async def test_within_the_swr_window_stale_is_served_at_once_and_refreshed_once(
    start_simulator: StartSimulator, start_gateway: StartGateway, clock: ManualClock
) -> None:
    upstream = await start_simulator(latency_ms=100)
    settings = gateway_settings(upstream.url, cache__ttl_open_s=30, cache__swr_s=10)
    gateway = await start_gateway(settings, clock=clock)
    await gateway.post(PATH, json={})
    clock.advance(35)
    answers = await asyncio.gather(*(gateway.post(PATH, json={}) for _ in range(20)))
    assert {a.headers["X-Cache"] for a in answers} == {"STALE"}
    # The one background refresh lands; a second one would have been sent with it.
    await until(lambda: upstream.requests >= 2 and upstream.state.observer.in_flight == 0)
    assert upstream.requests == 2
    assert (await gateway.post(PATH, json={})).headers["X-Cache"] == "HIT"


async def test_queue_overflow_serves_stale_copies_instead_of_503(
    start_simulator: StartSimulator, start_gateway: StartGateway, clock: ManualClock
) -> None:
    upstream = await start_simulator(latency_ms=300)
    settings = gateway_settings(
        upstream.url,
        cache__ttl_open_s=30,
        cache__swr_s=0,
        limit__max_concurrent=1,
        limit__max_queue=0,
    )
    gateway = await start_gateway(settings, clock=clock)
    cached = [f"/rest/isales/v1/openapi/campaigns/11/callresult/{c}" for c in (1, 2, 3)]
    for path in cached:
        assert (await gateway.post(path, json={})).status == 200
        clock.advance(2)  # the start window moves on (manual time)
    clock.advance(60)  # all three are stale now
    busy = asyncio.ensure_future(  # holds the only permit
        gateway.post("/rest/isales/v1/openapi/campaigns/11/callresult/8", json={})
    )
    await until(lambda: upstream.requests == len(cached) + 1, "the busy call holds the permit")
    overflow = await asyncio.gather(*(gateway.post(path, json={}) for path in cached))
    assert [r.status for r in overflow] == [200, 200, 200]
    assert {r.headers["X-Cache"] for r in overflow} == {"STALE"}
    no_copy = await gateway.post("/rest/isales/v1/openapi/campaigns/11/callresult/9", json={})
    assert no_copy.status == 503
    assert (await busy).status == 200
