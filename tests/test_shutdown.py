"""SIGTERM: stop accepting, finish what is in flight, leave no permit or lock in Redis."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, TCPConnector

from tests.support.fleet import (
    JSON,
    path,
    replica_metric,
    sim_stats,
    start_replica,
    start_simulator_process,
)
from tests.support.processes import RedisServer
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_sigterm_during_load_completes_in_flight_requests_and_releases_everything(
    redis_server: RedisServer,
) -> None:
    redis_server.flush()
    upstream = start_simulator_process("--latency-ms", "800", "--enforce-limits")
    replica = start_replica(upstream, redis_server.url)

    async def upstream_in_flight(count: int) -> bool:
        return (await sim_stats(upstream))["in_flight"] == count

    async def looked_up_and_queued(lookups: int, queued: int) -> bool:  # queued: at least
        misses = await replica_metric(replica, "isales_gateway_cache_lookups_total", result="miss")
        depth = await replica_metric(replica, "isales_gateway_queue_depth")
        return misses == lookups and depth >= queued

    try:
        async with ClientSession(connector=TCPConnector(limit=0)) as session:

            async def ask(campaign: int) -> int:
                async with session.post(
                    replica.url + path(campaign), data=b"{}", headers=JSON
                ) as r:
                    await r.read()
                    return r.status

            # 10 distinct misses at the upstream; then 4 more and 6 identical ones queued.
            load = [asyncio.ensure_future(ask(c)) for c in range(1, 11)]
            await until(lambda: upstream_in_flight(10), "the ten misses are at the upstream")
            queued = [asyncio.ensure_future(ask(c)) for c in range(11, 15)]
            queued += [asyncio.ensure_future(ask(99)) for _ in range(6)]
            # All 20 looked the cache up; five distinct questions wait for a permit (the six
            # identical ones as one call).
            await until(lambda: looked_up_and_queued(20, 5), "the ten more are waiting")
            replica.signal(signal.SIGTERM)
            statuses = await asyncio.gather(*load)
            shed = await asyncio.gather(*queued)
        assert statuses == [200] * 10  # what was at the upstream finishes
        assert shed == [503] * 10  # what waited is told at once, not after the drain
        assert await asyncio.to_thread(replica.proc.wait, 30) == 0

        client = aioredis.Redis.from_url(redis_server.url)
        try:
            leftovers = [key async for key in client.scan_iter(match="*lock*")]
            leases = [
                (key, await client.zcard(key)) async for key in client.scan_iter(match="*leases*")
            ]
        finally:
            await client.aclose()
        assert leftovers == []
        assert all(count == 0 for _, count in leases), leases
        stats = await sim_stats(upstream)
        assert stats["violations"] == 0
    finally:
        replica.stop()
        upstream.stop()
