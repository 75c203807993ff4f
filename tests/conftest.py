"""Shared fixtures: a private redis-server, the simulator over a real socket, gateway builders."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient, TestServer
from aiohttp.web_runner import BaseRunner
from prometheus_client import CollectorRegistry

from gateway import signing
from gateway.app import create_app
from gateway.clock import ManualClock
from gateway.front import GatewayRunner
from gateway.settings import Settings, load_settings
from gateway.simulator import SIM_STATE, SimulatorConfig, create_simulator_app
from gateway.simulator.state import SimulatorState
from tests.support.processes import Process, RedisServer

SIM = SimulatorConfig()  # the defaults: AK/SK the gateway builders use


@pytest.fixture(autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Stop every gateway or simulator process a test started and did not stop."""
    yield
    Process.stop_all()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client of the private server, emptied before each test."""
    redis_server.flush()
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


class Upstream:
    """A running simulator: its base URL and its in-process state (counters, received)."""

    def __init__(self, server: TestServer) -> None:
        self.server = server

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def state(self) -> SimulatorState:
        return self.server.app[SIM_STATE]

    @property
    def requests(self) -> int:
        return self.state.requests_total


async def signed_post(upstream: Upstream, path: str, body: bytes) -> bytes:
    """What a simulator itself answers for a correctly signed request: the reference bytes."""
    host = upstream.url.removeprefix("http://")
    headers = {"host": host, "content-type": "application/json"}
    headers["authorization"] = signing.authorization(
        ak=SIM.ak,
        sk=SIM.sk,
        timestamp=signing.format_timestamp(upstream.state.clock.time()),
        method="POST",
        path=path,
        headers={"host": host},
        body=body,
    )
    async with (
        ClientSession() as session,
        session.post(upstream.url + path, data=body, headers=headers) as response,
    ):
        assert response.status == 200
        return await response.read()


StartSimulator = Callable[..., Awaitable[Upstream]]


class SimulatorServer(TestServer):
    """A test server that, as at the vendor, lets a request whose client hung up run on
    (aiohttp's test servers cancel it), unless the simulator is told to abort on hang-up.
    """

    def __init__(self, app: web.Application, abort_on_hangup: bool) -> None:
        super().__init__(app, host="127.0.0.1")
        self._abort = abort_on_hangup

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return await super()._make_runner(**{**kwargs, "handler_cancellation": self._abort})


@pytest.fixture
async def start_simulator() -> AsyncIterator[StartSimulator]:
    """Start simulators on real sockets: ``await start_simulator(latency_ms=200)``."""
    servers: list[TestServer] = []

    async def start(**overrides: Any) -> Upstream:
        config = SimulatorConfig(**overrides)
        server = SimulatorServer(create_simulator_app(config), config.abort_on_hangup)
        await server.start_server()
        servers.append(server)
        return Upstream(server)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def upstream(start_simulator: StartSimulator) -> Upstream:
    return await start_simulator()


def gateway_settings(upstream_url: str, **env: str | int | float) -> Settings:
    """Settings as an operator would give them, through the environment overrides."""
    environ = {
        "GATEWAY_UPSTREAM__URL": upstream_url,
        "GATEWAY_UPSTREAM__AK": SIM.ak,
        "GATEWAY_UPSTREAM__SK": SIM.sk,
        "GATEWAY_UPSTREAM__ALLOW_HTTP": "true",
        "GATEWAY_AUTH__ENABLED": "false",  # tests of caller keys switch it on
    }
    environ.update({f"GATEWAY_{k.upper()}": str(v) for k, v in env.items()})
    return load_settings(None, environ)


StartGateway = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def clock() -> ManualClock:
    """A manual clock started at the real time: the signatures it stamps look fresh to the
    simulator, and the gateway's own time moves only when a test advances it."""
    return ManualClock(start=time.time())


class GatewayServer(TestServer):
    """A test server that serves the gateway as ``serve`` does: through the front door."""

    def __init__(self, app: web.Application) -> None:
        super().__init__(app, host="127.0.0.1")

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return GatewayRunner(self.app, **{**kwargs, "access_log": None})


@pytest.fixture
async def start_gateway() -> AsyncIterator[StartGateway]:
    """Start gateways on real sockets: ``await start_gateway(settings, clock=...)``."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(settings: Settings, **parts: Any) -> TestClient[web.Request, web.Application]:
        parts.setdefault("registry", CollectorRegistry())
        client = TestClient(GatewayServer(create_app(settings, **parts)))
        await client.start_server()
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
