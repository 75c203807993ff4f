"""A coalescing round's leader replica killed or frozen mid-fetch (real processes, real Redis,
the simulator process): callers waiting on another replica are answered, at the cost of one
extra upstream call at most, once the dead leader's membership lapses (a lease: 5 s). A frozen
leader that resumes after its round was taken over answers its own callers only: it never
publishes over the new leader's round.

What the test watches is what the fleet shows: the simulator's count of calls, the answers,
and the namespace's outcome channel, subscribed to as any replica is.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from gateway.coalesce_wire import decode_outcome, outcome_channel
from tests.support.fleet import JSON, path, sim_stats, start_replica, start_simulator_process
from tests.support.processes import Process, RedisServer
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

QUESTION = (path(7), b'{"pageSize":10}')
FOLLOWERS = 8
# Followers wait up to max_wait + timeout + 1 s (21 s): far more than a takeover needs (a lease,
# 5 s, and a half-lease re-check), far less than a lock's backstop without one.
SETTINGS = {"limit__max_wait_ms": "10000", "upstream__timeout_ms": "10000"}


class Outcomes:
    """Every outcome message on the namespace's channel, as a replica would hear it."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.pubsub = client.pubsub()
        self.heard: list[bytes] = []
        self._task: asyncio.Task[None] | None = None

    def leaders(self) -> list[str | None]:
        """The request whose upstream call each outcome heard carries (None: not an answer)."""
        decoded = [decode_outcome(data.partition(b"\n")[2]) for data in self.heard]
        return [o.response.request_id if o and o.response else None for o in decoded]

    async def start(self) -> None:
        await self.pubsub.subscribe(outcome_channel())
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            if message["type"] == "message":
                self.heard.append(message["data"])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.pubsub.aclose()


@pytest.fixture
async def outcomes(redis_server: RedisServer) -> AsyncIterator[Outcomes]:
    redis_server.flush()
    client = aioredis.Redis.from_url(redis_server.url)
    heard = Outcomes(client)
    await heard.start()
    yield heard
    await heard.close()
    await client.aclose()


async def ask(session: ClientSession, replica: Process, request_id: str) -> tuple[int, bytes]:
    route, body = QUESTION
    headers = {**JSON, "X-Request-ID": request_id}
    async with session.post(replica.url + route, data=body, headers=headers) as response:
        return response.status, await response.read()


async def upstream_calls_are(upstream: Process, count: int) -> bool:
    return await upstream_calls(upstream) >= count


async def upstream_calls(upstream: Process) -> int:
    calls = (await sim_stats(upstream))["requests_total"]
    assert isinstance(calls, int)
    return calls


@dataclass
class Scene:
    """A round led on ``leader`` whose call is at the upstream, ``FOLLOWERS`` callers of the
    same question waiting on ``survivor``."""

    upstream: Process
    leader: Process
    survivor: Process
    led: asyncio.Future[tuple[int, bytes]]
    followers: list[asyncio.Future[tuple[int, bytes]]]


@contextlib.asynccontextmanager
async def leader_mid_fetch(redis_url: str) -> AsyncIterator[Scene]:
    upstream = start_simulator_process("--latency-ms", "3000", "--enforce-limits")
    leader, survivor = (start_replica(upstream, redis_url, **SETTINGS) for _ in range(2))
    try:
        async with ClientSession(
            connector=TCPConnector(limit=0), timeout=ClientTimeout(total=60)
        ) as session:
            led = asyncio.ensure_future(ask(session, leader, "leader"))
            await until(lambda: upstream_calls_are(upstream, 1), "the leader's call is out")
            followers = [
                asyncio.ensure_future(ask(session, survivor, f"follower-{n}"))
                for n in range(FOLLOWERS)
            ]
            yield Scene(upstream, leader, survivor, led, followers)
            await asyncio.gather(led, *followers, return_exceptions=True)
    finally:
        for process in [leader, survivor, upstream]:
            process.stop()


async def test_a_killed_leaders_round_is_taken_over_and_its_followers_answered(
    redis_server: RedisServer, outcomes: Outcomes
) -> None:
    async with leader_mid_fetch(redis_server.url) as scene:
        scene.leader.signal(signal.SIGKILL)
        answers = await asyncio.gather(*scene.followers)
        assert {status for status, _ in answers} == {200}
        assert len({body for _, body in answers}) == 1
        assert await upstream_calls(scene.upstream) <= 2  # the dead leader's, and one more
        assert (await sim_stats(scene.upstream))["violations"] == 0


async def test_a_frozen_leader_is_replaced_and_once_resumed_does_not_answer_the_new_round(
    redis_server: RedisServer, outcomes: Outcomes
) -> None:
    async with leader_mid_fetch(redis_server.url) as scene:
        scene.leader.signal(signal.SIGSTOP)
        # The survivor takes the round over once the frozen replica's membership lapsed; the
        # frozen one resumes while the new round is at the upstream (3 s), reads the answer to
        # its own call and finishes its round.
        await until(lambda: upstream_calls_are(scene.upstream, 2), "a takeover", within=30)
        scene.leader.signal(signal.SIGCONT)
        status, _ = await scene.led  # its own caller's answer (200, or 504 if it timed out)
        answers = await asyncio.gather(*scene.followers)
        assert scene.leader.stop() == 0  # a clean stop: its finishes under way are done
        assert status in (200, 504)
        assert {status for status, _ in answers} == {200}
        assert await upstream_calls(scene.upstream) == 2
        # The new leader's outcome reached the channel; the resumed leader's round was taken
        # over, so its outcome stayed with its own caller (it has exited: all it sent is in).
        await until(
            lambda: any(str(r).startswith("follower-") for r in outcomes.leaders()),
            "the new round's outcome is published",
        )
        assert "leader" not in outcomes.leaders(), outcomes.heard
