"""Logs: one JSON object per line (or readable text), the level honoured, request ids on lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import ClientSession

from gateway.logs import bind_request_id, reset_request_id, setup_logging
from tests.conftest import SIM, StartGateway, Upstream, gateway_settings
from tests.support.processes import Process, free_port

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/3"


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The root logger writing to a buffer through ``setup_logging``; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiohttp.access").level
    yield io.StringIO()
    root.handlers[:], level, access_level = saved
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def strict_json(line: str) -> dict[str, Any]:
    """``line`` parsed as JSON proper: NaN or Infinity literals are refused."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON: {line}")

    entry = json.loads(line, parse_constant=refuse)
    assert isinstance(entry, dict), line
    return entry


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [strict_json(line) for line in stream.getvalue().splitlines()]


def test_json_mode_writes_one_object_per_line_with_the_core_fields_and_every_extra(
    log_stream: io.StringIO,
) -> None:
    setup_logging("INFO", "json", stream=log_stream)
    log = logging.getLogger("gateway.test")
    log.info("two\nlines %s", "here", extra={"request_id": "r-1", "status": 200, "ms": 1.5})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"ratio": float("nan")})

    first, second = json_lines(log_stream)
    assert first["msg"] == "two\nlines here"
    assert first["level"] == "INFO"
    assert first["logger"] == "gateway.test"
    assert first["ts"].endswith("Z")
    assert {"request_id": "r-1", "status": 200, "ms": 1.5}.items() <= first.items()
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exc"]
    assert second["ratio"] == "nan"


def test_an_extra_field_never_replaces_a_core_field(log_stream: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=log_stream)
    logging.getLogger("gateway.test").warning("real", extra={"level": "fake", "ts": "fake"})

    (entry,) = json_lines(log_stream)
    assert entry["level"] == "WARNING"
    assert entry["ts"] != "fake"


def test_text_mode_is_one_readable_line_with_the_extras_as_key_value_pairs(
    log_stream: io.StringIO,
) -> None:
    setup_logging("INFO", "text", stream=log_stream)
    logging.getLogger("gateway.access").info(
        "POST /x 200 HIT 0.4ms", extra={"request_id": "r-2", "caller": "crm app", "status": 200}
    )

    (line,) = log_stream.getvalue().splitlines()
    assert " INFO    gateway.access POST /x 200 HIT 0.4ms " in line
    assert line.endswith('request_id=r-2 caller="crm app" status=200')


def test_the_configured_level_drops_the_lines_below_it(log_stream: io.StringIO) -> None:
    setup_logging("warning", "json", stream=log_stream)
    log = logging.getLogger("gateway.test")
    log.info("dropped")
    log.warning("kept")

    assert [entry["msg"] for entry in json_lines(log_stream)] == ["kept"]


def test_an_unknown_format_or_level_is_refused(log_stream: io.StringIO) -> None:
    with pytest.raises(ValueError, match="format"):
        setup_logging("INFO", "xml", stream=log_stream)
    with pytest.raises(ValueError, match="LOUD"):
        setup_logging("LOUD", "json", stream=log_stream)


def test_lines_logged_while_a_request_id_is_bound_carry_it(log_stream: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=log_stream)
    log = logging.getLogger("gateway.test")
    token = bind_request_id("bound-1")
    log.info("inside")
    log.info("explicit", extra={"request_id": "given"})
    reset_request_id(token)
    log.info("outside")

    inside, explicit, outside = json_lines(log_stream)
    assert inside["request_id"] == "bound-1"
    assert explicit["request_id"] == "given"
    assert "request_id" not in outside


async def test_every_log_line_of_a_request_is_json_and_carries_its_request_id(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "json", stream=log_stream)
    for request_id in ("req-logs-1", "req-logs-2"):
        response = await gateway.post(
            PATH, json={"pageSize": 5}, headers={"X-Request-ID": request_id}
        )
        assert response.status == 200

    lines = [entry for entry in json_lines(log_stream) if entry["logger"].startswith("gateway")]
    assert lines, "the gateway logged nothing for two requests"
    assert {entry.get("request_id") for entry in lines} == {"req-logs-1", "req-logs-2"}
    access = [entry for entry in lines if entry["logger"] == "gateway.access"]
    assert [entry["request_id"] for entry in access] == ["req-logs-1", "req-logs-2"]
    assert [entry["cache"] for entry in access] == ["MISS", "HIT"]
    for entry in access:
        assert entry["method"] == "POST"
        assert entry["path"] == PATH
        assert entry["status"] == 200
        assert (entry["vdn_id"], entry["campaign_id"]) == (11, 3)
        assert isinstance(entry["duration_ms"], float | int)
    miss, hit = access
    assert miss["queue_wait_ms"] >= 0
    assert miss["upstream_ms"] > 0
    assert hit["upstream_ms"] is None, "a hit never reaches the upstream"
    assert "caller" in hit


async def test_the_served_process_writes_only_json_lines_in_json_mode(upstream: Upstream) -> None:
    port = free_port()
    gateway = Process(
        ["serve"],
        port,
        env={
            "GATEWAY_SERVER__HOST": "127.0.0.1",
            "GATEWAY_SERVER__PORT": str(port),
            "GATEWAY_UPSTREAM__URL": upstream.url,
            "GATEWAY_UPSTREAM__AK": SIM.ak,
            "GATEWAY_UPSTREAM__SK": SIM.sk,
            "GATEWAY_UPSTREAM__ALLOW_HTTP": "true",
            "GATEWAY_AUTH__ENABLED": "false",
            "GATEWAY_LOG__FORMAT": "json",
        },
    )
    try:
        async with ClientSession() as session:
            headers = {"X-Request-ID": "req-process-1"}
            async with session.post(gateway.url + PATH, json={}, headers=headers) as response:
                assert response.status == 200
        output = gateway.output()
    finally:
        gateway.stop()

    entries = [strict_json(line) for line in output.splitlines()]
    startup = entries[0]["msg"]
    for fact in ("embedded", upstream.url, "limit 10 "):
        assert fact in startup, startup
    assert any(entry.get("request_id") == "req-process-1" for entry in entries)
