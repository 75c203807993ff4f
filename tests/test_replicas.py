"""Several gateway replicas (separate processes) sharing one Redis, against one simulator process.

What counts is what the simulator measured on its own clock, on arrival: the fleet as a whole
keeps the vendor's limit, asks each distinct question once, and survives a replica's crash.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from gateway.limiter.redis_scripts import LimiterKeys
from gateway.settings import DEFAULT_NAMESPACE
from gateway.simulator.dataset import RUNNING_EVERY
from gateway.validation import parse_request
from tests.conftest import StartSimulator, signed_post
from tests.support.fleet import JSON, path, sim_stats, start_replica, start_simulator_process
from tests.support.processes import Process, RedisServer
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def fleet_redis(redis_server: RedisServer) -> RedisServer:
    redis_server.flush()
    return redis_server


async def test_three_replicas_keep_the_limit_and_ask_each_distinct_question_once(
    fleet_redis: RedisServer, start_simulator: StartSimulator
) -> None:
    upstream = start_simulator_process("--latency-ms", "200", "--enforce-limits")
    replicas = [
        start_replica(
            upstream, fleet_redis.url, cache__ttl_open_s="600", limit__max_wait_ms="60000"
        )
        for _ in range(3)
    ]
    try:
        # 120 distinct questions: closed past ranges and open-ended ones, then 2,000 requests.
        distinct = [(path(c), b'{"pageSize":10}') for c in range(1, 61)]
        distinct += [
            (path(c), b'{"pageSize":10,"beginTime":"2026-05-10","endTime":"2026-06-01"}')
            for c in range(1, 61)
        ]
        rng = random.Random(7)
        plan = [rng.randrange(len(distinct)) for _ in range(2000)]
        plan[: len(distinct)] = range(len(distinct))  # every distinct query is asked at least once
        rng.shuffle(plan)
        results: list[tuple[int, int, bytes]] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in plan:
            queue.put_nowait(index)

        async def caller(n: int, session: ClientSession) -> None:
            replica = replicas[n % 3]
            while not queue.empty():
                index = queue.get_nowait()
                url, body = distinct[index]
                async with session.post(replica.url + url, data=body, headers=JSON) as r:
                    results.append((index, r.status, await r.read()))

        async with ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=120)
        ) as session:
            await asyncio.gather(*(caller(n, session) for n in range(300)))

        stats = await sim_stats(upstream)
        assert stats["violations"] == 0
        assert stats["max_in_flight"] <= 10  # type: ignore[operator]
        assert stats["max_starts_in_window"] <= 10  # type: ignore[operator]
        assert stats["requests_total"] == len(distinct)
        assert len(results) == 2000

        reference = await start_simulator()
        expected = {}
        for index, (url, body) in enumerate(distinct):
            canonical = parse_request("11", url.rsplit("/", 1)[1], body).body_bytes()
            expected[index] = await signed_post(reference, url, canonical)
        answers: dict[int, set[bytes]] = {}
        for index, _, got in results:
            answers.setdefault(index, set()).add(got)
        assert all(len(got) == 1 for got in answers.values()), "one upstream answer per question"
        for index, status, got in results:
            assert status == 200
            campaign = int(distinct[index][0].rsplit("/", 1)[1])
            if campaign % RUNNING_EVERY or b"endTime" in distinct[index][1]:
                assert got == expected[index]
            else:  # still dialling: an open-ended answer grows with the simulator's clock
                assert json.loads(got)["resultCode"] == "0200000"
    finally:
        for process in [*replicas, upstream]:
            process.stop()


async def test_500_identical_queries_over_three_replicas_cost_one_upstream_call(
    fleet_redis: RedisServer,
) -> None:
    upstream = start_simulator_process("--latency-ms", "200", "--enforce-limits")
    replicas = [start_replica(upstream, fleet_redis.url) for _ in range(3)]
    try:
        async with ClientSession(connector=TCPConnector(limit=0)) as session:

            async def ask(n: int) -> tuple[int, str, bytes]:
                url = replicas[n % 3].url + path(3)
                async with session.post(url, data=b'{"pageSize":20}', headers=JSON) as r:
                    return r.status, r.headers["X-Cache"], await r.read()

            answers = await asyncio.gather(*(ask(n) for n in range(500)))
        stats = await sim_stats(upstream)
        assert stats["requests_total"] == 1
        assert {status for status, _, _ in answers} == {200}
        assert len({body for _, _, body in answers}) == 1
        labels = [label for _, label, _ in answers]
        assert labels.count("MISS") == 1
        assert set(labels) <= {"MISS", "COALESCED", "HIT"}
    finally:
        for process in [*replicas, upstream]:
            process.stop()


async def test_a_killed_replicas_permits_come_back_within_the_lease(
    fleet_redis: RedisServer,
) -> None:
    upstream = start_simulator_process("--latency-ms", "1500", "--enforce-limits")
    # Lease = 1 s + connect (1 s) + timeout (3 s) + abandoned hold (0.5 s): a dead holder's
    # permits return within 5.5 s.
    env = {
        "upstream__timeout_ms": "3000",
        "upstream__connect_timeout_ms": "1000",
        "upstream__abandoned_hold_ms": "500",
    }
    doomed, survivor = (start_replica(upstream, fleet_redis.url, **env) for _ in range(2))

    async def upstream_in_flight(count: int) -> bool:
        return (await sim_stats(upstream))["in_flight"] == count

    async def lease_expiries_after_now_ms() -> list[float]:
        """How far past Redis's ``TIME`` each held lease lapses by itself (no renewal)."""
        leases = LimiterKeys.for_namespace(DEFAULT_NAMESPACE).leases
        async with aioredis.Redis.from_url(fleet_redis.url) as redis:
            seconds, micros = await redis.time()
            scored = await redis.zrange(leases, 0, -1, withscores=True)
        return [expiry - (seconds * 1000 + micros / 1000) for _, expiry in scored]

    try:
        async with ClientSession(connector=TCPConnector(limit=0)) as session:

            async def ask(replica: Process, campaign: int) -> int:
                async with session.post(
                    replica.url + path(campaign), data=b"{}", headers=JSON
                ) as r:
                    await r.read()
                    return r.status

            held = [asyncio.ensure_future(ask(doomed, c)) for c in range(1, 11)]
            await until(lambda: upstream_in_flight(10), "all ten permits are held by `doomed`")
            doomed.signal(signal.SIGKILL)
            # What the survivor waits for (it cannot know the holder died): the dead holder's
            # leases, which lapse by themselves within a lease (5.5 s) on Redis's clock.
            lapse_in_ms = await lease_expiries_after_now_ms()
            await asyncio.gather(*held, return_exceptions=True)
            statuses = await asyncio.gather(*(ask(survivor, c) for c in range(101, 111)))
        assert len(lapse_in_ms) == 10
        assert all(lapse <= 5500 for lapse in lapse_in_ms), lapse_in_ms
        assert statuses == [200] * 10
        stats = await sim_stats(upstream)
        assert stats["violations"] == 0
        assert stats["max_in_flight"] <= 10  # type: ignore[operator]
        assert json.dumps(stats)  # the simulator is still healthy
    finally:
        for process in [doomed, survivor, upstream]:
            process.stop()
