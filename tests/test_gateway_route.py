"""The drop-in route end to end: caller -> gateway -> simulator, over real sockets."""

from __future__ import annotations

import json

from gateway import signing
from tests.conftest import (
    SIM,
    StartGateway,
    StartSimulator,
    Upstream,
    gateway_settings,
    signed_post,
)

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/3"
JSON = {"Content-Type": "application/json; charset=UTF-8"}


async def test_a_valid_query_returns_the_upstream_bytes_unchanged(
    upstream: Upstream, start_gateway: StartGateway, start_simulator: StartSimulator
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    body = b'{"pageNum": 1, "pageSize": 20, "showDetail": 1}'
    response = await gateway.post(PATH, data=body, headers=JSON)
    got = await response.read()

    reference = await start_simulator()  # same seed, same data: a second, untouched copy
    canonical = b'{"pageSize":20,"pageNum":1,"showDetail":1}'
    assert got == await signed_post(reference, PATH, canonical)
    assert response.status == 200
    assert response.headers["X-Cache"] == "MISS"
    assert json.loads(got)["resultCode"] == "0200000"


async def test_the_upstream_sees_a_correctly_signed_request_without_caller_secrets(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    await gateway.post(PATH, json={"pageSize": 5}, headers={"Authorization": "caller-token"})
    (seen,) = upstream.state.received
    reason = signing.verify(
        seen.headers.get("authorization"),
        credentials={SIM.ak: SIM.sk},
        now=upstream.state.clock.time(),
        max_skew=60,
        method="POST",
        path=seen.path,
        headers=seen.headers,
        body=seen.body,
    )
    assert reason is None
    assert seen.path == PATH
    assert seen.body == b'{"pageSize":5,"showDetail":0}'
    assert "caller-token" not in json.dumps(seen.headers)
    assert upstream.state.auth_failures == 0


async def test_wrong_credentials_give_the_caller_a_clear_gateway_error(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    settings = gateway_settings(upstream.url, upstream__sk="not-the-secret")
    gateway = await start_gateway(settings)
    response = await gateway.post(PATH, json={"pageSize": 5}, headers=JSON)
    body = await response.json()
    assert response.status == 502
    assert body["resultCode"] == "GW50202"
    assert "credentials" in body["resultDesc"]
    assert "not-the-secret" not in json.dumps(body)
    assert upstream.state.auth_failures == 1


async def test_every_response_carries_a_request_id_taken_from_the_caller_or_made(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    given = await gateway.post(PATH, json={}, headers={"X-Request-ID": "abc-123"})
    made = await gateway.get("/healthz")
    hostile = await gateway.get("/healthz", headers={"X-Request-ID": "x" * 500})
    assert given.headers["X-Request-ID"] == "abc-123"
    assert len(made.headers["X-Request-ID"]) == 32
    assert hostile.headers["X-Request-ID"] != "x" * 500


async def test_a_body_in_a_declared_charset_reaches_the_vendor_as_the_same_text_in_utf8(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    body = '{"sessionId": "中文", "pageSize": 5}'.encode("gbk")
    answer = await gateway.post(
        "/rest/isales/v1/openapi/campaigns/11/callresult/3",
        data=body,
        headers={"Content-Type": "application/json; charset=GBK"},
    )
    assert answer.status == 200
    sent = upstream.state.received[-1].body
    assert json.loads(sent.decode("utf-8"))["sessionId"] == "中文"
