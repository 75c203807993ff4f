"""Caching through the gateway: hits cost no upstream call, failures are never stored."""

from __future__ import annotations

import asyncio
import gzip
from datetime import date

import aiohttp
import pytest

from gateway.cache_policy import CacheEntry, CachePolicy, Freshness, cache_key, fresh_ttl, freshness
from gateway.clock import ManualClock
from gateway.handlers import accepts_gzip
from gateway.validation import CallResultQuery
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.processes import RedisServer
from tests.support.waiting import until

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/3"
JSON = {"Content-Type": "application/json; charset=UTF-8"}
TODAY = date(2026, 11, 26)
POLICY = CachePolicy(ttl_closed=86400, ttl_open=30, stale=3600, negative=0)


def test_the_key_ignores_key_order_and_defaults_but_not_filters_or_locale() -> None:
    base = CallResultQuery(11, 3, page_size=10)
    assert cache_key(base) == cache_key(CallResultQuery(11, 3, page_size=10, show_detail=0))
    assert cache_key(base) != cache_key(CallResultQuery(11, 3, page_size=10, session_id="a"))
    assert cache_key(base) != cache_key(CallResultQuery(11, 3, page_size=10, custom_field="a"))
    assert cache_key(base) != cache_key(CallResultQuery(11, 30, page_size=10))
    assert cache_key(base) != cache_key(base, "en_US")
    assert cache_key(base).startswith("{11:3}:")


@pytest.mark.parametrize(
    ("end", "code", "ttl"),
    [
        (date(2026, 11, 1), "0200000", 86400),  # ended weeks ago: stable
        (date(2026, 11, 25), "0200000", 30),  # ended yesterday: may still fill in some zone
        (None, "0200000", 30),  # open-ended: keeps changing
        (date(2026, 11, 1), "0200007", 0),  # no such campaign: negative TTL, 0 by default
        (date(2026, 11, 1), "0200001", 0),  # any other failure: never stored
        (date(2026, 11, 1), None, 0),  # not a vendor answer: never stored
    ],
)
def test_ttl_follows_the_stability_of_the_range_and_only_successes_are_stored(
    end: date | None, code: str | None, ttl: float
) -> None:
    begin = None if end is None else date(2026, 10, 25)
    query = CallResultQuery(11, 3, begin_time=begin, end_time=end)
    assert fresh_ttl(query, code, TODAY, POLICY) == ttl


def test_an_entry_is_fresh_then_stale_then_expired() -> None:
    entry = CacheEntry(b"{}", "application/json", stored_at=100.0, ttl=30, stale=60)
    assert freshness(entry, 129.9) is Freshness.FRESH
    assert freshness(entry, 130.0) is Freshness.STALE
    assert freshness(entry, 190.0) is Freshness.EXPIRED


async def test_a_repeated_query_is_a_hit_with_no_upstream_call(
    upstream: Upstream, start_gateway: StartGateway, clock: ManualClock
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url), clock=clock)
    first = await gateway.post(PATH, data=b'{"pageSize":5}', headers=JSON)
    clock.advance(7)
    second = await gateway.post(PATH, data=b'{ "showDetail": 0, "pageSize": 5 }', headers=JSON)
    assert upstream.requests == 1
    assert (first.headers["X-Cache"], first.headers["Age"]) == ("MISS", "0")
    assert (second.headers["X-Cache"], second.headers["Age"]) == ("HIT", "7")
    assert await first.read() == await second.read()
    assert second.headers["Content-Type"] == first.headers["Content-Type"]


async def test_an_open_ended_answer_expires_after_its_short_ttl(
    upstream: Upstream, start_gateway: StartGateway, clock: ManualClock
) -> None:
    settings = gateway_settings(upstream.url, cache__ttl_open_s=30, cache__swr_s=0)
    gateway = await start_gateway(settings, clock=clock)
    await gateway.post(PATH, json={"pageSize": 5})
    clock.advance(29)
    assert (await gateway.post(PATH, json={"pageSize": 5})).headers["X-Cache"] == "HIT"
    clock.advance(2)
    assert (await gateway.post(PATH, json={"pageSize": 5})).headers["X-Cache"] == "MISS"
    assert upstream.requests == 2


async def test_failures_are_not_cached(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(campaigns=10)
    gateway = await start_gateway(gateway_settings(upstream.url))
    missing = "/rest/isales/v1/openapi/campaigns/11/callresult/99"
    for _ in range(2):
        response = await gateway.post(missing, json={})
        assert (await response.json())["resultCode"] == "0200007"
        assert response.headers["X-Cache"] == "MISS"
    assert upstream.requests == 2


async def test_a_5xx_from_the_upstream_is_a_502_and_is_not_cached(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(error_rate=1.0)
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__retries=0))
    first = await gateway.post(PATH, json={"pageSize": 5})
    assert first.status == 502
    assert (await first.json())["resultCode"] == "GW50201"
    second = await gateway.post(PATH, json={"pageSize": 5})
    assert second.status == 502
    assert upstream.requests == 2


async def test_no_cache_from_the_caller_forces_a_refresh(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    # With no minimum age, every no-cache request calls (tests/test_sharing.py: with one).
    gateway = await start_gateway(gateway_settings(upstream.url, cache__no_cache_min_age_s=0))
    await gateway.post(PATH, json={"pageSize": 5})
    refreshed = await gateway.post(
        PATH, json={"pageSize": 5}, headers={"Cache-Control": "no-cache"}
    )
    assert refreshed.headers["X-Cache"] == "BYPASS"
    assert upstream.requests == 2
    again = await gateway.post(PATH, json={"pageSize": 5})
    assert again.headers["X-Cache"] == "HIT"


async def test_identical_concurrent_queries_reach_the_upstream_once(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(latency_ms=200)
    gateway = await start_gateway(gateway_settings(upstream.url))
    responses = await asyncio.gather(*(gateway.post(PATH, json={"pageSize": 5}) for _ in range(50)))
    labels = sorted(r.headers["X-Cache"] for r in responses)
    assert upstream.requests == 1
    assert labels == ["COALESCED"] * 49 + ["MISS"]
    assert len({await r.read() for r in responses}) == 1


@pytest.mark.parametrize("mode", ["embedded", "redis"])
async def test_a_large_hit_is_the_original_bytes_or_the_same_bytes_gzipped_on_request(
    mode: str,
    upstream: Upstream,
    start_gateway: StartGateway,
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    extra = {"redis__url": redis_server.url} if mode == "redis" else {}
    gateway = await start_gateway(gateway_settings(upstream.url, **extra))
    url = gateway.make_url(PATH)
    big = {"pageSize": 500, "pageNum": 1}
    plain = {**JSON, "Accept-Encoding": "identity"}
    zipped = {**JSON, "Accept-Encoding": "br;q=1, gzip;q=0.8"}
    refused = {**JSON, "Accept-Encoding": "gzip;q=0, identity"}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.post(url, json=big, headers=plain) as first:
            original = await first.read()
            assert (first.headers["X-Cache"], first.headers.get("Content-Encoding")) == (
                "MISS",
                None,
            )
        assert len(original) > 10_000, "pageSize 500 is a large answer"

        async def stored() -> bool:  # the caller is answered before the store lands
            async with session.post(url, json=big, headers=plain) as again:
                return again.headers["X-Cache"] == "HIT"

        await until(stored, "the answer stored", every=0.05)
        answers = {}
        for name, headers in (("plain", plain), ("gzip", zipped), ("refused", refused)):
            async with session.post(url, json=big, headers=headers) as hit:
                assert hit.headers["X-Cache"] == "HIT"
                assert hit.headers["Vary"] == "Accept-Encoding"
                answers[name] = (hit.headers.get("Content-Encoding"), await hit.read())
    assert answers["plain"] == (None, original)
    assert answers["refused"] == (None, original)
    encoding, packed = answers["gzip"]
    assert encoding == "gzip"
    assert len(packed) < len(original) * 0.3
    assert gzip.decompress(packed) == original
    assert upstream.requests == 1


async def test_a_small_hit_is_never_compressed(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    headers = {**JSON, "Accept-Encoding": "gzip"}
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        url = gateway.make_url(PATH)
        for expected in ("MISS", "HIT"):
            async with session.post(url, json={"pageSize": 1}, headers=headers) as answer:
                assert answer.headers["X-Cache"] == expected
                assert "Content-Encoding" not in answer.headers
                assert "Vary" not in answer.headers
                assert (await answer.json())["resultCode"] == "0200000"


def test_accept_encoding_is_read_as_http_defines_it() -> None:
    assert accepts_gzip("gzip")
    assert accepts_gzip("deflate, GZIP;q=0.5")
    assert accepts_gzip("x-gzip")
    assert not accepts_gzip("")
    assert not accepts_gzip("identity")
    assert not accepts_gzip("gzip;q=0")
    assert not accepts_gzip("gzip; q=0.000")
    assert not accepts_gzip("gzip;q=junk")
    assert not accepts_gzip("gzipx, br")
    assert accepts_gzip("gzip;level=1;q=0.5")
    assert not accepts_gzip("gzip; level=1; q=0")
