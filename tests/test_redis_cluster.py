"""Redis Cluster (``redis+cluster://``): the guarantees of a standalone Redis on a real
3-primary cluster (issue 15). Scripts' keys share one hash tag each, channels are sharded
(SSUBSCRIBE), the limiter's state lives on one primary and the cache spreads over all.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator

import pytest
from aiohttp import ClientSession, TCPConnector

from gateway.auth import key_digest
from gateway.clock import SystemClock
from gateway.errors import BackendUnavailable, ConfigError
from gateway.redis_bus import RedisBus
from gateway.redis_client import (
    CLUSTER_MIN_VERSION,
    REDIS_FAILURES,
    connect,
    version_at_least,
)
from gateway.settings import RedisSettings, cluster_nodes, load_settings
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.cluster import RedisClusterServers
from tests.support.faults import (
    NEW_SETTINGS,
    Window,
    judge,
    miss_load,
    serve_until_exit,
    start_fleet,
)
from tests.support.fleet import JSON, path, sim_stats, start_replica, start_simulator_process
from tests.support.processes import LIMITER_KEYS
from tests.support.waiting import until
from tests.test_redis_client_pool import POOL, SICK_BOUND_S, assert_a_burst_waits_its_turn

ADMIN_KEY = "cluster-admin-key"
WARM_S = 3.0


def is_entry(key: bytes) -> bool:
    """A cache entry (``isales:v1:{vdn:campaign}:<hash>``): not an index, lock or outcome."""
    return key.startswith(b"isales:v1:{11:") and key.count(b":") == 4 and b":index" not in key


@pytest.fixture(scope="session")
def cluster_servers() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers(primaries=3).start()
    yield servers
    servers.close()


@pytest.fixture
def cluster(cluster_servers: RedisClusterServers) -> RedisClusterServers:
    """The session's cluster, emptied as a planned reset and with every slot served."""
    cluster_servers.wait_ok()
    cluster_servers.flush()
    return cluster_servers


def test_a_cluster_needs_redis_7_for_sharded_pub_sub() -> None:
    assert version_at_least("7.0.15", CLUSTER_MIN_VERSION)
    assert version_at_least("10.2", CLUSTER_MIN_VERSION)
    assert not version_at_least("6.2.14", CLUSTER_MIN_VERSION)
    assert version_at_least("unstable", CLUSTER_MIN_VERSION)


def test_a_cluster_url_names_its_nodes_and_a_bad_one_names_the_key() -> None:
    url = "redis+cluster://:pw@10.0.0.1:7000,10.0.0.2,redis-3:7002"
    assert cluster_nodes(url) == [("10.0.0.1", 7000), ("10.0.0.2", 6379), ("redis-3", 7002)]
    settings = load_settings(None, {"GATEWAY_REDIS__URL": url}, require_upstream=False)
    assert settings.redis.url == url
    assert settings.redacted()["redis"]["url"] == url.replace(":pw@", ":***@")
    for bad in ("redis+cluster://h:port", "redis+cluster://h:7000,:7001", "redis+cluster://h/1"):
        env = {"GATEWAY_REDIS__URL": bad}
        with pytest.raises(ConfigError) as caught:
            load_settings(None, env, require_upstream=False)
        assert caught.value.key == "redis.url"


async def test_two_gateways_on_a_cluster_share_the_cache_and_its_invalidations(
    upstream: Upstream, start_gateway: StartGateway, cluster: RedisClusterServers
) -> None:
    settings = gateway_settings(
        upstream.url,
        redis__url=cluster.url,
        admin__key_sha256=key_digest(ADMIN_KEY),
        limit__replicas=2,
    )
    first, second = await start_gateway(settings), await start_gateway(settings)
    ready = await first.get("/readyz")
    body = await ready.json()
    assert (ready.status, body["degraded"], body["redis"]["reachable"]) == (200, [], True)

    campaigns = range(1, 13)  # 12 hash tags: the chance that one primary holds all is nil
    for campaign in campaigns:
        response = await first.post(path(campaign), json={"pageSize": 4})
        assert (response.status, response.headers["X-Cache"]) == (200, "MISS")
    for campaign in campaigns:
        for gateway in (second, first):  # first: from its local copy, if it kept one
            response = await gateway.post(path(campaign), json={"pageSize": 4})
            assert (response.status, response.headers["X-Cache"]) == (200, "HIT")
    assert upstream.requests == len(campaigns)

    holders = {
        port for port, keys in cluster.keys_per_node().items() if any(is_entry(key) for key in keys)
    }
    assert len(holders) > 1, "cache entries spread over the primaries"

    # They listen on the primaries owning their channels' slots, sharded (SSUBSCRIBE): both
    # for invalidations, the first (the only one that missed) for coalescing outcomes.
    for channel, listeners in (("isales:v1:cache:invalidate", 2), ("isales:v1:coalesce", 1)):
        owner = cluster.owner(channel).client()
        try:
            reply = owner.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        finally:
            owner.close()
        assert reply == [channel.encode(), listeners], reply

    # A purge through one gateway reaches the other's local copies (sharded pub/sub).
    purge = await second.delete(
        f"/admin/cache/campaigns/11/{campaigns[0]}",
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert purge.status == 200
    assert (await purge.json())["purged"] == 1
    await asyncio.sleep(0.3)  # the invalidation's way round
    response = await first.post(path(campaigns[0]), json={"pageSize": 4})
    assert response.headers["X-Cache"] == "MISS"
    assert upstream.requests == len(campaigns) + 1


async def test_a_replica_refuses_a_cluster_with_one_primary_that_evicts_any_key(
    cluster: RedisClusterServers,
) -> None:
    evicting = cluster.nodes[1]
    plain = evicting.client()
    plain.config_set("maxmemory-policy", "allkeys-lru")
    upstream = start_simulator_process()
    try:
        code, output = serve_until_exit(upstream, cluster.url, **NEW_SETTINGS)
    finally:
        plain.config_set("maxmemory-policy", evicting.policy)
        plain.close()
        upstream.stop()
    assert code not in (None, 0), f"a replica ran on an allkeys-lru primary: {output[-1000:]}"
    assert f"{evicting.port} maxmemory-policy is allkeys-lru" in output


async def test_a_burst_on_a_busy_loop_waits_its_turn_instead_of_failing(
    cluster: RedisClusterServers,
) -> None:
    # redis-py's cluster client fails a command at once when its node has every connection in
    # use; the gateway's waits its turn, as the standalone pool's commands do.
    await assert_a_burst_waits_its_turn(cluster.url)


async def test_a_burst_on_a_primary_that_does_not_answer_fails_every_call_within_a_bound(
    cluster: RedisClusterServers,
) -> None:
    client = connect(RedisSettings(url=cluster.url, pool_size=POOL))
    keys = [f"{{frozen}}:{i}" for i in range(10 * POOL)]  # one hash tag: one primary
    frozen = cluster.owner(keys[0])
    try:
        await client.set(keys[0], "x")  # the slot map is known before the freeze
        frozen.freeze()
        began = time.monotonic()
        async with asyncio.timeout(SICK_BOUND_S):
            outcomes = await asyncio.gather(
                *(client.get(key) for key in keys), return_exceptions=True
            )
        assert all(isinstance(outcome, REDIS_FAILURES) for outcome in outcomes), outcomes
        assert time.monotonic() - began < SICK_BOUND_S
    finally:
        frozen.thaw()
        # redis-py 8.1's aclose() closes nothing while the client owes a re-read of the slot
        # map (the freeze's errors ask for one): a command re-reads it first.
        with contextlib.suppress(*REDIS_FAILURES):
            await client.ping()
        await client.aclose()


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_three_replicas_on_a_cluster_ask_each_question_once_and_keep_the_limit(
    cluster: RedisClusterServers,
) -> None:
    upstream = start_simulator_process("--latency-ms", "200", "--enforce-limits")
    replicas = [start_replica(upstream, cluster.url, limit__max_wait_ms="60000") for _ in range(3)]
    async with ClientSession(connector=TCPConnector(limit=0)) as session:

        async def ask(n: int, campaign: int, size: int) -> tuple[int, str]:
            url = replicas[n % 3].url + path(campaign)
            body = b'{"pageSize":%d}' % size
            async with session.post(url, data=body, headers=JSON) as response:
                await response.read()
                return response.status, response.headers.get("X-Cache", "")

        identical = await asyncio.gather(*(ask(n, 3, 20) for n in range(300)))
        assert {status for status, _ in identical} == {200}
        assert [label for _, label in identical].count("MISS") == 1
        assert (await sim_stats(upstream))["requests_total"] == 1

        # 60 distinct questions over 12 campaigns (12 hash tags), each asked 5 times at once.
        questions = [(c, s) for c in range(20, 32) for s in range(5, 10)]
        distinct = await asyncio.gather(*(ask(n, c, s) for n in range(5) for c, s in questions))
        assert {status for status, _ in distinct} == {200}
    stats = await sim_stats(upstream)
    assert stats["requests_total"] == 1 + len(questions), stats
    entries = {
        port: sum(1 for key in keys if is_entry(key))
        for port, keys in cluster.keys_per_node().items()
    }
    assert sum(entries.values()) == 1 + len(questions), entries
    assert sum(1 for n in entries.values() if n) > 1, f"entries on one primary only: {entries}"
    assert (stats["violations"], stats["max_in_flight"] <= 10) == (0, True), stats  # type: ignore[operator]
    assert stats["max_starts_in_window"] <= 10, stats  # type: ignore[operator]


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_primary_holding_the_limiter_restarted_empty_under_load(
    cluster: RedisClusterServers,
) -> None:
    limiter_node = cluster.owner(LIMITER_KEYS.meta)
    fleet = start_fleet([cluster.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        load.mark("the limiter's primary restarted empty")
        limiter_node.restart_empty()
        await asyncio.to_thread(cluster.wait_ok)
        load.mark("cluster ok again")
        await asyncio.sleep(8)
        await judge(fleet, load)


@pytest.fixture
def cluster_with_replicas() -> Iterator[RedisClusterServers]:
    """3 primaries with a replica each, for this test alone (it kills a primary)."""
    servers = RedisClusterServers(primaries=3, replicas=1).start()
    servers.flush()
    yield servers
    servers.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_the_limiters_primary_killed_and_its_replica_promoted_under_load(
    cluster_with_replicas: RedisClusterServers,
) -> None:
    cluster = cluster_with_replicas
    primary = cluster.owner(LIMITER_KEYS.meta)
    replica = cluster.replica_of(primary)  # synced before the fault
    fleet = start_fleet([cluster.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        load.mark("the limiter's primary killed")
        primary.stop(signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_primary, replica)
        promoted = load.mark("its replica promoted, every slot served")
        await asyncio.sleep(10)
        after = Window("after the failover", promoted, time.monotonic())
        await judge(fleet, load, served_in=[after])


@pytest.mark.slow
async def test_a_sharded_subscription_follows_its_channel_to_the_promoted_replica(
    cluster_with_replicas: RedisClusterServers,
) -> None:
    cluster = cluster_with_replicas
    channel = "isales:v1:cache:invalidate"
    primary = cluster.owner(channel)
    replica = cluster.replica_of(primary)
    env = {"GATEWAY_REDIS__URL": cluster.url}
    client = connect(load_settings(None, env, require_upstream=False).redis)
    bus = RedisBus(client, clock=SystemClock())
    heard: list[bytes] = []
    subscription = bus.subscribe(channel, heard.append)
    try:
        await subscription.ready(5.0)
        await bus.publish(channel, b"before")
        # Heard before the kill: a message still in the primary's output buffer dies with it.
        await until(lambda: b"before" in heard, "the message before the failover", within=5)
        primary.stop(signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_primary, replica)
        await subscription.ready(15.0)
        async with asyncio.timeout(15.0):
            while b"after" not in heard:
                with contextlib.suppress(BackendUnavailable):
                    await bus.publish(channel, b"after")
                await asyncio.sleep(0.2)
    finally:
        await subscription.close()
        await client.aclose()
    assert heard[0] == b"before"
