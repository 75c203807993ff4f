"""Callers and the admin key change without a restart: SIGHUP, a file edit, a ConfigMap swap."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable
from pathlib import Path

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import key_digest
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.fleet import JSON, gateway_environ, path, start_simulator_process
from tests.support.processes import Process, free_port
from tests.support.waiting import until

OLD_KEY = "old-caller-key-0123456789"
NEW_KEY = "new-caller-key-0123456789"
ADMIN_OLD = "admin-key-one-0123456789"
ADMIN_NEW = "admin-key-two-0123456789"


def callers_toml(*keys: str) -> str:
    return "".join(
        f'[[callers]]\nname = "c{n}"\nkey_sha256 = "{key_digest(key)}"\nvdn_ids = ["*"]\n\n'
        for n, key in enumerate(keys)
    )


def config_toml(callers_file: Path, admin_key: str) -> str:
    return (
        f'[auth]\ncallers_file = "{callers_file}"\nreload_interval_s = 0.0\n\n'
        f'[admin]\nkey_sha256 = "{key_digest(admin_key)}"\n'
    )


async def reloads(url: str, result: str) -> float:
    async with ClientSession() as session, session.get(url + "/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "isales_gateway_config_reloads_total" and (
                sample.labels["result"] == result
            ):
                return sample.value
    raise AssertionError("no isales_gateway_config_reloads_total series")


async def status_with(url: str, key: str, route: str = path(3)) -> int:
    async with ClientSession() as session:
        if route.startswith("/admin"):
            async with session.get(url + route, headers={"X-API-Key": key}) as response:
                return response.status
        async with session.post(url + route, data=b"{}", headers={**JSON, "X-API-Key": key}) as r:
            return r.status


@pytest.mark.timeout(90)
async def test_sighup_reloads_callers_and_admin_key_keeps_them_on_a_bad_file_and_never_stops(
    tmp_path: Path,
) -> None:
    callers = tmp_path / "callers.toml"
    callers.write_text(callers_toml(OLD_KEY))
    config = tmp_path / "gateway.toml"
    config.write_text(config_toml(callers, ADMIN_OLD))
    upstream = start_simulator_process()
    port = free_port()
    gateway = Process(
        ["serve", "--config", str(config)], port, env=gateway_environ(port, upstream.url)
    )
    try:
        assert await status_with(gateway.url, OLD_KEY) == 200
        assert await status_with(gateway.url, NEW_KEY) == 401

        callers.write_text(callers_toml(OLD_KEY, NEW_KEY))
        config.write_text(config_toml(callers, ADMIN_NEW))
        gateway.signal(signal.SIGHUP)
        await until(
            lambda: _is(status_with(gateway.url, NEW_KEY), 200), "the new key works", every=0.05
        )
        assert await status_with(gateway.url, ADMIN_NEW, "/admin/stats") == 200
        assert await status_with(gateway.url, ADMIN_OLD, "/admin/stats") == 403

        callers.write_text("[[callers]]\nname = 'broken'\n")
        gateway.signal(signal.SIGHUP)
        await until(
            lambda: _at_least(reloads(gateway.url, "failure"), 1), "a failed reload", every=0.05
        )
        assert await status_with(gateway.url, NEW_KEY) == 200, "the keys in force stay"
        assert await reloads(gateway.url, "success") == 1
        assert gateway.proc.poll() is None, "SIGHUP never stops the gateway"
        assert "keeping the keys in force" in gateway.output()
        assert "callers[0]" in gateway.output(), "the log says what is wrong"
    finally:
        gateway.stop()
        upstream.stop()


async def _is(status: Awaitable[int], expected: int) -> bool:
    return await status == expected


async def _at_least(value: Awaitable[float], minimum: float) -> bool:
    return await value >= minimum


def configmap_volume(root: Path, content: str, version: str) -> None:
    """What the kubelet does on a ConfigMap update: a new timestamped directory, then the
    ``..data`` symlink swapped to it atomically; ``callers.toml`` links through ``..data``."""
    (root / version).mkdir()
    (root / version / "callers.toml").write_text(content)
    swap = root / "..data_tmp"
    swap.symlink_to(version)
    os.replace(swap, root / "..data")
    if not (root / "callers.toml").is_symlink():
        (root / "callers.toml").symlink_to("..data/callers.toml")


async def test_a_configmap_symlink_swap_reloads_the_callers_and_a_bad_one_keeps_them(
    tmp_path: Path, upstream: Upstream, start_gateway: StartGateway
) -> None:
    configmap_volume(tmp_path, callers_toml(OLD_KEY), "..2026_12_01_05_00_00.1")
    settings = gateway_settings(
        upstream.url,
        auth__enabled="true",
        auth__callers_file=str(tmp_path / "callers.toml"),
        auth__reload_interval_s=0.05,
    )
    gateway = await start_gateway(settings)

    async def status(key: str) -> int:
        response = await gateway.post(path(3), json={}, headers={"X-API-Key": key})
        return response.status

    async def failures() -> float:
        return await metric(gateway, "isales_gateway_config_reloads_total", result="failure")

    assert await status(NEW_KEY) == 401
    configmap_volume(tmp_path, callers_toml(NEW_KEY), "..2026_12_01_05_01_00.2")
    await until(lambda: _is(status(NEW_KEY), 200), "the swapped-in key works", every=0.05)
    assert await status(OLD_KEY) == 401, "the swapped-out key no longer does"
    assert await metric(gateway, "isales_gateway_callers") == 1

    configmap_volume(tmp_path, "not toml [", "..2026_12_01_05_02_00.3")
    await until(lambda: _at_least(failures(), 1), "the bad file is noticed", every=0.05)
    assert await status(NEW_KEY) == 200


async def metric(
    gateway: TestClient[web.Request, web.Application], name: str, **labels: str
) -> float:
    text = await (await gateway.get("/metrics")).text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise AssertionError(f"no {name} {labels}")


@pytest.mark.timeout(90)
async def test_a_running_gateway_process_picks_up_a_configmap_swap_without_a_signal(
    tmp_path: Path,
) -> None:
    configmap_volume(tmp_path, callers_toml(OLD_KEY), "..2026_12_01_06_00_00.1")
    upstream = start_simulator_process()
    port = free_port()
    env = gateway_environ(
        port,
        upstream.url,
        auth__callers_file=str(tmp_path / "callers.toml"),
        auth__reload_interval_s="0.1",
    )
    gateway = Process(["serve"], port, env=env)
    try:
        assert await status_with(gateway.url, NEW_KEY) == 401
        configmap_volume(tmp_path, callers_toml(NEW_KEY), "..2026_12_01_06_01_00.2")
        await until(
            lambda: _is(status_with(gateway.url, NEW_KEY), 200), "the swapped-in key", every=0.05
        )
        assert await status_with(gateway.url, OLD_KEY) == 401
        assert await reloads(gateway.url, "success") >= 1
    finally:
        gateway.stop()
        upstream.stop()
