"""A sick upstream (30% 5xx and some hangs): stale copies answer, the breaker opens and
closes, and the vendor's limit holds throughout."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import ClientSession

from tests.conftest import StartGateway, gateway_settings
from tests.support.fleet import path, sim_stats, start_simulator_process
from tests.support.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def behave(url: str, **behaviour: float) -> None:
    async with (
        ClientSession() as session,
        session.post(url + "/__sim/behaviour", json=behaviour) as response,
    ):
        assert response.status == 200


def breaker_state(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("isales_gateway_upstream_breaker_state "):
            return float(line.split()[1])
    raise AssertionError("no breaker gauge")


async def test_stale_copies_answer_a_flaky_upstream_and_the_breaker_opens_then_closes(
    start_gateway: StartGateway,
) -> None:
    upstream = start_simulator_process("--latency-ms", "50", "--enforce-limits", "--hang-s", "3")
    try:
        settings = gateway_settings(
            upstream.url,
            cache__ttl_open_s=1,
            cache__swr_s=0,
            upstream__timeout_ms=600,
            upstream__connect_timeout_ms=300,
            upstream__retries=1,
            upstream__retry_base_ms=20,
            upstream__breaker_failures=2,
            upstream__breaker_open_ms=500,
        )
        gateway = await start_gateway(settings)
        warm = [path(c) for c in range(1, 21)]
        for p in warm:
            assert (await gateway.post(p, json={})).status == 200
        await asyncio.sleep(1.1)  # every warm answer is stale now, none expired
        await behave(upstream.url, error_rate=0.3, timeout_rate=0.05)

        answers: list[tuple[str, int, str]] = []
        done = asyncio.Event()

        async def caller(n: int) -> None:
            while not done.is_set():
                p = warm[n % len(warm)]
                response = await gateway.post(p, json={})
                answers.append((p, response.status, response.headers.get("X-Cache", "")))
                n += 7

        async def breaker_open() -> bool:
            return breaker_state(await (await gateway.get("/metrics")).text()) == 2.0

        callers = [asyncio.ensure_future(caller(n)) for n in range(10)]
        try:
            await asyncio.sleep(4)  # the scenario: four seconds of a flaky upstream
            # Whether 30% failures ever come two in a row is chance; an upstream that fails
            # every call must open the breaker (threshold 2) while stale copies still answer.
            await behave(upstream.url, error_rate=1.0, timeout_rate=0.0)
            await until(breaker_open, "the breaker opened", every=0.05)
            flaky_then_down = len(answers)
            await until(lambda: len(answers) >= flaky_then_down + 20, "callers answered while open")
        finally:
            done.set()
            await asyncio.gather(*callers)
        assert {status for _, status, _ in answers} == {200}, "every warm query was answered"
        assert any(label == "STALE" for _, _, label in answers[:flaky_then_down])

        await behave(upstream.url, error_rate=0.0, timeout_rate=0.0)

        async def breaker_closed_after_a_call() -> bool:
            await gateway.post(path(99), json={})
            return breaker_state(await (await gateway.get("/metrics")).text()) == 0.0

        await until(breaker_closed_after_a_call, "the breaker closed", every=0.1)

        stats = await sim_stats(upstream)
        assert stats["violations"] == 0
        assert stats["max_in_flight"] <= 10  # type: ignore[operator]
    finally:
        upstream.stop()
