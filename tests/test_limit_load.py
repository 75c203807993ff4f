"""The upstream limit under load: what the simulator measured on its own clock, on arrival."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.simulator.dataset import RUNNING_EVERY
from gateway.validation import parse_request
from tests.conftest import StartGateway, StartSimulator, gateway_settings, signed_post
from tests.support.fleet import sim_stats, start_simulator_process

JSON = {"Content-Type": "application/json; charset=UTF-8"}


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_300_concurrent_distinct_queries_never_exceed_the_upstream_limit(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    # A process of its own: its observer's clock must not share the gateway's event loop, or
    # a stall there would bunch arrivals up that reached its socket in time.
    upstream = start_simulator_process("--latency-ms", "200", "--enforce-limits")
    reference = await start_simulator()
    settings = gateway_settings(upstream.url, limit__max_queue=1000, limit__max_wait_ms=120_000)
    gateway = await start_gateway(settings)
    queries = [
        (f"/rest/isales/v1/openapi/campaigns/11/callresult/{c}", b'{"pageSize":10}')
        for c in range(1, 301)
    ]

    async def ask(path: str, body: bytes) -> tuple[int, bytes]:
        response = await gateway.post(path, data=body, headers=JSON)
        return response.status, await response.read()

    try:
        answers = await asyncio.gather(*(ask(path, body) for path, body in queries))
        stats = await sim_stats(upstream)
    finally:
        upstream.stop()

    assert stats["max_in_flight"] <= 10
    assert stats["max_starts_in_window"] <= 10
    assert stats["violations"] == 0
    assert stats["requests_total"] == 300
    for (path, body), (status, got) in zip(queries, answers, strict=True):
        campaign = path.rsplit("/", 1)[1]
        canonical = parse_request("11", campaign, body).body_bytes()
        assert status == 200
        expected = await signed_post(reference, path, canonical)
        if int(campaign) % RUNNING_EVERY:
            assert got == expected, path
        else:  # still dialling: its results grow with each simulator's own clock
            assert json.loads(got)["resultCode"] == "0200000", path
