"""Corporate networks: upstream calls through upstream.proxy or HTTP(S)_PROXY, NO_PROXY honoured."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.fleet import path


class ForwardProxy:
    """A plain-http forward proxy that notes each request it relays."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.relay)
        self.server = TestServer(app, host="127.0.0.1")

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def relay(self, request: web.Request) -> web.Response:
        self.seen.append(str(request.url))
        headers = {k: v for k, v in request.headers.items() if k.lower() != "proxy-connection"}
        async with (
            ClientSession() as session,
            session.request(
                request.method,
                request.url,
                data=await request.read(),
                headers=headers,
            ) as answer,
        ):
            return web.Response(
                status=answer.status,
                body=await answer.read(),
                headers={"Content-Type": answer.headers["Content-Type"]},
            )


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    proxy = ForwardProxy()
    await proxy.server.start_server()
    yield proxy
    await proxy.server.close()


async def test_upstream_calls_go_through_the_configured_proxy(
    upstream: Upstream, start_gateway: StartGateway, proxy: ForwardProxy
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url, upstream__proxy=proxy.url))
    response = await gateway.post(path(3), json={})

    assert response.status == 200
    assert proxy.seen == [upstream.url + path(3)]
    assert upstream.requests == 1, "the signed request reached the vendor through the proxy"


async def test_http_proxy_from_the_environment_is_honoured_unless_no_proxy_names_the_host(
    upstream: Upstream,
    start_gateway: StartGateway,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    via_env = await start_gateway(gateway_settings(upstream.url))
    assert (await via_env.post(path(3), json={})).status == 200
    assert proxy.seen == [upstream.url + path(3)]

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    bypassing = await start_gateway(gateway_settings(upstream.url))
    assert (await bypassing.post(path(4), json={})).status == 200
    assert proxy.seen == [upstream.url + path(3)], "NO_PROXY: straight to the upstream"
    assert upstream.requests == 2
