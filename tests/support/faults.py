"""The fault matrix's harness: a fleet, a load of distinct misses, a judge (the proxy that cuts
a replica off from Redis is in ``tcp_proxy``).

The gateway is judged only from outside: what the simulator (a process of its own, measuring
on its own clock, on arrival) saw, and what callers got. Every load is bounded in requests and
in time, and talks to localhost only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector

from tests.support.fleet import (
    JSON,
    path,
    replica_environ,
    sim_stats,
    start_replica,
    start_simulator_process,
)
from tests.support.processes import Process, free_port

# Short enough that a fault's stall (timeout + abandoned hold + heartbeats + a window) fits
# in a test; long enough that callers queue through it instead of getting 503.
FLEET_SETTINGS = {
    "upstream__timeout_ms": "1500",
    "upstream__connect_timeout_ms": "500",
    "limit__replicas": "3",
    "limit__max_wait_ms": "30000",
}
# Settings issue 9 adds; a gateway without them refuses to start when given them, so to run
# the matrix against an older gateway empty this dict locally.
NEW_SETTINGS = {"upstream__abandoned_hold_ms": "1500"}
SIM_LATENCY = ("--latency-ms", "200")
LIMIT = 10  # the simulator's default max_concurrent per window_ms (1000)

# What a caller may get while a fault lasts; 502/504 only where the vendor itself hangs.
FAULT_STATUSES = frozenset({200, 503})
HANG_STATUSES = frozenset({200, 502, 503, 504})


@dataclass
class Fleet:
    upstream: Process
    replicas: list[Process]


def start_fleet(redis_urls: Sequence[str], *sim_flags: str, **settings: str) -> Fleet:
    """The simulator (200 ms, limits only counted) and one replica per Redis URL.

    Processes are stopped after the test by conftest, also when it fails.
    """
    upstream = start_simulator_process(*SIM_LATENCY, *sim_flags)
    env = {**FLEET_SETTINGS, **NEW_SETTINGS, **settings}
    return Fleet(upstream, [start_replica(upstream, url, **env) for url in redis_urls])


def serve_until_exit(
    upstream: Process, redis_url: str, timeout_s: float = 10.0, **settings: str
) -> tuple[int | None, str]:
    """Run ``serve`` as a replica would and wait for it to exit: (exit code, output).

    The exit code is None if it was still running after ``timeout_s`` (then it is killed).
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(replica_environ(port, upstream.url, redis_url, **settings))
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out.decode(errors="replace")
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return None, out.decode(errors="replace")


# Few and big (over 2000 subscribers each): the simulator builds a campaign's data once, in its
# event loop (up to ~200 ms on a busy machine), and memoizes it. A new campaign per request
# would stall its loop again and again and bunch the arrivals it stamps: false violations.
CAMPAIGNS = (10, 20, 30, 40, 50, 60)


def question(n: int, page_size: int) -> tuple[str, bytes]:
    """The n-th distinct question: a campaign, a page size (page_size down to half of it) and
    a page number, each combination once; every page holds rows."""
    half = max(1, page_size // 2)
    rest = n // len(CAMPAIGNS)
    size, number = page_size - rest % half, 1 + rest // half
    return path(CAMPAIGNS[n % len(CAMPAIGNS)]), b'{"pageSize":%d,"pageNum":%d}' % (size, number)


async def warm_up(session: ClientSession, replica: Process) -> None:
    """Have the simulator build every campaign before the load (fewer than 10 calls, so
    bunched arrivals cannot look like a violation); questions the load never asks."""

    async def ask(campaign: int) -> int:
        url = replica.url + path(campaign)
        async with session.post(url, data=b'{"pageSize":1}', headers=JSON) as response:
            await response.read()
            return response.status

    statuses = await asyncio.gather(*(ask(c) for c in CAMPAIGNS))
    # 502/504 where the simulator is told to hang; a built campaign is all this is for.
    assert set(statuses) <= HANG_STATUSES, f"before any fault the fleet answered {statuses}"


@dataclass(frozen=True)
class Outcome:
    """One caller request: which replica, when (monotonic s), and what came back.

    ``status`` 0: no HTTP answer at all (connection refused or reset, client timeout).
    """

    replica: int
    sent: float
    done: float
    status: int
    retry_after: bool = False


class MissLoad:
    """``callers`` concurrent callers asking distinct questions (every one a miss), each sent to
    the next replica not marked ``down``; until stopped, ``max_requests`` sent or ``max_s``.
    ``page_size`` 500 makes large answers (250 to 500 rows).
    """

    def __init__(
        self,
        session: ClientSession,
        fleet: Fleet,
        *,
        callers: int = 30,
        page_size: int = 10,
        max_requests: int = 3000,
        max_s: float = 90.0,
    ) -> None:
        self.fleet = fleet
        self.replicas = fleet.replicas
        self.down: set[int] = set()
        self.outcomes: list[Outcome] = []
        self.began = time.monotonic()
        self.events: list[tuple[float, str]] = []  # marks and new violations, for the report
        self._session = session
        self._page_size = page_size
        self._max_requests = max_requests
        self._numbers = itertools.count()
        self._turn = itertools.count()
        self._stopping = False
        deadline = time.monotonic() + max_s
        self._tasks = [asyncio.create_task(self._caller(deadline)) for _ in range(callers)]
        self._watch = asyncio.create_task(self._watch_violations())

    def mark(self, label: str) -> float:
        """Note a fault's step for the report; its time (monotonic s)."""
        now = time.monotonic()
        self.events.append((now, label))
        return now

    def timeline(self) -> str:
        """Marks and new violations, in seconds since the load began."""
        return ", ".join(f"{t - self.began:.1f}s {label}" for t, label in sorted(self.events))

    async def stop(self, cancel: bool = False) -> None:
        """No new requests; the ones under way finish (or are cancelled)."""
        self._stopping = True
        if cancel:
            for task in self._tasks:
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=cancel)

    async def close(self) -> None:
        await self.stop(cancel=True)
        self._watch.cancel()
        await asyncio.gather(self._watch, return_exceptions=True)

    async def fresh_batch(self, per_replica: int = 8) -> list[Outcome]:
        """``per_replica`` new distinct misses to every replica not down, all at once."""
        alive = [i for i in range(len(self.replicas)) if i not in self.down]
        return await asyncio.gather(*(self.ask(i) for i in alive for _ in range(per_replica)))

    async def ask(self, replica: int) -> Outcome:
        route, body = question(next(self._numbers), self._page_size)
        url = self.replicas[replica].url + route
        sent = time.monotonic()
        try:
            async with self._session.post(url, data=body, headers=JSON) as response:
                await response.read()
                status, retry_after = response.status, "Retry-After" in response.headers
        except (ClientError, TimeoutError):
            status, retry_after = 0, False
        return Outcome(replica, sent, time.monotonic(), status, retry_after)

    async def _watch_violations(self) -> None:
        seen = 0
        while True:
            await asyncio.sleep(0.5)
            with contextlib.suppress(ClientError, TimeoutError):
                stats = await sim_stats(self.fleet.upstream)
                violations = int(str(stats["violations"]))
                if violations > seen:
                    self.events.append((time.monotonic(), f"{violations - seen} violations"))
                    seen = violations

    async def _caller(self, deadline: float) -> None:
        while not self._stopping and time.monotonic() < deadline:
            if len(self.outcomes) >= self._max_requests:
                return
            alive = [i for i in range(len(self.replicas)) if i not in self.down]
            outcome = await self.ask(alive[next(self._turn) % len(alive)])
            self.outcomes.append(outcome)
            if outcome.status == 0:
                await asyncio.sleep(0.1)  # no hot loop against a dead replica


@contextlib.asynccontextmanager
async def miss_load(fleet: Fleet, **options: Any) -> AsyncIterator[MissLoad]:
    """``async with miss_load(fleet) as load:`` the load runs from here until ``judge`` (or
    the block's end; cancelled if the block fails)."""
    async with ClientSession(
        connector=TCPConnector(limit=0), timeout=ClientTimeout(total=60)
    ) as session:
        await warm_up(session, fleet.replicas[0])
        load = MissLoad(session, fleet, **options)
        try:
            yield load
        finally:
            await load.close()


def served(
    outcomes: Collection[Outcome], since: float, until: float, replicas: Collection[int] = ()
) -> int:
    """Misses answered 200 that finished in (since, until), by ``replicas`` (default: any)."""
    return sum(
        1
        for o in outcomes
        if o.status == 200 and since < o.done < until and (not replicas or o.replica in replicas)
    )


@dataclass
class Window:
    """A stretch of a fault in which misses must still be answered (by ``replicas``)."""

    label: str
    since: float
    until: float
    replicas: Collection[int] = ()


async def judge(
    fleet: Fleet,
    load: MissLoad,
    *,
    allowed: Collection[int] = FAULT_STATUSES,
    served_in: Sequence[Window] = (),
    lost: Collection[int] = (),
) -> None:
    """The end of every row of the matrix; one AssertionError naming every promise broken.

    The load stops; a fresh batch of distinct misses (to every replica not ``down``) must all
    be 200. The simulator must have seen no violation, at most 10 in flight and 10 starts in a
    window. Callers must have had only ``allowed`` statuses: never a 500, a 503 always with
    Retry-After, no answer at all only from a replica marked down or in ``lost``. Each
    ``served_in`` window must hold some 200s.
    """
    await load.stop()
    load.mark("load stopped; fresh batch")
    fresh = await load.fresh_batch()
    load.mark("fresh batch answered")
    await asyncio.sleep(0.6)  # the watcher's last look
    stats = await sim_stats(fleet.upstream)
    problems = []
    seen = {k: int(str(stats[k])) for k in ("violations", "max_in_flight", "max_starts_in_window")}
    if seen["violations"] != 0 or max(seen.values()) > LIMIT:
        problems.append(f"the simulator saw the limit broken: {seen}")
    if int(str(stats["requests_total"])) < 50:
        problems.append(f"too little load to judge: {stats['requests_total']} requests")
    fresh_statuses = sorted(o.status for o in fresh)
    if set(fresh_statuses) != {200}:
        problems.append(f"fresh misses after the fault: {_count(fresh_statuses)}")
    excused = {*load.down, *lost}
    bad = [
        o.status
        for o in load.outcomes
        if o.status not in allowed and not (o.status == 0 and o.replica in excused)
    ]
    if bad:
        every = _count(o.status for o in load.outcomes)
        problems.append(f"callers got {_count(bad)} (all: {every})")
    if any(o.status == 503 and not o.retry_after for o in load.outcomes):
        problems.append("a 503 without Retry-After")
    for window in served_in:
        if served(load.outcomes, window.since, window.until, window.replicas) == 0:
            problems.append(f"no miss answered {window.label}")
    assert not problems, "; ".join([*problems, f"timeline: {load.timeline()}", _warnings(fleet)])


def _warnings(fleet: Fleet, last: int = 4) -> str:
    """The replicas' last warnings (but the start-up one about caller auth), for a verdict."""
    parts = []
    for index, replica in enumerate(fleet.replicas):
        lines = [
            line[:240]
            for line in replica.output().splitlines()
            if (" WARNING " in line or " ERROR " in line) and "auth.enabled" not in line
        ]
        parts.append(f"replica {index}: {len(lines)} warnings, last: {lines[-last:]}")
    return "; ".join(parts)


def _count(statuses: Any) -> dict[int, int]:
    counts: dict[int, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))


async def set_behaviour(upstream: Process, **behaviour: float) -> None:
    """Change the running simulator's behaviour (``/__sim/behaviour``)."""
    async with (
        ClientSession() as session,
        session.post(upstream.url + "/__sim/behaviour", json=behaviour) as response,
    ):
        assert response.status == 200, await response.text()
