"""Redis dies under load and comes back: callers keep their answers, the limit holds."""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from tests.support.fleet import JSON, path, sim_stats, start_replica, start_simulator_process
from tests.support.processes import Process, RedisServer, free_port
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def degraded(session: ClientSession, replica: Process) -> bool:
    async with session.get(replica.url + "/readyz") as response:
        body = await response.json()
        return "redis" in body["degraded"]


async def test_redis_killed_under_load_costs_no_5xx_and_no_violation_and_heals_itself() -> None:
    redis = RedisServer().start()
    redis.flush()
    upstream = start_simulator_process("--latency-ms", "200", "--enforce-limits")
    env = {
        "limit__replicas": "2",
        # lease 1 + 0.5 + 2 + 0.5 = 4 s: a failover settles within 1 + 0 + 1.5 + 4 + 1.1 s,
        # and the restarted (empty) Redis holds grants lease + window = 5.1 s
        "upstream__timeout_ms": "2000",
        "upstream__connect_timeout_ms": "500",
        "upstream__abandoned_hold_ms": "500",
        "limit__clock_skew_ms": "0",
        "limit__max_wait_ms": "60000",
    }
    replicas = [start_replica(upstream, redis.url, **env) for _ in range(2)]
    statuses: list[int] = []
    try:
        rng = random.Random(3)
        stop_at = time.monotonic() + 18
        async with ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=90)
        ) as session:

            async def caller(n: int) -> None:
                while time.monotonic() < stop_at:
                    campaign = rng.randrange(1, 60)  # a mix: repeats become hits or coalesce
                    url = replicas[n % 2].url + path(campaign)
                    async with session.post(url, data=b"{}", headers=JSON) as response:
                        await response.read()
                        statuses.append(response.status)

            load = asyncio.gather(*(caller(n) for n in range(30)))
            await asyncio.sleep(3)  # the load runs with Redis up, ...
            redis.stop(signal.SIGKILL)
            await asyncio.sleep(4)  # ... through an outage, ...
            assert await degraded(session, replicas[0])
            redis.start()  # ... and after it

            async def healed() -> bool:
                return not any([await degraded(session, r) for r in replicas])

            try:
                await until(healed, "the replicas returned to global mode", within=10, every=0.2)
            finally:
                await load
            for replica in replicas:
                async with session.get(replica.url + "/metrics") as response:
                    assert 'isales_gateway_degraded{component="redis"} 0.0' in await response.text()

        assert len(statuses) > 100
        assert sorted(set(statuses)) == [200], {s: statuses.count(s) for s in set(statuses)}
        stats = await sim_stats(upstream)
        assert stats["violations"] == 0
        assert stats["max_in_flight"] <= 10  # type: ignore[operator]
        assert stats["max_starts_in_window"] <= 10  # type: ignore[operator]
    finally:
        for process in [*replicas, upstream]:
            process.stop()
        redis.close()


async def test_redis_down_at_start_up_shows_as_degraded_from_the_first_second() -> None:
    upstream = start_simulator_process()
    replica = start_replica(upstream, f"redis://127.0.0.1:{free_port()}/0")  # nobody there
    try:
        async with ClientSession() as session:

            async def gauge() -> str:
                async with session.get(replica.url + "/metrics") as response:
                    text = await response.text()
                    return next(
                        line.split()[-1]
                        for line in text.splitlines()
                        if line.startswith('isales_gateway_degraded{component="redis"}')
                    )

            async def degraded_without_traffic() -> bool:  # the limiter said so, not a request
                return await gauge() == "1.0"

            await until(degraded_without_traffic, every=0.05)
            assert await degraded(session, replica)
    finally:
        replica.stop()
        upstream.stop()
