"""Starts count from when the request is sent, as the vendor counts them on arrival.

A stall between the grant and the send (here: each new connection's set-up takes 0.3 s, as a
slow TLS handshake would, longer than the 0.1 s margin) must not bunch starts up at the vendor.
The simulator runs in a process of its own, so its clock on arrival is independent of ours.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.breaker import CircuitBreaker
from gateway.clock import SystemClock
from gateway.errors import PermitLost, UpstreamUnavailable
from gateway.limiter import ANONYMOUS, FleetTimings, LimitConfig, Limiter, LimiterSnapshot, Permit
from gateway.limiter.failover import FailoverLimiter
from gateway.limiter.memory import InMemoryLimiter
from gateway.metrics import GatewayMetrics
from gateway.upstream import UpstreamClient, send_trace
from gateway.upstream_call import RetryPolicy, UpstreamCaller
from gateway.validation import parse_request
from tests.conftest import StartGateway, StartSimulator, gateway_settings
from tests.support.fleet import sim_stats, start_simulator_process
from tests.support.processes import Process, free_port

SIM_WINDOW_S, MARGIN_S, STALL_S = 0.3, 0.1, 0.3
JSON = {"Content-Type": "application/json; charset=UTF-8"}


@pytest.fixture
def simulator() -> Iterator[Process]:
    upstream = start_simulator_process("--window-ms", str(SIM_WINDOW_S * 1000))
    yield upstream
    upstream.stop()


@pytest.fixture(params=["memory", "failover"])
async def limiter(
    request: pytest.FixtureRequest, redis_client: aioredis.Redis
) -> AsyncIterator[Limiter]:
    """The gateway's limiters: embedded, and over Redis (global, with its local fallback)."""
    limit = LimitConfig(
        max_concurrent=10, window_s=SIM_WINDOW_S + MARGIN_S, max_queue=100, max_wait_s=10.0
    )
    if request.param == "memory":
        yield InMemoryLimiter(limit, clock=SystemClock())
        return
    failover = FailoverLimiter(redis_client, limit, FleetTimings(lease_s=5.0), clock=SystemClock())
    yield failover
    await failover.close()


def slow_connection_set_up() -> aiohttp.TraceConfig:
    """Each new connection takes ``STALL_S`` to set up; a reused one goes at once."""

    async def stall(
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceConnectionCreateStartParams,
    ) -> None:
        await asyncio.sleep(STALL_S)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_start.append(stall)
    return trace


async def test_starts_delayed_past_the_margin_after_their_grant_stay_within_the_vendors_limit(
    simulator: Process, limiter: Limiter
) -> None:
    settings = gateway_settings(simulator.url)
    clock = SystemClock()
    metrics = GatewayMetrics(CollectorRegistry())
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=20),
        trace_configs=[send_trace(), slow_connection_set_up()],
    ) as session:
        caller = UpstreamCaller(
            upstream=UpstreamClient(settings.upstream, settings.upstream_host, session, clock),
            limiter=limiter,
            breaker=CircuitBreaker(failures=100, open_s=1.0, clock=clock),
            policy=RetryPolicy(retries=0),
            metrics=metrics,
            clock=clock,
        )
        # Ten grants at once go out 0.3 s later on new connections; the next ten, granted a
        # window (+ margin) after those grants, would reuse the connections and go at once.
        queries = [parse_request("11", str(c), b'{"pageSize":10}') for c in range(1, 21)]
        answers = await asyncio.gather(*(caller.call(query, None) for query in queries))
    stats = await sim_stats(simulator)
    assert [code for _, code in answers] == ["0200000"] * 20
    assert stats["requests_total"] == 20
    assert stats["violations"] == 0
    assert stats["max_starts_in_window"] == 10
    assert limiter.snapshot() == LimiterSnapshot(in_flight=0, queued=0)


@dataclass
class NotingPermit:
    """A permit that notes in ``flags[index]`` that it was told its request went out, and
    that, if ``lapse_at_check`` says so, lapses at that call of ``check`` (as a permit does
    whose holder froze past its lease)."""

    inner: Permit
    flags: list[bool]
    index: int
    lapse_at_check: int = 0
    checks: int = 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.lapse_at_check:
            raise PermitLost("frozen past its lease")
        self.inner.check()

    async def sent(self) -> None:
        self.flags[self.index] = True
        await self.inner.sent()


def embedded(max_wait_s: float) -> InMemoryLimiter:
    limit = LimitConfig(max_concurrent=10, window_s=1.1, max_queue=10, max_wait_s=max_wait_s)
    return InMemoryLimiter(limit, clock=SystemClock())


class SendWatchingLimiter:
    """The embedded limiter, noting for each permit whether its request went out."""

    def __init__(self, inner: InMemoryLimiter, lapse_first_at_check: int = 0) -> None:
        self.inner = inner
        self.sent: list[bool] = []
        self.lapse_first_at_check = lapse_first_at_check

    @asynccontextmanager
    async def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AsyncIterator[Permit]:
        async with self.inner.permit(caller, background=background) as permit:
            self.sent.append(False)
            lapse = self.lapse_first_at_check if len(self.sent) == 1 else 0
            yield NotingPermit(permit, self.sent, len(self.sent) - 1, lapse)

    def snapshot(self) -> LimiterSnapshot:
        return self.inner.snapshot()

    def start(self) -> None:
        self.inner.start()

    def shed(self) -> None:
        self.inner.shed()

    async def close(self) -> None:
        await self.inner.close()


async def test_a_request_that_never_reached_the_upstream_is_not_marked_sent(
    start_gateway: StartGateway,
) -> None:
    # The app's upstream session carries the send trace: a connection refused before any byte
    # went out leaves the permit unsent (its start then counts from its release).
    settings = gateway_settings(f"http://127.0.0.1:{free_port()}", upstream__retries=0)
    watching = SendWatchingLimiter(embedded(max_wait_s=1.0))
    gateway = await start_gateway(settings, limiter=watching)
    response = await gateway.post(
        "/rest/isales/v1/openapi/campaigns/11/callresult/5", data=b"{}", headers=JSON
    )
    assert response.status == UpstreamUnavailable.status
    assert watching.sent == [False]


async def test_a_permit_found_lapsed_on_the_ready_connection_sends_nothing_and_is_taken_afresh(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    # The permit passes its check before the fetch, then the holder "freezes" while the
    # connection is set up: checked again on the ready connection, it has lapsed.
    upstream = await start_simulator()
    watching = SendWatchingLimiter(embedded(max_wait_s=5.0), lapse_first_at_check=2)
    gateway = await start_gateway(gateway_settings(upstream.url), limiter=watching)
    response = await gateway.post(
        "/rest/isales/v1/openapi/campaigns/11/callresult/5", data=b"{}", headers=JSON
    )
    assert response.status == 200
    assert watching.sent == [False, True]  # the lapsed one never went out; a fresh one did
    assert upstream.requests == 1


VENDOR_OK = (
    b'{"resultCode":"0200000","resultDesc":"ok","returnCode":"0200000","returnDesc":"ok",'
    b'"totalCount":0,"data":[]}'
)


class WireClock(threading.Thread):
    """A one-request HTTP server in a thread: notes (``time.monotonic``) when the request's
    first bytes reach it, whatever the test's event loop is doing, then answers 200."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.arrived = 0.0

    def run(self) -> None:
        connection, _ = self.listener.accept()
        with connection, self.listener:
            request = connection.recv(65536)
            self.arrived = time.monotonic()
            head, _, body = request.partition(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":", 1)[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            while len(body) < length:
                body += connection.recv(65536)
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json;charset=UTF-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(VENDOR_OK), VENDOR_OK)
            )


async def test_a_start_is_counted_in_the_loop_step_that_writes_the_request() -> None:
    # aiohttp fires on_request_headers_sent as it buffers the headers; on Python 3.11 they go
    # out with the body from a task that runs on a later loop pass. Here the loop stalls for
    # STALL right after the permit hears "sent": counted at the headers, the request would
    # leave after the stall (a start counted earlier than the vendor sees it); counted at the
    # write, it has left before.
    stall = 1.0
    wire = WireClock()
    wire.start()
    settings = gateway_settings(f"http://127.0.0.1:{wire.port}")
    clock = SystemClock()
    told: list[float] = []

    async def on_sent() -> None:
        told.append(time.monotonic())
        asyncio.get_running_loop().call_soon(time.sleep, stall)  # the loop's next pass stalls

    async with aiohttp.ClientSession(trace_configs=[send_trace()]) as session:
        client = UpstreamClient(settings.upstream, settings.upstream_host, session, clock)
        query = parse_request("11", "1", b'{"pageSize":10}')
        answer = await client.fetch(query, on_sent=on_sent)
    wire.join(timeout=10)
    assert answer.status == 200
    assert len(told) == 1, "told once per request"
    assert wire.arrived - told[0] < stall, "the request left before the loop stalled"
