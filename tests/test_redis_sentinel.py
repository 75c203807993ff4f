"""Redis Sentinel (issue 15): the client follows a failover, the limit holds across the switch.

Real processes only: redis-servers (a primary and a replica), sentinels
(``tests/support/sentinel.py``), and for the acceptance rows gateway replicas and the simulator
(``tests/support/faults.py``). The limiter rows build the two hazards of a primary change by
hand on two redis-servers: a promoted replica that lacks the last grants (replication lag), and
an old primary that still takes writes after its replica was promoted (the gateways that have
not followed yet).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession
from redis import Redis

from gateway.clock import SystemClock
from gateway.errors import ConfigError
from gateway.limiter import FleetTimings, LimitConfig
from gateway.limiter.redis_limiter import RedisLimiter
from gateway.redis_client import REDIS_FAILURES, SentinelPool, check_eviction_policy, connect
from gateway.settings import RedisSettings
from tests.support.faults import (
    NEW_SETTINGS,
    Fleet,
    MissLoad,
    Window,
    judge,
    miss_load,
    serve_until_exit,
    start_fleet,
)
from tests.support.fleet import JSON, path, sim_stats, start_replica, start_simulator_process
from tests.support.processes import LIMITER_KEYS, RedisServer, free_port
from tests.support.sentinel import MASTER, SentinelSetup
from tests.support.tcp_proxy import TcpProxy
from tests.test_limiter_contract import SKEW, Holder, finish, until
from tests.test_redis_client_pool import assert_a_burst_waits_its_turn

WINDOW, LEASE = 0.3, 0.3
HOLD = LEASE + WINDOW  # a new epoch grants nothing for this long
LIMIT = LimitConfig(max_concurrent=2, window_s=WINDOW, max_queue=5, max_wait_s=3.0)


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    """A primary, its replica and one sentinel of the test's own (a failover changes them)."""
    with SentinelSetup() as setup:
        yield setup


# The client.


@pytest.mark.slow
async def test_the_client_follows_a_failover_with_its_commands_and_its_subscriptions(
    sentinel_setup: SentinelSetup,
) -> None:
    client = connect(RedisSettings(url=sentinel_setup.url))
    subscriber = client.pubsub()
    heard: list[bytes] = []

    async def listen() -> None:
        while True:
            try:
                message = await subscriber.get_message(ignore_subscribe_messages=True, timeout=1)
            except REDIS_FAILURES:  # the switch drops it; the next read reconnects
                await asyncio.sleep(0.05)
                continue
            if message is not None:
                heard.append(message["data"])

    try:
        await subscriber.subscribe("news")
        listener = asyncio.create_task(listen())
        await client.set("before", "1")
        old = sentinel_setup.primary()
        new = await asyncio.to_thread(sentinel_setup.failover)
        # The old primary still takes writes (the sentinels demote it seconds later): only
        # following the sentinels brings the client to the new one.
        with Redis(port=old.port) as plain:
            assert plain.info("replication")["role"] == "master"

        async def written_to_the_new_primary() -> bool:
            await client.incr("after")
            with Redis(port=new.port) as plain:
                return plain.get("after") is not None

        await until(written_to_the_new_primary, within=10)
        with Redis(port=new.port) as plain:
            assert plain.get("before") == b"1"  # replicated before the switch

        async def news_heard() -> bool:
            await client.publish("news", "after the switch")
            await asyncio.sleep(0.05)
            return b"after the switch" in heard

        await until(news_heard, within=10)
        pool = client.connection_pool
        assert isinstance(pool, SentinelPool)
        assert pool.switches == 1
        listener.cancel()
    finally:
        await subscriber.aclose()
        await client.aclose()


@pytest.mark.slow
async def test_a_connection_open_to_another_server_than_the_primary_is_dropped(
    sentinel_setup: SentinelSetup,
) -> None:
    # One that was connecting while the primary changed got the old address after the
    # switch's own sweep; held by a subscriber, and kept alive by its PINGs, it stayed there.
    client = connect(RedisSettings(url=sentinel_setup.url))
    pool = client.connection_pool
    assert isinstance(pool, SentinelPool)
    try:
        await client.ping()  # the primary is known; the pool follows the sentinels from now
        stray = await pool.get_connection()
        await stray.disconnect()
        await stray.connect_to(("127.0.0.1", sentinel_setup.replica().port))
        assert stray.is_connected
        await until(lambda: not stray.is_connected, "the stray connection dropped", within=10)
        await pool.release(stray)
        assert await client.set("k", "on the primary")  # the pool is as good as before
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_with_every_sentinel_gone_the_client_keeps_the_primary_it_had(
    sentinel_setup: SentinelSetup,
) -> None:
    client = connect(RedisSettings(url=sentinel_setup.url))
    try:
        await client.set("k", "before")
        primary = sentinel_setup.primary()
        for sentinel in sentinel_setup.sentinels:
            sentinel.stop()
        await client.connection_pool.disconnect()  # what a dropped connection leads to
        await client.set("k", "after")  # a new connection: to the primary named last
        with primary.client() as plain:
            assert plain.get("k") == b"after"
    finally:
        await client.aclose()


@pytest.mark.slow
async def test_a_master_name_no_sentinel_knows_is_a_config_error_naming_redis_url(
    sentinel_setup: SentinelSetup,
) -> None:
    url = sentinel_setup.url.replace(f"/{MASTER}", "/nosuchmaster")
    client = connect(RedisSettings(url=url))
    try:
        with pytest.raises(ConfigError) as error:
            await check_eviction_policy(client)
        assert error.value.key == "redis.url"
        assert "'nosuchmaster'" in error.value.message
        assert MASTER in error.value.message
    finally:
        await client.aclose()
    known = connect(RedisSettings(url=sentinel_setup.url))
    try:
        await check_eviction_policy(known)  # the right name passes
    finally:
        await known.aclose()


async def test_unreachable_sentinels_are_a_warning_not_a_refusal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/{MASTER}"
    client = connect(RedisSettings(url=url, timeout_ms=200))
    try:
        with caplog.at_level(logging.WARNING, logger="gateway"):
            await check_eviction_policy(client)
    finally:
        await client.aclose()
    assert "no Redis Sentinel answers" in caplog.text


async def test_the_sentinel_pool_is_bounded_like_the_standalone_one() -> None:
    url = "redis+sentinel://s1:26379/mymaster"
    client = connect(RedisSettings(url=url, pool_size=7, pool_timeout_ms=900))
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelPool)
        assert pool.max_connections == 7
        assert pool.timeout == 0.9
        assert pool.connection_kwargs["socket_timeout"] == 0.25
    finally:
        await client.aclose()


async def test_a_burst_on_a_busy_loop_waits_for_the_sentinel_pool_instead_of_failing(
    sentinel_setup: SentinelSetup,
) -> None:
    await assert_a_burst_waits_its_turn(sentinel_setup.url)


# The limiter across a primary change, built by hand on two servers.


@pytest.fixture
async def pair() -> AsyncIterator[tuple[RedisServer, RedisServer, TcpProxy]]:
    """A primary and a replica that replicates through a proxy (a link that can be cut)."""
    primary, replica = RedisServer().start(), RedisServer().start()
    proxy = TcpProxy(primary.port).start()
    with replica.client() as client:
        client.replicaof("127.0.0.1", proxy.port)
    try:
        await until(lambda: SentinelSetup.link_up(replica.port), within=10)
        yield primary, replica, proxy
    finally:
        proxy.close()
        replica.close()
        primary.close()


@pytest.fixture
def extra() -> Iterator[RedisServer]:
    """One more redis-server (to replicate from either of the pair)."""
    server = RedisServer().start()
    yield server
    server.close()


@asynccontextmanager
async def limiter_on(server: RedisServer) -> AsyncIterator[tuple[RedisLimiter, aioredis.Redis]]:
    """A replica's limiter on ``server`` and its client, both closed after the block."""
    client = aioredis.Redis.from_url(server.url)
    limiter = RedisLimiter(
        client, LIMIT, FleetTimings(lease_s=LEASE, fence_s=5.0, beat_s=0.1), clock=SystemClock()
    )
    try:
        yield limiter, client
    finally:
        await limiter.close()
        await client.aclose()


async def test_a_promoted_replica_that_lacks_the_last_grants_grants_nothing_until_they_lapsed(
    pair: tuple[RedisServer, RedisServer, TcpProxy], extra: RedisServer
) -> None:
    primary, replica, proxy = pair
    async with limiter_on(primary) as (old, old_client), limiter_on(replica) as (new, _):
        first = Holder(old)
        await first.started.wait()
        assert await old_client.wait(1, 5000) == 1  # the replica has the epoch, the first grant
        proxy.blackhole()  # replication lags from here: the second grant never reaches it
        second = Holder(old)
        await second.started.wait()
        with Redis(port=replica.port) as plain:
            assert plain.zcard(LIMITER_KEYS.leases) == 1  # the epoch survived, one lease lost
            plain.replicaof("no", "one")  # promoted, as a failover does
        # It gets a replica of its own as the old primary had (so only its new replication
        # id tells it apart): in a fleet of replicas, the others follow it at once.
        with extra.client() as plain:
            plain.replicaof("127.0.0.1", replica.port)
        await until(lambda: SentinelSetup.link_up(extra.port), within=10)
        promoted = time.monotonic()  # no gateway has asked it anything yet
        third = Holder(new)
        await until(third.started.is_set, "granted once the new primary's gate passed")
        # The old primary's two permits may still be at the vendor: the new primary grants
        # nothing until every lease it could not see has lapsed and left the window.
        assert time.monotonic() - promoted >= HOLD - SKEW
        await finish(first, second, third)


async def test_a_primary_that_lost_its_replica_grants_nothing_until_its_grants_lapsed(
    pair: tuple[RedisServer, RedisServer, TcpProxy],
) -> None:
    primary, replica, _ = pair
    async with limiter_on(primary) as (old, _):
        first = Holder(old)
        await first.started.wait()
        await finish(first)
        lost = time.monotonic()  # the gate cannot start before this
        with Redis(port=replica.port) as plain:
            plain.replicaof("no", "one")  # promoted: the new primary may grant from now on
        with Redis(port=primary.port) as plain:
            await until(lambda: plain.info("replication")["connected_slaves"] == 0)
        # A gateway that has not followed yet asks the old primary, which still takes writes:
        # whatever it grants now may overlap the new primary's grants, so it grants nothing
        # until the new primary's own gate (opened by then) has passed.
        late = Holder(old)
        await until(late.started.is_set, "granted once the new primary's gate passed")
        assert time.monotonic() - lost >= HOLD - SKEW
        await finish(late)


async def test_a_new_replica_or_a_steady_primary_costs_no_pause(
    pair: tuple[RedisServer, RedisServer, TcpProxy], extra: RedisServer
) -> None:
    primary, _, _ = pair
    async with limiter_on(primary) as (limiter, client):
        first = Holder(limiter)
        await first.started.wait()
        epoch = await client.hget(LIMITER_KEYS.meta, "epoch")
        with extra.client() as plain:
            plain.replicaof("127.0.0.1", primary.port)
        await until(lambda: SentinelSetup.link_up(extra.port), within=10)
        second = Holder(limiter)
        await until(second.started.is_set, "granted in the same epoch")
        assert await client.hget(LIMITER_KEYS.meta, "epoch") == epoch  # no new epoch, no gate
        assert await client.hget(LIMITER_KEYS.meta, "replicas") == b"2"
        await finish(first, second)


async def test_a_redis_user_denied_info_still_gets_permits_on_the_epoch_alone() -> None:
    server = RedisServer().start()
    with server.client() as admin:
        admin.acl_setuser(
            "gw", enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
            commands=["+@all", "-@dangerous"],
        )  # fmt: skip
    client = aioredis.Redis(port=server.port, username="gw", password="pw")
    limiter = RedisLimiter(
        client, LIMIT, FleetTimings(lease_s=LEASE, beat_s=0.1), clock=SystemClock()
    )
    try:
        holder = Holder(limiter)
        await until(holder.started.is_set, "granted on the epoch alone")
        await finish(holder)
    finally:
        await limiter.close()
        await client.aclose()
        server.close()


# Acceptance: a fleet on the Sentinel URL.

WARM_S = 3.0


def gateway_connections(server: RedisServer) -> int:
    """The gateway's connections to ``server`` (they carry its client name)."""
    with Redis(port=server.port) as plain:
        return sum(1 for c in plain.client_list() if c.get("name") == "isales-gateway")


def fleet_of_two(setup: SentinelSetup) -> Fleet:
    """Two gateway replicas on the Sentinel URL (each told the fleet is two) and the simulator."""
    return start_fleet([setup.url] * 2, limit__replicas="2")


@asynccontextmanager
async def miss_storm(setup: SentinelSetup) -> AsyncIterator[tuple[Fleet, MissLoad]]:
    """``fleet_of_two`` under a storm of distinct misses, running for ``WARM_S`` already."""
    fleet = fleet_of_two(setup)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        yield fleet, load


async def judge_the_switch(fleet: Fleet, load: MissLoad, switched: float) -> None:
    """``judge``: the limit held throughout, and misses were served since ``switched``."""
    await judge(fleet, load, served_in=[Window("after the switch", switched, time.monotonic())])


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_a_failover_during_a_distinct_miss_storm_keeps_the_limit_and_serves_after(
    sentinel_setup: SentinelSetup,
) -> None:
    async with miss_storm(sentinel_setup) as (fleet, load):
        old = sentinel_setup.primary()
        load.mark("SENTINEL FAILOVER")
        await asyncio.to_thread(sentinel_setup.failover)
        switched = load.mark("new primary named")
        # Both replicas left the old primary, which still takes writes until it is demoted.
        await until(lambda: gateway_connections(old) == 0, within=10)
        load.mark("no gateway connection left on the old primary")
        await asyncio.to_thread(sentinel_setup.wait_settled)
        load.mark("old primary demoted and synced")
        await asyncio.sleep(2)
        await judge_the_switch(fleet, load, switched)


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_the_primary_killed_during_a_distinct_miss_storm_keeps_the_limit(
    sentinel_setup: SentinelSetup,
) -> None:
    async with miss_storm(sentinel_setup) as (fleet, load):
        load.mark("primary killed")
        new = await asyncio.to_thread(sentinel_setup.crash_primary)
        switched = load.mark("replica promoted and named")
        await until(lambda: gateway_connections(new) > 0, within=10)
        await asyncio.sleep(12)  # the new epoch's hold, or a settle on the share, then served
        await judge_the_switch(fleet, load, switched)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_after_a_failover_identical_queries_over_two_replicas_cost_one_upstream_call(
    sentinel_setup: SentinelSetup,
) -> None:
    # Coalescing tells the waiting replica the outcome by pub/sub: a subscription left on the
    # old primary would never hear it, and that replica would call the upstream itself.
    fleet = fleet_of_two(sentinel_setup)
    async with ClientSession() as session:

        async def ask(replica: int, campaign: int) -> tuple[int, str]:
            url = fleet.replicas[replica].url + path(campaign)
            async with session.post(url, data=b'{"pageSize":20}', headers=JSON) as response:
                await response.read()
                return response.status, response.headers.get("X-Cache", "")

        before = await asyncio.gather(*(ask(n % 2, 10) for n in range(20)))
        assert {status for status, _ in before} == {200}
        old = sentinel_setup.primary()
        assert gateway_connections(old) > 0
        new = await asyncio.to_thread(sentinel_setup.failover)
        await until(lambda: gateway_connections(old) == 0, within=10)
        assert gateway_connections(new) > 0
        calls = int(str((await sim_stats(fleet.upstream))["requests_total"]))
        answers = await asyncio.gather(*(ask(n % 2, 20) for n in range(100)))
        assert {status for status, _ in answers} == {200}
        assert int(str((await sim_stats(fleet.upstream))["requests_total"])) == calls + 1
        assert [label for _, label in answers].count("MISS") == 1


@pytest.mark.slow
async def test_a_replica_given_an_unknown_master_name_stops_with_a_clear_error(
    sentinel_setup: SentinelSetup,
) -> None:
    upstream = start_simulator_process()
    url = sentinel_setup.url.replace(f"/{MASTER}", "/typo")
    code, output = serve_until_exit(upstream, url, **NEW_SETTINGS)
    assert code == 2, output[-1000:]
    assert "redis.url: no sentinel knows a primary named 'typo'" in output
    assert "Traceback" not in output


@pytest.mark.slow
async def test_a_replica_whose_sentinels_are_unreachable_starts_degraded() -> None:
    upstream = start_simulator_process()
    url = f"redis+sentinel://127.0.0.1:{free_port()}/{MASTER}"
    replica = start_replica(upstream, url, **NEW_SETTINGS)
    async with ClientSession() as session:
        async with session.get(replica.url + "/healthz") as response:
            assert response.status == 200
        async with session.get(replica.url + "/readyz") as response:
            body = await response.json()
        assert response.status == 200, body
        assert "redis" in body["degraded"]
    assert "Traceback" not in replica.output()
