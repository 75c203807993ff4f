"""Sharing the upstream budget through the gateway: who pays, no-cache, refresh-ahead.

The scheduler's rules are tested on their own in tests/test_scheduler.py; here the real
gateway (in-memory limiter) in front of the simulator shows them end to end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from gateway.auth import key_digest
from gateway.cache_policy import CacheEntry
from gateway.clock import ManualClock
from gateway.errors import ConfigError, QueueFull
from gateway.popularity import Popularity, RefreshRule
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.waiting import until

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/{campaign}"
NO_CACHE = {"Cache-Control": "no-cache"}


def callers_file(tmp_path: Path, queue: int = 3, **weights: float) -> str:
    """A callers file naming ``weights``' callers, each with a queue of ``queue`` (their keys
    are unused while auth is off)."""
    tables = [
        f'[[callers]]\nname = "{name}"\nkey_sha256 = "{key_digest(name)}"\n'
        f'vdn_ids = ["*"]\nweight = {weight}\nmax_queue = {queue}\n'
        for name, weight in weights.items()
    ]
    path = tmp_path / "callers.toml"
    path.write_text("\n".join(tables))
    return str(path)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


Gateway = TestClient[web.Request, web.Application]


async def gateway_naming_callers(
    start_simulator: StartSimulator,
    start_gateway: StartGateway,
    callers: str,
    *,
    latency_ms: int,
    **settings: Any,
) -> tuple[Upstream, Gateway, CollectorRegistry]:
    """The simulator (answering after ``latency_ms``) behind a gateway that names the callers
    of the ``callers`` file by the ``X-Caller`` header; and the gateway's metrics."""
    upstream = await start_simulator(latency_ms=latency_ms)
    registry = CollectorRegistry()
    configured = gateway_settings(
        upstream.url, auth__callers_file=callers, limit__caller_header="X-Caller", **settings
    )
    gateway = await start_gateway(configured, registry=registry)
    return upstream, gateway, registry


async def post_as(
    gateway: Gateway, caller: str, campaign: int, body: dict[str, int] | None = None
) -> ClientResponse:
    """A query for ``campaign`` from ``caller`` (named by the ``X-Caller`` header)."""
    url = PATH.format(campaign=campaign)
    return await gateway.post(url, json=body or {}, headers={"X-Caller": caller})


# --- no-cache -------------------------------------------------------------------------------


async def test_forty_sequential_no_cache_requests_for_one_query_cost_one_call_per_min_age(
    upstream: Upstream, start_gateway: StartGateway, clock: ManualClock
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url), clock=clock)
    labels = []
    for _ in range(40):
        response = await gateway.post(PATH.format(campaign=3), json={}, headers=NO_CACHE)
        assert response.status == 200
        labels.append(response.headers["X-Cache"])
    assert upstream.requests == 1
    assert labels == ["BYPASS"] + ["HIT"] * 39, "the answer that just landed, not a new call"
    clock.advance(1.5)  # past cache.no_cache_min_age_s (1 s): a new call again
    response = await gateway.post(PATH.format(campaign=3), json={}, headers=NO_CACHE)
    assert response.headers["X-Cache"] == "BYPASS"
    assert upstream.requests == 2


async def test_a_no_cache_request_never_takes_an_answer_that_landed_before_the_min_age(
    upstream: Upstream, start_gateway: StartGateway, clock: ManualClock
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url), clock=clock)
    await gateway.post(PATH.format(campaign=3), json={})
    clock.advance(1.5)  # still fresh (30 s), but older than the no-cache minimum age
    response = await gateway.post(PATH.format(campaign=3), json={}, headers=NO_CACHE)
    assert response.headers["X-Cache"] == "BYPASS"
    assert upstream.requests == 2


# --- who is who ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "with_file"), [("X-Caller", False), ("X Caller", True), ("X-Caller:", True)]
)
def test_a_caller_header_must_be_a_header_name_and_needs_a_callers_file(
    tmp_path: Path, header: str, with_file: bool
) -> None:
    names = {"auth__callers_file": callers_file(tmp_path, a=1)} if with_file else {}
    with pytest.raises(ConfigError) as caught:
        gateway_settings("http://127.0.0.1:1", limit__caller_header=header, **names)
    assert caught.value.key == "limit.caller_header"


# --- who pays -------------------------------------------------------------------------------


async def test_the_caller_header_names_configured_callers_only_and_the_leader_pays(
    start_simulator: StartSimulator, start_gateway: StartGateway, tmp_path: Path
) -> None:
    upstream, gateway, registry = await gateway_naming_callers(
        start_simulator, start_gateway, callers_file(tmp_path, screen=1, export=1), latency_ms=200
    )
    leader = asyncio.create_task(post_as(gateway, "export", campaign=3))
    await until(lambda: upstream.requests == 1)
    follower = await post_as(gateway, "screen", campaign=3)
    assert follower.headers["X-Cache"] == "COALESCED"
    assert (await leader).headers["X-Cache"] == "MISS"
    await post_as(gateway, "bob", campaign=4)
    await gateway.post(PATH.format(campaign=5), json={})
    calls = "isales_gateway_caller_upstream_calls_total"
    assert sample(registry, calls, caller="export") == 1
    assert sample(registry, calls, caller="screen") == 0, "the coalesced follower paid nothing"
    assert sample(registry, calls, caller="other") == 1, "an unlisted name is 'other'"
    assert sample(registry, calls, caller="anonymous") == 1, "no header: 'anonymous'"
    assert sample(registry, calls, caller="bob") == 0
    requests = "isales_gateway_caller_requests_total"
    assert [sample(registry, requests, caller=c) for c in ("export", "screen", "other")] == [1] * 3


async def test_a_callers_full_queue_turns_away_that_caller_only_with_503_and_retry_after(
    start_simulator: StartSimulator, start_gateway: StartGateway, tmp_path: Path
) -> None:
    _, gateway, registry = await gateway_naming_callers(
        start_simulator,
        start_gateway,
        callers_file(tmp_path, flood=1, quiet=1),  # max_queue = 3 each
        latency_ms=300,
        limit__max_concurrent=1,
    )
    flood = [asyncio.create_task(post_as(gateway, "flood", campaign=c)) for c in range(10, 20)]
    rejected = "isales_gateway_caller_rejections_total"
    await until(lambda: sample(registry, rejected, caller="flood", reason="queue_full") == 6)
    quiet = await post_as(gateway, "quiet", campaign=99)
    assert quiet.status == 200
    answers = await asyncio.gather(*flood)
    turned_away = [r for r in answers if r.status == QueueFull.status]
    assert len(turned_away) == 6, "one in flight, three queued, the rest rejected at once"
    assert all(r.status == 200 for r in answers if r not in turned_away)
    for response in turned_away:
        assert (await response.json())["resultCode"] == QueueFull.code
        assert int(response.headers["Retry-After"]) >= 1
    assert sample(registry, rejected, caller="quiet", reason="queue_full") == 0


# --- refresh-ahead --------------------------------------------------------------------------


def test_an_entry_is_due_for_refresh_once_when_popular_open_ended_and_near_its_end() -> None:
    popularity = Popularity(RefreshRule(min_hits=3, lead_s=5.0, max_ttl=30.0))
    entry = CacheEntry(b"{}", "application/json", stored_at=100.0, ttl=30.0, stale=60.0)
    assert not popularity.hit("k", entry, 101.0)
    assert not popularity.hit("k", entry, 102.0)
    assert not popularity.hit("k", entry, 103.0), "popular, but not near its end yet"
    assert popularity.hit("k", entry, 126.0)
    assert not popularity.hit("k", entry, 127.0), "asked once per entry life"
    popularity.failed("k", entry)
    assert popularity.hit("k", entry, 128.0), "no idle permit came: a later hit asks again"
    renewed = CacheEntry(b"{}", "application/json", stored_at=128.5, ttl=30.0, stale=60.0)
    assert not popularity.hit("k", renewed, 155.0), "a new life counts its hits anew"


def test_closed_entries_and_unpopular_ones_are_never_refreshed_ahead() -> None:
    popularity = Popularity(RefreshRule(min_hits=2, lead_s=5.0, max_ttl=30.0))
    closed = CacheEntry(b"{}", "application/json", stored_at=0.0, ttl=86400.0, stale=60.0)
    assert not any(popularity.hit("closed", closed, 86399.0) for _ in range(5))
    lonely = CacheEntry(b"{}", "application/json", stored_at=0.0, ttl=30.0, stale=60.0)
    assert not popularity.hit("lonely", lonely, 29.0)


def test_popularity_forgets_the_oldest_keys_beyond_its_bound() -> None:
    popularity = Popularity(RefreshRule(), max_keys=3)
    entry = CacheEntry(b"{}", "application/json", stored_at=0.0, ttl=30.0, stale=60.0)
    for key in "abcde":
        popularity.hit(key, entry, 1.0)
    assert len(popularity) == 3


async def test_a_popular_open_ended_entry_is_refreshed_before_its_ttl_ends_and_stays_a_hit(
    upstream: Upstream, start_gateway: StartGateway, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    settings = gateway_settings(upstream.url, cache__refresh_min_hits=3, cache__ttl_open_s=30)
    gateway = await start_gateway(settings, clock=clock, registry=registry)
    path = PATH.format(campaign=3)
    await gateway.post(path, json={})  # the miss that stores it
    for _ in range(2):
        assert (await gateway.post(path, json={})).headers["X-Cache"] == "HIT"
    clock.advance(26.0)  # within refresh_ahead_s (5 s) of the TTL end
    assert (await gateway.post(path, json={})).headers["X-Cache"] == "HIT"
    await until(lambda: sample(registry, "isales_gateway_refresh_ahead_total", result="ok") == 1)
    assert upstream.requests == 2
    assert sample(registry, "isales_gateway_caller_upstream_calls_total", caller="background") == 1
    clock.advance(5.0)  # past the first answer's TTL: the refreshed one is still fresh
    response = await gateway.post(path, json={})
    assert response.headers["X-Cache"] == "HIT"
    assert upstream.requests == 2


async def popular_then_past_its_ttl(gateway: Gateway, clock: ManualClock) -> str:
    """Ask one open-ended query three times (popular), once within refresh_ahead_s (5 s) of
    its TTL's end (30 s), then past it: the last answer's X-Cache. A refresh still under way
    would make it COALESCED, one that landed a HIT."""
    path = PATH.format(campaign=3)
    for _ in range(3):
        await gateway.post(path, json={})
    clock.advance(26.0)
    await gateway.post(path, json={})
    clock.advance(5.0)
    return (await gateway.post(path, json={})).headers["X-Cache"]


async def test_with_refresh_ahead_off_the_same_entry_expires_and_misses(
    upstream: Upstream, start_gateway: StartGateway, clock: ManualClock
) -> None:
    settings = gateway_settings(upstream.url, cache__refresh_ahead_s=0, cache__swr_s=0)
    gateway = await start_gateway(settings, clock=clock)
    assert await popular_then_past_its_ttl(gateway, clock) == "MISS"
    assert upstream.requests == 2


@pytest.mark.parametrize("share", [0.0, 0.05])
async def test_a_share_too_small_for_one_permit_switches_refresh_ahead_off(
    upstream: Upstream, start_gateway: StartGateway, share: float, clock: ManualClock
) -> None:
    registry = CollectorRegistry()
    settings = gateway_settings(upstream.url, cache__refresh_max_share=share, cache__swr_s=0)
    gateway = await start_gateway(settings, clock=clock, registry=registry)
    assert await popular_then_past_its_ttl(gateway, clock) == "MISS"
    assert upstream.requests == 2
    assert sample(registry, "isales_gateway_refresh_ahead_total", result="ok") == 0


# --- weights under sustained contention -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_weights_three_to_one_share_the_upstream_within_ten_percent_over_30_seconds(
    start_simulator: StartSimulator, start_gateway: StartGateway, tmp_path: Path
) -> None:
    _, gateway, registry = await gateway_naming_callers(
        start_simulator,
        start_gateway,
        callers_file(tmp_path, queue=50, heavy=3, light=1),
        latency_ms=200,
    )
    pages = iter(range(1, 1_000_000))
    stop = asyncio.Event()

    async def keep_asking(caller: str) -> None:
        """One of 15 loops per caller, each always with a distinct miss outstanding."""
        while not stop.is_set():
            body = {"pageNum": next(pages), "pageSize": 1}
            response = await post_as(gateway, caller, campaign=3, body=body)
            assert response.status == 200

    def calls(caller: str) -> float:
        return sample(registry, "isales_gateway_caller_upstream_calls_total", caller=caller)

    loops = [asyncio.create_task(keep_asking(c)) for c in ("heavy", "light") for _ in range(15)]
    # Both callers' queues are full (30 loops, at most 10 in flight): contention from here on.
    await until(lambda: sample(registry, "isales_gateway_queue_depth") >= 20, "queues full")
    before = {c: calls(c) for c in ("heavy", "light")}
    await asyncio.sleep(30.0)  # the span the shares are measured over
    heavy, light = (calls(c) - before[c] for c in ("heavy", "light"))
    stop.set()
    await asyncio.gather(*loops)
    assert heavy + light >= 200, "the budget (about 9 a second) was in use all along"
    assert heavy / light == pytest.approx(3.0, rel=0.1)
