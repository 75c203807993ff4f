"""What the Redis coalescer costs Redis per round, counted with ``INFO commandstats`` on the
test's own redis-server (a script's own commands included): the same whether the round's
leader waits one lease or ten for its permit, because liveness is renewed per replica (one
membership key), not per lock.

Counts, not times: time is a manual clock that the test moves, and the leaders' "permit" is
a gate the test opens. A round's own cost is told apart from the replica's (its membership
renewals, its subscription's keep-alive) by running 1 and ``ROUNDS`` leaders over the same
time: the difference is ``ROUNDS - 1`` rounds' worth.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.clock import ManualClock
from gateway.coalesce_redis import RedisCoalescer
from gateway.upstream import UpstreamResponse
from tests.support.processes import RedisServer
from tests.support.waiting import until

LEASE_S = 3.0
ROUNDS = 12
ANSWER = UpstreamResponse(200, b'{"resultCode":"0200000"}', "application/json")


class Counted(aioredis.Redis):
    """A replica's client that knows how many of its commands await Redis's answer, so the
    test can let every command that a clock step set off be answered before the next step."""

    in_flight = 0

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.in_flight += 1
        try:
            return await super().execute_command(*args, **options)
        finally:
            self.in_flight -= 1


async def answered(client: Counted) -> None:
    """Every command the last clock step set off has been sent and answered."""
    for _ in range(5):  # tasks woken by the step reach their first command
        await asyncio.sleep(0)
    await until(lambda: client.in_flight == 0, "the commands of a clock step are answered")


async def calls(client: aioredis.Redis) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    # ours; the subscription's keep-alive; a new pooled connection's handshake
    upkeep = {"info", "config|resetstat", "ping", "hello", "client|setinfo"}
    return sum(int(v["calls"]) for k, v in stats.items() if k[8:] not in upkeep)


@pytest.fixture
async def counted(redis_server: RedisServer) -> AsyncIterator[Counted]:
    redis_server.flush()
    client = Counted.from_url(redis_server.url)
    yield client
    await client.aclose()


async def spend(client: Counted, *, leaders: int, leases: int) -> int:
    """Redis commands while ``leaders`` rounds on distinct keys, on one replica, wait
    ``leases`` leases of its clock for their permit, then answer and finish."""
    clock = ManualClock()
    coalescer = RedisCoalescer(client, lease_s=LEASE_S, max_wait_s=3600.0, clock=clock)
    permit = asyncio.Event()
    started = 0

    async def answer() -> UpstreamResponse:
        return ANSWER

    async def fetch() -> UpstreamResponse:
        nonlocal started
        started += 1
        await permit.wait()
        return ANSWER

    try:
        # a first round: the subscription and the membership claim, once per replica
        assert await coalescer.run("warm-up", answer) == (ANSWER, True)
        await answered(client)
        await client.config_resetstat()
        rounds = [asyncio.ensure_future(coalescer.run(f"key-{n}", fetch)) for n in range(leaders)]
        await until(lambda: started == leaders, "every round leads and waits for its permit")
        for _ in range(leases * 6):
            clock.advance(LEASE_S / 6)
            await answered(client)
        permit.set()
        assert await asyncio.gather(*rounds) == [(ANSWER, True)] * leaders
    finally:
        await coalescer.close()  # waits for the finishes under way
    return await calls(client)


async def test_a_rounds_redis_commands_do_not_grow_with_how_long_its_leader_waits(
    counted: Counted, redis_server: RedisServer
) -> None:
    per_round: dict[int, float] = {}
    upkeep: dict[int, float] = {}  # the replica's own: membership renewals
    for leases in (1, 10):
        one = await spend(counted, leaders=1, leases=leases)
        redis_server.flush()
        many = await spend(counted, leaders=ROUNDS, leases=leases)
        redis_server.flush()
        per_round[leases] = (many - one) / (ROUNDS - 1)
        upkeep[leases] = one - per_round[leases]
    print(f"commands per round {per_round}, per replica {upkeep} (by leases waited)")
    assert per_round[10] == per_round[1], per_round
    assert upkeep[10] > upkeep[1], "the replica renews its membership while it leads"
