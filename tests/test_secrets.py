"""No secret leaves the gateway: not in logs, metrics, error bodies, /readyz, Redis or upstream."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.auth import key_digest
from gateway.logs import JsonFormatter
from tests.conftest import StartGateway, StartSimulator, gateway_settings
from tests.support.processes import RedisServer

SK = "SK-do-not-leak-9f8e7d"
CALLER_KEY = "caller-key-do-not-leak-1a2b3c"
ADMIN_KEY = "admin-key-do-not-leak-4d5e6f"
SECRETS = (SK, CALLER_KEY, ADMIN_KEY)
PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/3"


async def test_a_full_run_leaks_neither_the_sk_nor_any_api_key(
    start_simulator: StartSimulator,
    start_gateway: StartGateway,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_server.flush()
    callers = tmp_path / "callers.toml"
    callers.write_text(
        f'[[callers]]\nname = "svc"\nkey_sha256 = "{key_digest(CALLER_KEY)}"\nvdn_ids = [11]\n'
    )
    upstream = await start_simulator(sk=SK)
    common = {
        "auth__enabled": "true",
        "auth__callers_file": str(callers),
        "admin__key_sha256": key_digest(ADMIN_KEY),
        "redis__url": redis_server.url,
        "upstream__retries": "0",
    }
    good = await start_gateway(gateway_settings(upstream.url, upstream__sk=SK, **common))
    # Same settings but a wrong SK: the upstream refuses it, and the error must not quote it.
    bad = await start_gateway(gateway_settings(upstream.url, upstream__sk=SK + "x", **common))
    seen: list[str] = []
    me = {"X-API-Key": CALLER_KEY}
    with caplog.at_level(logging.DEBUG):
        for gateway in (good, bad):
            for headers in (me, {"X-API-Key": CALLER_KEY + "x"}, {}):
                for p in (PATH, PATH.replace("/11/", "/12/"), PATH + "x"):
                    response = await gateway.post(p, json={"pageSize": 5}, headers=headers)
                    seen += [await response.text(), str(dict(response.headers))]
            for p in ("/metrics", "/readyz", "/healthz"):
                seen.append(await (await gateway.get(p)).text())
            purge = await gateway.delete(
                "/admin/cache/campaigns/11/3", headers={"X-API-Key": ADMIN_KEY}
            )
            seen.append(await purge.text())
            refused = await gateway.delete(
                "/admin/cache/campaigns/11/3", headers={"X-API-Key": ADMIN_KEY + "x"}
            )
            seen.append(await refused.text())
        await good.post(PATH, json={"pageSize": 7}, headers=me)  # leave an entry in Redis

    formatter = JsonFormatter()
    seen += [formatter.format(record) for record in caplog.records]
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        keys = [key async for key in client.scan_iter()]
        assert any(b"isales:v1" in key for key in keys), "the run stored cache entries"
        for key in keys:
            seen.append(repr(key))
            if await client.type(key) == b"string":
                seen.append(repr(await client.get(key)))
    finally:
        await client.aclose()
    for request in upstream.state.received:
        seen.append(repr(request.headers) + repr(request.body))

    assert any("GW50202" in text for text in seen), "the wrong-SK path was exercised"
    assert len(caplog.records) > 10
    for secret in SECRETS:
        leaks = [text for text in seen if secret in text]
        assert leaks == [], f"{secret} leaked: {leaks[0][:300]}"
