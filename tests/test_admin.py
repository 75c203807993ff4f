"""The admin purge endpoint: one campaign's cached answers go, nothing else; admins only."""

from __future__ import annotations

from gateway.auth import bearer, key_digest
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.fleet import path

ADMIN_KEY = "s3cret-admin-key"


def test_only_a_bearer_token_is_taken_from_the_authorization_header() -> None:
    assert bearer("Bearer abc") == "abc"
    assert bearer("bearer  abc ") == "abc"
    assert bearer("Basic abc") is None
    assert bearer("Bearer ") is None
    assert bearer(None) is None


async def test_purge_removes_one_campaigns_entries_and_nothing_else(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    # Campaign 3 belongs to VDN 11: VDN 1 gets "does not exist", cached here for a minute.
    settings = gateway_settings(
        upstream.url, admin__key_sha256=key_digest(ADMIN_KEY), cache__negative_ttl_s=60
    )
    gateway = await start_gateway(settings)
    kept = [path(30), path(3, vdn=1), path(13)]
    for p in [path(3), *kept]:
        await gateway.post(p, json={"pageSize": 5})
        await gateway.post(p, json={"pageSize": 6})

    purge = await gateway.delete(
        "/admin/cache/campaigns/11/3", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    )
    assert purge.status == 200
    assert (await purge.json())["purged"] == 2
    after = await gateway.post(path(3), json={"pageSize": 5})
    assert after.headers["X-Cache"] == "MISS"
    for p in kept:
        assert (await gateway.post(p, json={"pageSize": 5})).headers["X-Cache"] == "HIT", p


async def test_purge_without_the_admin_key_is_refused(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    settings = gateway_settings(upstream.url, admin__key_sha256=key_digest(ADMIN_KEY))
    gateway = await start_gateway(settings)
    missing = await gateway.delete("/admin/cache/campaigns/11/3")
    wrong = await gateway.delete(
        "/admin/cache/campaigns/11/3", headers={"Authorization": "Bearer guess"}
    )
    assert (missing.status, (await missing.json())["resultCode"]) == (401, "GW40100")
    assert (wrong.status, (await wrong.json())["resultCode"]) == (403, "GW40300")
    assert ADMIN_KEY not in await wrong.text()


async def test_with_no_admin_key_configured_nobody_may_purge(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    response = await gateway.delete(
        "/admin/cache/campaigns/11/3", headers={"Authorization": "Bearer anything"}
    )
    assert response.status == 403


async def test_admin_config_shows_the_effective_settings_with_secrets_redacted(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    settings = gateway_settings(
        upstream.url,
        admin__key_sha256=key_digest(ADMIN_KEY),
        upstream__proxy="http://user:pw-secret@proxy.example:3128",
    )
    gateway = await start_gateway(settings)
    response = await gateway.get("/admin/config", headers={"X-API-Key": ADMIN_KEY})
    text = await response.text()
    config = await response.json()

    assert response.status == 200
    assert config["upstream"]["url"] == upstream.url
    assert config["upstream"]["sk"] == "***"
    assert config["limit"]["max_concurrent"] == 10
    assert settings.upstream.sk not in text
    assert "pw-secret" not in text


async def test_admin_stats_counts_cache_entries_and_permits(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(
        gateway_settings(upstream.url, admin__key_sha256=key_digest(ADMIN_KEY))
    )
    await gateway.post(path(3), json={"pageSize": 5})
    await gateway.post(path(4), json={"pageSize": 5})
    response = await gateway.get("/admin/stats", headers={"X-API-Key": ADMIN_KEY})
    stats = await response.json()

    assert response.status == 200
    assert stats["cache"] == {"enabled": True, "entries": 2}
    assert stats["limiter"] == {"in_flight": 0, "queued": 0}
    assert stats["upstream"] == {"breaker": "closed"}


async def test_admin_config_and_stats_need_the_admin_key(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(
        gateway_settings(upstream.url, admin__key_sha256=key_digest(ADMIN_KEY))
    )
    for route in ("/admin/config", "/admin/stats"):
        assert (await gateway.get(route)).status == 401
        assert (await gateway.get(route, headers={"X-API-Key": "guess"})).status == 403
