"""A call the gateway gave up on still counts at the vendor: a servlet container keeps working
on a request whose client hung up, so the permit is held ``upstream.abandoned_hold_ms`` longer.

The simulator runs with its realistic default (a hung-up request runs on and counts in
flight); the judge is what it saw: never two requests in flight with a limit of one.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.test_utils import TestClient

from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.fleet import JSON, path
from tests.support.waiting import until

HANG_S = 2.0  # longer than the window: the next start is allowed before it ends


async def hanging_vendor(
    start_simulator: StartSimulator, start_gateway: StartGateway, *, hold_ms: int, retries: int
) -> tuple[Upstream, TestClient[web.Request, web.Application]]:
    """A vendor that hangs on every request (and keeps working on it after a hang-up), behind a
    gateway of one permit that gives up after 200 ms and holds the permit ``hold_ms`` more."""
    upstream = await start_simulator(timeout_rate=1.0, hang_s=HANG_S)
    settings = gateway_settings(
        upstream.url,
        limit__max_concurrent=1,
        upstream__connect_timeout_ms=100,
        upstream__timeout_ms=200,
        upstream__abandoned_hold_ms=hold_ms,
        upstream__retries=retries,
    )
    return upstream, await start_gateway(settings)


async def test_a_request_whose_client_hung_up_keeps_running_at_the_simulator(
    start_simulator: StartSimulator,
) -> None:
    upstream = await start_simulator(timeout_rate=1.0, hang_s=HANG_S)
    async with ClientSession(timeout=ClientTimeout(total=0.2)) as session:
        with contextlib.suppress(TimeoutError):
            await session.post(upstream.url + path(1), data=b"{}", headers=JSON)
    server = upstream.server.runner.server  # aiohttp's, holding the simulator's connections
    assert server is not None
    # The simulator's side of the connection is closed (hung up on) ...
    await until(lambda: [h.transport for h in server.connections] == [None], "the hang-up seen")
    assert upstream.state.observer.in_flight == 1  # ... and the request still being worked on
    await until(lambda: upstream.state.observer.in_flight == 0, "the vendor's hang ends")


async def test_a_timed_out_call_keeps_its_permit_while_the_vendor_may_still_work_on_it(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream, gateway = await hanging_vendor(
        start_simulator, start_gateway, hold_ms=round(HANG_S * 1000) + 200, retries=1
    )
    answers = await asyncio.gather(
        *(gateway.post(path(campaign), data=b"{}", headers=JSON) for campaign in (1, 2))
    )
    assert [a.status for a in answers] == [504, 504]
    stats = upstream.state.stats()
    # Two callers, a retry each: four starts, one at a time at the vendor.
    assert stats["requests_total"] == 4
    assert stats["max_in_flight"] == 1
    assert stats["violations"] == 0


async def test_without_a_hold_the_vendor_would_see_the_next_call_on_top_of_the_abandoned_one(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    # The control: the same calls with no hold break the limit at the simulator, so the test
    # above measures the hold, not luck.
    upstream, gateway = await hanging_vendor(start_simulator, start_gateway, hold_ms=0, retries=0)
    for campaign in (1, 2):
        answer = await gateway.post(path(campaign), data=b"{}", headers=JSON)
        assert answer.status == 504
    assert upstream.state.stats()["max_in_flight"] == 2
