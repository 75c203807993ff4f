"""``redis.namespace``: two deployments on one Redis share nothing (issue 15).

Pub/sub ignores the DB number, so the namespace is what keeps a staging fleet off a production
fleet's budget, cache and invalidations: every key and every channel starts with it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession

from gateway.auth import key_digest
from gateway.clock import SystemClock
from gateway.errors import ConfigError
from gateway.pause_redis import RedisPause
from gateway.settings import load_settings
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.faults import LIMIT, judge, miss_load, start_fleet
from tests.support.fleet import JSON, path, sim_stats
from tests.support.processes import Process, RedisServer

ADMIN_KEY = "namespace-admin-key"


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own: whatever is in it, the test put there."""
    server = RedisServer().start()
    yield server
    server.close()


def belongs_to(namespace: str, name: bytes) -> bool:
    """The namespace is the first part of the name (the limiter's opens its hash tag)."""
    text = name.decode()
    return text.startswith((f"{namespace}:", f"{{{namespace}:"))


@pytest.mark.parametrize("bad", ["", "has space", "{tag}", "a{b", "ends:", "é", "x" * 65, ":x"])
def test_a_namespace_that_could_break_keys_or_hash_tags_is_refused(bad: str) -> None:
    env = {"GATEWAY_REDIS__NAMESPACE": bad}
    with pytest.raises(ConfigError) as caught:
        load_settings(None, env, require_upstream=False)
    assert caught.value.key == "redis.namespace"


def test_the_namespace_defaults_to_isales_v1_and_is_read_from_the_environment() -> None:
    assert load_settings(None, {}, require_upstream=False).redis.namespace == "isales:v1"
    env = {"GATEWAY_REDIS__NAMESPACE": "isales:staging-2"}
    settings = load_settings(None, env, require_upstream=False)
    assert settings.redis.namespace == "isales:staging-2"
    assert settings.redacted()["redis"]["namespace"] == "isales:staging-2"  # /admin/config


async def test_every_key_and_channel_the_gateway_writes_starts_with_its_namespace(
    upstream: Upstream, start_gateway: StartGateway, fresh_redis: RedisServer
) -> None:
    settings = gateway_settings(
        upstream.url,
        redis__url=fresh_redis.url,
        redis__namespace="t1",
        admin__key_sha256=key_digest(ADMIN_KEY),
    )
    gateway = await start_gateway(settings)
    client = aioredis.Redis.from_url(fresh_redis.url)
    try:
        # A miss (limiter, coalescing, cache entry and index), a hit (the tier's listener),
        # identical misses at once (followers listen), a purge, an upstream pause.
        for body in ({"pageSize": 5}, {"pageSize": 5}):
            response = await gateway.post(path(3), json=body)
            assert response.status == 200
        together = await asyncio.gather(
            *(gateway.post(path(3), json={"pageSize": 7}) for _ in range(5))
        )
        assert {r.status for r in together} == {200}
        purge = await gateway.delete(
            "/admin/cache/campaigns/11/3", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert purge.status == 200
        assert (await gateway.post(path(3), json={"pageSize": 6})).status == 200
        await RedisPause(client, clock=SystemClock(), namespace="t1").pause(30)

        keys = [key async for key in client.scan_iter(count=1000)]
        channels = await client.pubsub_channels()
        patterns = await client.pubsub_numpat()
    finally:
        await client.aclose()
    assert keys, "the traffic wrote keys"
    assert [k for k in keys if not belongs_to("t1", k)] == []
    assert {b"t1:upstream:pause", b"{t1:limit}:meta"} <= set(keys)
    assert any(k.startswith(b"t1:{11:3}:") for k in keys), "a cache entry or its index"
    assert channels, "the gateway listens on some channel"
    assert [c for c in channels if not belongs_to("t1", c)] == []
    assert patterns == 0, "a pattern subscription could hear other namespaces"


def fleet_options(namespace: str, replicas: int) -> dict[str, str]:
    return {
        "redis__namespace": namespace,
        "limit__replicas": str(replicas),
        "admin__key_sha256": key_digest(ADMIN_KEY),
    }


async def cache_status(replica: Process, body: bytes) -> str:
    url = replica.url + path(3)
    async with ClientSession() as session, session.post(url, data=body, headers=JSON) as response:
        await response.read()
        assert response.status == 200
        return response.headers["X-Cache"]


async def purge(replica: Process) -> None:
    async with ClientSession() as session:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        url = replica.url + "/admin/cache/campaigns/11/3"
        async with session.delete(url, headers=headers) as response:
            assert response.status == 200, await response.text()


@pytest.mark.slow
async def test_two_fleets_on_one_redis_each_get_their_own_budget_and_cache(
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    replicas = 2
    # 800 ms answers: a fleet that has the whole budget keeps 10 in flight and starts 10 per
    # window; two fleets sharing one budget could only reach about half of that each.
    slow = ("--latency-ms", "800")
    fleets = [
        start_fleet([redis_server.url] * replicas, *slow, **fleet_options(ns, replicas))
        for ns in ("isales:prod", "isales:staging")
    ]

    async with (
        miss_load(fleets[0], callers=30) as first,
        miss_load(fleets[1], callers=30) as second,
    ):
        await asyncio.sleep(8)
        await asyncio.gather(judge(fleets[0], first), judge(fleets[1], second))
    for fleet in fleets:
        stats = await sim_stats(fleet.upstream)
        reached = (stats["max_in_flight"], stats["max_starts_in_window"], stats["violations"])
        assert reached == (LIMIT, LIMIT, 0), f"each fleet has the whole budget: {stats}"

    body = b'{"pageSize":3}'
    for fleet in fleets:
        assert await cache_status(fleet.replicas[0], body) == "MISS"
        assert await cache_status(fleet.replicas[1], body) == "HIT"
    await purge(fleets[0].replicas[0])
    await asyncio.sleep(0.5)  # an invalidation, had it crossed over, would have arrived
    assert await cache_status(fleets[1].replicas[0], body) == "HIT"
    assert await cache_status(fleets[1].replicas[1], body) == "HIT"
    assert await cache_status(fleets[0].replicas[1], body) == "MISS"
