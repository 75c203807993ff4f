"""/readyz tells the truth from the first second: Redis, the fleet limiter, the breaker."""

from __future__ import annotations

from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.breaker import CircuitBreaker
from gateway.clock import ManualClock
from gateway.health import readiness
from gateway.limiter import LimitConfig
from gateway.limiter.memory import InMemoryLimiter
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.fleet import path
from tests.support.processes import RedisServer, free_port
from tests.support.waiting import until


def limiter() -> InMemoryLimiter:
    limit = LimitConfig(max_concurrent=1, window_s=1, max_queue=1, max_wait_s=1)
    return InMemoryLimiter(limit, clock=ManualClock())


def test_readiness_is_503_only_while_starting_or_draining() -> None:
    def status(**given: bool) -> int:
        flags = {"started": True, "draining": False} | given
        code, _ = readiness(
            **flags, mode="embedded", redis_up=None, limiter=limiter(), breaker=None, callers=0
        )
        return code

    assert status() == 200
    assert status(started=False) == 503
    assert status(draining=True) == 503


def test_an_open_breaker_and_an_unreachable_redis_are_degraded_not_unready() -> None:
    clock = ManualClock()
    breaker = CircuitBreaker(failures=1, open_s=10, clock=clock)
    breaker.failure()
    code, body = readiness(
        started=True,
        draining=False,
        mode="redis",
        redis_up=False,
        limiter=limiter(),
        breaker=breaker,
        callers=None,
    )

    assert code == 200
    assert body["degraded"] == ["redis", "upstream"]
    assert body["redis"] == {"reachable": False, "limiter": None}
    assert body["upstream"] == {"breaker": "open"}


Gateway = TestClient[web.Request, web.Application]


async def degraded_gauge(gateway: Gateway) -> float | None:
    response = await gateway.get("/metrics")
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            if sample.name == "isales_gateway_degraded":
                return float(sample.value)
    return None


async def test_with_redis_down_at_start_up_readyz_and_the_gauge_say_so_before_any_request(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    nothing_there = f"redis://127.0.0.1:{free_port()}/0"
    gateway = await start_gateway(gateway_settings(upstream.url, redis__url=nothing_there))

    ready = await gateway.get("/readyz")
    body = await ready.json()
    assert ready.status == 200
    assert body["degraded"] == ["redis"]
    # The limiter claims its membership at start-up: it knows at once it is on its share.
    assert body["redis"] == {"reachable": False, "limiter": "fallback"}

    async def degraded_is_set() -> bool:  # by the start-up probe: no request touched the limiter
        return await degraded_gauge(gateway) == 1

    await until(degraded_is_set, every=0.02)
    assert upstream.requests == 0


async def test_with_redis_up_readyz_is_ready_and_not_degraded(
    upstream: Upstream, start_gateway: StartGateway, redis_server: RedisServer
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url, redis__url=redis_server.url))

    body = await (await gateway.get("/readyz")).json()
    assert body["status"] == "ready"
    assert body["degraded"] == []
    assert body["redis"] == {"reachable": True, "limiter": "global"}
    assert body["upstream"] == {"breaker": "closed"}
    assert await degraded_gauge(gateway) == 0


async def test_readyz_shows_the_breaker_open_after_the_upstream_failed(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    settings = gateway_settings(upstream.url, upstream__retries=0, upstream__breaker_failures=1)
    gateway = await start_gateway(settings)
    async with (
        ClientSession() as session,
        session.post(upstream.url + "/__sim/behaviour", json={"error_rate": 1.0}) as changed,
    ):
        assert changed.status == 200
    assert (await gateway.post(path(3), json={})).status == 502

    response = await gateway.get("/readyz")
    body = await response.json()
    assert response.status == 200
    assert body["degraded"] == ["upstream"]
    assert body["upstream"] == {"breaker": "open"}
    assert body["redis"] is None
