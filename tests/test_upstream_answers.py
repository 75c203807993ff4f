"""The vendor's answers reach the caller as they are: 4xx, 429, a 200 that is not the vendor's,
the locale, and an upstream URL with a path prefix. Gateway against the simulator, real sockets.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient

from gateway.clock import ManualClock
from gateway.errors import ConfigError, UpstreamAuthRejected, UpstreamBadResponse
from gateway.settings import load_settings
from gateway.upstream import classify
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.processes import RedisServer

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/{}"
COUNTED = 'isales_gateway_upstream_requests_total{{code="none",outcome="{}"}} {}'


async def behave(upstream: Upstream, **behaviour: object) -> None:
    async with (
        ClientSession() as session,
        session.post(upstream.url + "/__sim/behaviour", json=behaviour) as response,
    ):
        assert response.status == 200, await response.text()


async def metric_lines(gateway: TestClient[web.Request, web.Application]) -> str:
    return await (await gateway.get("/metrics")).text()


@pytest.mark.parametrize("status", [400, 403, 404])
async def test_an_upstream_4xx_passes_through_unchanged_after_exactly_one_call(
    status: int, start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator()
    await behave(upstream, status=status)
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__retries=2))
    response = await gateway.post(PATH.format(3), json={"pageSize": 5})
    assert response.status == status
    assert await response.read() == (
        f'{{"resultCode":"0200{status}","resultDesc":"Simulated HTTP {status}"}}'.encode()
    )
    assert response.headers["Content-Type"] == "application/json;charset=UTF-8"
    assert upstream.requests == 1, "never retried"
    again = await gateway.post(PATH.format(3), json={"pageSize": 5})
    assert (again.status, again.headers["X-Cache"]) == (status, "MISS")
    assert upstream.requests == 2, "never cached"
    assert COUNTED.format("client_error", "2.0") in await metric_lines(gateway)


async def test_an_upstream_429_is_not_retried_and_pauses_every_call_until_retry_after(
    start_simulator: StartSimulator, start_gateway: StartGateway, clock: ManualClock
) -> None:
    upstream = await start_simulator()
    settings = gateway_settings(upstream.url, upstream__retries=2, cache__swr_s=0)
    gateway = await start_gateway(settings, clock=clock)
    cached = await gateway.post(PATH.format(1), json={})
    assert cached.status == 200
    await behave(upstream, status=429, retry_after_s=20)

    limited = await gateway.post(PATH.format(2), json={})
    body = await limited.json()
    assert (limited.status, body["resultCode"], limited.headers["Retry-After"]) == (
        429,
        "GW42900",
        "20",
    )
    assert upstream.requests == 2, "one call, no retry"

    clock.advance(5)
    paused = await gateway.post(PATH.format(3), json={})
    assert (paused.status, (await paused.json())["resultCode"]) == (429, "GW42901")
    assert paused.headers["Retry-After"] == "15"
    clock.advance(60)  # the cached answer of campaign 1 is stale now, and the pause over
    await behave(upstream, status=0)
    assert (await gateway.post(PATH.format(3), json={})).status == 200
    assert upstream.requests == 3, "nothing was sent during the pause"

    await behave(upstream, status=429, retry_after_s=0)  # none: upstream.pause_ms (5 s)
    stale = await gateway.post(PATH.format(1), json={})
    assert (stale.status, stale.headers["X-Cache"]) == (200, "STALE")
    assert await stale.read() == await cached.read()
    assert upstream.requests == 4
    clock.advance(4)
    during = await gateway.post(PATH.format(4), json={})
    assert (during.status, during.headers["Retry-After"]) == (429, "1")
    assert upstream.requests == 4
    assert COUNTED.format("rate_limited", "2.0") in await metric_lines(gateway)


async def test_the_whole_fleet_pauses_after_one_replica_gets_a_429(
    start_simulator: StartSimulator,
    start_gateway: StartGateway,
    redis_server: RedisServer,
    clock: ManualClock,
) -> None:
    redis_server.flush()
    upstream = await start_simulator()
    settings = gateway_settings(upstream.url, redis__url=redis_server.url, upstream__retries=0)
    one = await start_gateway(settings, clock=clock)
    other = await start_gateway(settings, clock=clock)
    await behave(upstream, status=429, retry_after_s=30)
    assert (await one.post(PATH.format(5), json={})).status == 429
    await behave(upstream, status=0)
    refused = await other.post(PATH.format(6), json={})
    assert (refused.status, (await refused.json())["resultCode"]) == (429, "GW42901")
    assert upstream.requests == 1
    clock.advance(31)
    assert (await other.post(PATH.format(6), json={})).status == 200


async def test_a_200_that_is_not_the_vendors_is_a_502_never_cached_and_an_upstream_error(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator()
    await behave(upstream, login_page=True)
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__retries=0))
    for n in (1, 2):
        response = await gateway.post(PATH.format(3), json={})
        assert (response.status, (await response.json())["resultCode"]) == (502, "GW50201")
        assert upstream.requests == n, "never cached"
    assert COUNTED.format("http_error", "2.0") in await metric_lines(gateway)


def test_answers_are_classified_by_status_and_shape() -> None:
    vendor = b'{"resultCode":"0200000","resultDesc":"ok"}'
    assert classify(200, vendor, "application/json", 0).code == "0200000"
    assert classify(404, b"<html/>", "text/html", 0).status == 404
    for status, body in ((200, b"<html>login</html>"), (200, b'{"error": 1}'), (200, b"[]")):
        with pytest.raises(UpstreamBadResponse):
            classify(status, body, "text/html", 0)
    with pytest.raises(UpstreamAuthRejected):
        classify(401, b"", "", 0)
    for status in (302, 500, 503):
        with pytest.raises(UpstreamBadResponse):
            classify(status, vendor, "application/json", 0)


LOCALE_CASES = [
    (header, setting)
    for header in (None, "zh_CN", "en_US", "fr_FR")
    for setting in ("", "zh_CN", "en_US")
]


@pytest.mark.parametrize(("header", "setting"), LOCALE_CASES)
async def test_the_cache_key_and_the_upstream_call_use_the_same_locale(
    header: str | None, setting: str, upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__locale=setting))
    effective = header if header in ("zh_CN", "en_US") else (setting or None)
    asked = {} if header is None else {"locale": header}
    first = await gateway.post(PATH.format(3), json={"pageSize": 3}, headers=asked)
    assert first.headers["X-Cache"] == "MISS"
    assert upstream.state.received[-1].headers.get("locale") == effective
    english = effective == "en_US"
    assert (await first.json())["resultDesc"] == ("Query Success!" if english else "查询成功!")

    same = effective or "zh_CN"  # no locale sent: the vendor's default, zh_CN
    hit = await gateway.post(PATH.format(3), json={"pageSize": 3}, headers={"locale": same})
    assert hit.headers["X-Cache"] == "HIT"
    assert await hit.read() == await first.read()
    other = "zh_CN" if same == "en_US" else "en_US"
    miss = await gateway.post(PATH.format(3), json={"pageSize": 3}, headers={"locale": other})
    assert miss.headers["X-Cache"] == "MISS"
    assert upstream.state.received[-1].headers.get("locale") == other
    assert upstream.requests == 2


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"GATEWAY_UPSTREAM__LOCALE": "fr_FR"}, "upstream.locale"),
        ({"GATEWAY_UPSTREAM__URL": "https://isales.example.com/p?x=1"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__URL": "https://isales.example.com/p#top"}, "upstream.url"),
        ({"GATEWAY_UPSTREAM__PAUSE_MS": "999"}, "upstream.pause_ms"),
        (
            {"GATEWAY_UPSTREAM__PAUSE_MS": "9000", "GATEWAY_UPSTREAM__PAUSE_MAX_MS": "8000"},
            "upstream.pause_ms",
        ),
        ({"GATEWAY_VALIDATION__UNDOCUMENTED": "ignore"}, "validation.undocumented"),
    ],
)
def test_a_bad_setting_of_these_is_a_config_error_naming_it(env: dict[str, str], key: str) -> None:
    base = {
        "GATEWAY_UPSTREAM__URL": "https://isales.example.com",
        "GATEWAY_UPSTREAM__AK": "a",
        "GATEWAY_UPSTREAM__SK": "s",
        "GATEWAY_AUTH__ENABLED": "false",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {**base, **env})
    assert caught.value.key == key


async def test_an_upstream_url_with_a_path_prefix_is_signed_over_the_path_sent(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(path_prefix="/isales/gw")
    gateway = await start_gateway(gateway_settings(upstream.url + "/isales/gw/"))
    response = await gateway.post(PATH.format(3), json={"pageSize": 2})
    assert response.status == 200
    assert (await response.json())["resultCode"] == "0200000"
    assert upstream.state.received[-1].path == "/isales/gw" + PATH.format(3)
    assert upstream.state.auth_failures == 0


async def test_concurrent_callers_during_a_pause_cost_the_upstream_nothing(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator()
    await behave(upstream, status=429, retry_after_s=60)
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__retries=3))
    assert (await gateway.post(PATH.format(7), json={})).status == 429
    answers = await asyncio.gather(*(gateway.post(PATH.format(c), json={}) for c in range(8, 28)))
    assert {a.status for a in answers} == {429}
    assert upstream.requests == 1


async def test_an_answer_larger_than_max_body_bytes_is_a_502_never_cached(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    settings = gateway_settings(upstream.url, upstream__max_body_bytes=2048, upstream__retries=0)
    gateway = await start_gateway(settings)
    big, small = {"pageSize": 500}, {"pageSize": 1}
    for _ in range(2):
        answer = await gateway.post(PATH.format(3), json=big)
        assert answer.status == 502
        assert (await answer.json())["resultCode"] == "GW50201"
    assert upstream.requests == 2  # nothing was cached
    assert (await gateway.post(PATH.format(3), json=small)).status == 200
