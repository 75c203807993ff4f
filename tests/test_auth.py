"""Caller API keys: who may call at all, and which vdnIds each may read, cache included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.auth import Callers, key_digest, parse_callers
from gateway.errors import ConfigError, Forbidden, Unauthenticated
from tests.conftest import StartGateway, Upstream, gateway_settings

REPORTING_KEY = "reporting-key-0123456789"
DIALER_KEY = "vdn11-dialer-key-0123456789"


def callers_toml() -> str:
    return (
        f'[[callers]]\nname = "reporting"\nkey_sha256 = "{key_digest(REPORTING_KEY)}"\n'
        'vdn_ids = ["*"]\n\n'
        f'[[callers]]\nname = "dialer"\nkey_sha256 = "{key_digest(DIALER_KEY)}"\n'
        "vdn_ids = [11]\n"
    )


def route(vdn: int) -> str:
    return f"/rest/isales/v1/openapi/campaigns/{vdn}/callresult/3"


@pytest.fixture
def callers_file(tmp_path: Path) -> str:
    path = tmp_path / "callers.toml"
    path.write_text(callers_toml())
    return str(path)


def test_a_key_is_known_by_its_digest_and_limited_to_its_vdn_ids() -> None:
    callers = parse_callers(
        {
            "callers": [
                {"name": "a", "key_sha256": key_digest("ka"), "vdn_ids": [11]},
                {"name": "b", "key_sha256": key_digest("kb"), "vdn_ids": ["*"]},
            ]
        }
    )
    a = callers.authenticate("ka")
    assert a.name == "a"
    Callers.authorize(a, 11)
    with pytest.raises(Forbidden):
        Callers.authorize(a, 12)
    Callers.authorize(callers.authenticate("kb"), 9999)
    for bad in (None, "", "kc", key_digest("ka")):
        with pytest.raises(Unauthenticated):
            callers.authenticate(bad)


def test_a_callers_share_is_weight_one_without_caps_unless_the_file_says_otherwise() -> None:
    plain = {"name": "a", "key_sha256": key_digest("ka"), "vdn_ids": [11]}
    shared = {"name": "b", "key_sha256": key_digest("kb"), "vdn_ids": [11], "weight": 3}
    capped = {**shared, "name": "c", "key_sha256": key_digest("kc"), "weight": 0.5}
    capped.update(max_in_flight=2, max_queue=20)
    a, b, c = parse_callers({"callers": [plain, shared, capped]}).callers
    assert (a.weight, a.max_in_flight, a.max_queue) == (1.0, None, None)
    assert (b.weight, b.max_in_flight, b.max_queue) == (3.0, None, None)
    assert (c.weight, c.max_in_flight, c.max_queue) == (0.5, 2, 20)


@pytest.mark.parametrize(
    "entry",
    [
        {"name": "a", "key_sha256": "ABC", "vdn_ids": [11]},
        {"name": "a b", "key_sha256": "0" * 64, "vdn_ids": [11]},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": []},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [0]},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": ["11"]},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [True]},
        {"name": "a", "key_sha256": "0" * 64},
        {"name": "a", "key": "plain-text-key", "key_sha256": "0" * 64, "vdn_ids": [1]},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [1], "weight": 0},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [1], "weight": "3"},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [1], "weight": True},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [1], "max_in_flight": 0},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [1], "max_queue": -1},
        {"name": "a", "key_sha256": "0" * 64, "vdn_ids": [1], "max_queue": 1.5},
    ],
)
def test_a_malformed_caller_entry_is_a_config_error(entry: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_callers({"callers": [entry]})


async def test_missing_and_unknown_keys_get_401_and_cost_no_upstream_call(
    upstream: Upstream, start_gateway: StartGateway, callers_file: str
) -> None:
    settings = gateway_settings(upstream.url, auth__enabled="true", auth__callers_file=callers_file)
    gateway = await start_gateway(settings)
    vendor_style = {"Authorization": "auth-v2/ak/2024-10-31T14:06:52Z/host/abc"}
    for headers in ({}, {"X-API-Key": "guess"}, {"Authorization": "Bearer guess"}, vendor_style):
        response = await gateway.post(route(11), json={}, headers=headers)
        body = await response.json()
        assert (response.status, body["resultCode"]) == (401, "GW40100"), headers
        assert "guess" not in await response.text()
    assert upstream.requests == 0


async def test_a_key_allowed_only_vdn_11_cannot_read_vdn_12_not_even_from_the_cache(
    upstream: Upstream, start_gateway: StartGateway, callers_file: str
) -> None:
    settings = gateway_settings(upstream.url, auth__enabled="true", auth__callers_file=callers_file)
    gateway = await start_gateway(settings)
    cached = await gateway.post(route(12), json={}, headers={"X-API-Key": REPORTING_KEY})
    assert cached.status == 200
    denied = await gateway.post(route(12), json={}, headers={"X-API-Key": DIALER_KEY})
    assert (denied.status, (await denied.json())["resultCode"]) == (403, "GW40300")
    assert "X-Cache" not in denied.headers
    allowed = await gateway.post(
        route(11), json={}, headers={"Authorization": f"Bearer {DIALER_KEY}"}
    )
    assert allowed.status == 200
    assert upstream.requests == 2
