"""The fault matrix: the vendor's limit holds whatever fails (issue 9, README "Faults").

One row per test: 3 replicas on one Redis (unless the row says otherwise), distinct misses
spread over them for the whole fault, the simulator in its own process as the judge. Each row
ends in ``judge``: 0 violations, at most 10 in flight and 10 starts per window at the
simulator, never a 500, a fresh batch of misses all 200 after the fault, and some 200s during
the fault where a fallback (or the rest of the fleet) can serve.

Timing: a fault may stall misses for upstream.timeout_ms + abandoned_hold_ms + 2 heartbeats
+ a window (about 6-8 s here); callers queue through it (limit.max_wait_ms 30 s). A fault
that must be served "during" lasts at least 12 s, so a fallback has time to serve in it. The
sleeps below are these durations (warm-up, fault, recovery under load): the scenario itself.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tests.support.faults import (
    HANG_STATUSES,
    NEW_SETTINGS,
    Window,
    judge,
    miss_load,
    serve_until_exit,
    set_behaviour,
    start_fleet,
)
from tests.support.fleet import start_simulator_process
from tests.support.processes import RedisServer
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

WARM_S = 3.0  # load before the fault: every replica is busy on Redis
# A 200 that finished this long after a fault began was granted after it began (the upstream
# timeout is 1.5 s): where Redis refuses writes or is cut off, it came from a fallback.
GRANTED_AFTER_S = 2.0
SETTLE_S = 7.0  # a frozen or dead replica's leases have surely lapsed by then


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    """A Redis of the test's own: faults change its data and its configuration."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.mark.timeout(30)
def test_the_proxy_cuts_a_redis_link_as_a_partition_would(redis: RedisServer) -> None:
    proxy = TcpProxy(redis.port).start()
    client = Redis(port=proxy.port, socket_timeout=0.3, socket_connect_timeout=0.3, retry=None)
    try:
        assert client.ping()
        proxy.blackhole()
        with pytest.raises(RedisTimeoutError):
            client.ping()
        proxy.heal()
        assert client.ping()
        proxy.reset()
        with pytest.raises(RedisConnectionError):
            client.ping()
        proxy.heal()
        assert client.ping()
    finally:
        client.close()
        proxy.close()


async def test_without_a_fault_the_fleet_keeps_the_limit(redis: RedisServer) -> None:
    # The baseline: if this row fails, the others' verdicts say nothing about their faults.
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(15)
        await judge(fleet, load, served_in=[Window("under load", load.began, time.monotonic())])


async def test_redis_restarted_empty_twice_under_load(redis: RedisServer) -> None:
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        for _ in range(2):
            load.mark("Redis restarted empty")
            redis.restart_empty()
            await asyncio.sleep(8)
        await judge(fleet, load)


async def test_flushall_three_times_under_load(redis: RedisServer) -> None:
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        with redis.client() as client:
            for _ in range(3):
                load.mark("FLUSHALL")
                client.flushall()
                await asyncio.sleep(5)
        await judge(fleet, load)


async def test_a_replica_refuses_a_redis_whose_policy_evicts_any_key() -> None:
    redis = RedisServer(policy="allkeys-lru").start()
    upstream = start_simulator_process()
    try:
        code, output = serve_until_exit(upstream, redis.url, **NEW_SETTINGS)
    finally:
        redis.close()
    assert code not in (None, 0), f"a replica ran on an allkeys-lru Redis: {output[-1000:]}"
    assert "maxmemory-policy" in output


async def test_eviction_pressure_with_large_answers_keeps_the_limit() -> None:
    redis = RedisServer(maxmemory="4mb", policy="volatile-lru").start()
    try:
        fleet = start_fleet([redis.url] * 3)
        async with miss_load(fleet, page_size=500) as load:
            await asyncio.sleep(20)  # ~9 answers of ~100 KB a second: Redis evicts within 5 s
            await judge(fleet, load)
    finally:
        redis.close()


async def test_redis_turned_read_only_replica_then_promoted_again(redis: RedisServer) -> None:
    master = RedisServer().start()
    try:
        fleet = start_fleet([redis.url] * 3)
        async with miss_load(fleet) as load:
            await asyncio.sleep(WARM_S)
            with redis.client() as client:
                client.replicaof("127.0.0.1", master.port)  # READONLY, and its data replaced
                began = load.mark("REPLICAOF")
                await asyncio.sleep(14)
                client.replicaof("NO", "ONE")
                healed = load.mark("REPLICAOF NO ONE")
            during = Window("while Redis was read-only", began + GRANTED_AFTER_S, healed)
            await judge(fleet, load, served_in=[during])
    finally:
        master.close()


async def test_client_pause_write_under_load(redis: RedisServer) -> None:
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        with redis.client() as client:
            client.execute_command("CLIENT", "PAUSE", 60000, "WRITE")
            began = load.mark("CLIENT PAUSE WRITE")
            await asyncio.sleep(14)
            client.execute_command("CLIENT", "UNPAUSE")
            healed = load.mark("CLIENT UNPAUSE")
        during = Window("while Redis refused writes", began + GRANTED_AFTER_S, healed)
        await judge(fleet, load, served_in=[during])


@pytest.mark.parametrize("cut", ["blackhole", "reset"])
async def test_one_replica_partitioned_from_redis_longer_than_the_settle_time(
    redis: RedisServer, cut: str
) -> None:
    proxy = TcpProxy(redis.port).start()
    try:
        fleet = start_fleet([redis.url, redis.url, proxy.redis_url])
        async with miss_load(fleet) as load:
            await asyncio.sleep(WARM_S)
            if cut == "blackhole":
                proxy.blackhole()
            else:
                proxy.reset()
            began = load.mark(f"partition ({cut})")
            await asyncio.sleep(15)
            proxy.heal()
            healed = load.mark("healed")
            await asyncio.sleep(3)
            windows = [
                Window("by the partitioned replica", began + GRANTED_AFTER_S, healed, {2}),
                Window("by the others during the partition", began + SETTLE_S, healed, {0, 1}),
            ]
            await judge(fleet, load, served_in=windows)
    finally:
        proxy.close()


async def test_the_vendor_keeps_working_on_requests_the_gateway_abandoned(
    redis: RedisServer,
) -> None:
    # 30% of calls hang 4 s at the vendor, which keeps them in flight after the gateway hangs
    # up at 1 s; the gateway must count each for abandoned_hold_ms (4 s) more.
    hold = {"upstream__abandoned_hold_ms": "4000"} if NEW_SETTINGS else {}
    hangs = ("--timeout-rate", "0.3", "--hang-s", "4")
    fleet = start_fleet([redis.url] * 3, *hangs, upstream__timeout_ms="1000", **hold)
    async with miss_load(fleet) as load:
        await asyncio.sleep(20)
        await set_behaviour(fleet.upstream, timeout_rate=0.0)
        load.mark("hangs off")  # healed for the fresh batch
        await judge(fleet, load, allowed=HANG_STATUSES)


async def test_a_replica_frozen_for_12_s_then_resumed(redis: RedisServer) -> None:
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        load.down.add(2)  # a load balancer stops sending to it; what it holds stays
        fleet.replicas[2].signal(signal.SIGSTOP)
        began = load.mark("replica SIGSTOP")
        await asyncio.sleep(12)
        fleet.replicas[2].signal(signal.SIGCONT)
        load.down.discard(2)
        resumed = load.mark("replica SIGCONT")
        await asyncio.sleep(4)
        during = Window("by the others while one was frozen", began + SETTLE_S, resumed, {0, 1})
        await judge(fleet, load, served_in=[during])


async def test_a_replica_killed_under_load(redis: RedisServer) -> None:
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        load.down.add(2)
        fleet.replicas[2].signal(signal.SIGKILL)
        began = load.mark("replica SIGKILL")
        await asyncio.sleep(12)
        after = Window("by the others after the kill", began + SETTLE_S, time.monotonic(), {0, 1})
        await judge(fleet, load, served_in=[after])


async def test_redis_frozen_for_5_s_under_load(redis: RedisServer) -> None:
    fleet = start_fleet([redis.url] * 3)
    async with miss_load(fleet) as load:
        await asyncio.sleep(WARM_S)
        redis.freeze()
        load.mark("Redis SIGSTOP")
        await asyncio.sleep(5)
        redis.thaw()
        load.mark("Redis SIGCONT")
        await asyncio.sleep(6)
        await judge(fleet, load)
