"""Logs: one JSON object per line (or readable text), the level honoured, request ids on lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestClient

from gateway import __version__
from gateway.access_log import ACCESS_FIELDS, AccessLog, escape_text, logfmt
from gateway.front import RequestIds, client_address
from gateway.logs import close_access_log, flush_access_log, setup_logging
from gateway.request_trace import RequestTrace
from gateway.request_trace import current as current_trace
from gateway.traceparent import parse
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.fleet import gateway_environ
from tests.support.processes import Process, free_port
from tests.support.waiting import until

PATH = "/rest/isales/v1/openapi/campaigns/11/callresult/3"
LOGFMT_NAME = re.compile(r' ([a-z_]+)=(?:"(?:[^"\\]|\\.)*"|\S*)')  # each key=value's key
LOGFMT_PAIR = re.compile(r' ([a-z_]+)=("(?:[^"\\]|\\.)*"|\S*)')  # each key=value


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The root logger writing to a buffer through ``setup_logging``; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiohttp.access").level
    yield io.StringIO()
    close_access_log()
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


async def output_containing(process: Process, text: str) -> str:
    """The process's output once it holds ``text`` (it writes it a moment after answering)."""
    await until(lambda: text in process.output(), f"{text!r} in the output", every=0.05)
    return process.output()


async def ask_in_turn(gateway: TestClient[web.Request, web.Application], *ids: str) -> None:
    """One query once per request id, one after the other, each answered; the access log
    flushed."""
    for request_id in ids:
        response = await gateway.post(
            PATH, json={"pageSize": 5}, headers={"X-Request-ID": request_id}
        )
        assert response.status == 200
    flush_access_log()


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


def test_lines_logged_while_a_request_is_traced_carry_its_id(log_stream: io.StringIO) -> None:
    setup_logging("INFO", "json", stream=log_stream)
    log = logging.getLogger("gateway.test")
    token = current_trace.set(RequestTrace(request_id="bound-1"))
    log.info("inside")
    log.info("explicit", extra={"request_id": "given"})
    current_trace.reset(token)
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
    await ask_in_turn(gateway, "req-logs-1", "req-logs-2")

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


async def test_a_line_logged_on_a_connection_after_its_request_carries_no_request_id(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "json", stream=log_stream)
    body = b"{}"
    asked = (
        f"POST {PATH} HTTP/1.1\r\nHost: g\r\nX-Request-ID: req-before\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(asked)
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")  # refused by aiohttp's parser, logged
        await reader.read()  # the connection closes
    finally:
        writer.close()
    flush_access_log()

    entries = json_lines(log_stream)
    refused = [e for e in entries if e["logger"].startswith("aiohttp") and e["level"] == "ERROR"]
    assert refused, "aiohttp logged the refused bytes"
    assert all("request_id" not in entry for entry in refused)
    assert any(entry.get("request_id") == "req-before" for entry in entries)


async def test_the_served_process_writes_only_json_lines_in_json_mode(upstream: Upstream) -> None:
    port = free_port()
    env = gateway_environ(port, upstream.url, auth__enabled="false", log__format="json")
    gateway = Process(["serve"], port, env=env)
    try:
        async with ClientSession() as session:
            headers = {"X-Request-ID": "req-process-1"}
            async with session.post(gateway.url + PATH, json={}, headers=headers) as response:
                assert response.status == 200
        output = await output_containing(gateway, "req-process-1")
    finally:
        gateway.stop()

    entries = [strict_json(line) for line in output.splitlines()]
    startup = entries[0]["msg"]
    for fact in ("embedded", upstream.url, "limit 10 "):
        assert fact in startup, startup
    assert any(entry.get("request_id") == "req-process-1" for entry in entries)


async def test_a_newline_in_the_path_cannot_forge_a_text_line(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "text", stream=log_stream)
    forged = "2030-01-01T00:00:00.000Z INFO    gateway.access POST /forged 200 HIT"
    response = await gateway.get("/x%0A" + forged.replace(" ", "%20") + "%0D%1B[31m")
    assert response.status == 404
    logging.getLogger("gateway.test").info("a value %s", "with\nnewline\u2028inside")
    flush_access_log()

    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert not any(line.startswith("2030-") for line in lines)
    access = next(line for line in lines if "gateway.access" in line)
    assert "\\x0a2030-01-01" in access
    assert "\\x1b[31m" in access
    assert "\x1b" not in access
    other = next(line for line in lines if "gateway.test" in line)
    assert "with\\x0anewline\\u2028inside" in other


async def test_the_access_line_names_client_agent_size_service_and_version(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "json", stream=log_stream)
    response = await gateway.post(PATH, json={"pageSize": 5}, headers={"User-Agent": "crm/2.1"})
    body = await response.read()
    flush_access_log()

    (entry,) = [e for e in json_lines(log_stream) if e["logger"] == "gateway.access"]
    assert entry["client"] == "127.0.0.1"
    assert entry["user_agent"] == "crm/2.1"
    assert entry["bytes"] == len(body) > 0
    assert entry["service"] == "isales-gateway"
    assert entry["version"] == __version__
    assert entry["request_id"] == response.headers["X-Request-ID"]


async def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    trusting = await start_gateway(
        gateway_settings(upstream.url, server__trusted_proxies="10.0.0.0/8,127.0.0.1")
    )
    plain = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "json", stream=log_stream)
    chain = {"X-Forwarded-For": "6.6.6.6, 203.0.113.7, 10.1.2.3"}
    for gateway in (trusting, plain):
        assert (await gateway.get("/nowhere", headers=chain)).status == 404
    flush_access_log()

    clients = [e["client"] for e in json_lines(log_stream) if e["logger"] == "gateway.access"]
    assert clients == ["203.0.113.7", "127.0.0.1"]


def test_the_client_is_the_nearest_untrusted_hop_and_a_bad_hop_stops_the_walk() -> None:
    trusted = ("10.0.0.0/8",)
    assert client_address("10.0.0.1", "1.2.3.4, 10.9.9.9", trusted) == "1.2.3.4"
    assert client_address("10.0.0.1", "10.2.2.2, 10.9.9.9", trusted) == "10.2.2.2"
    assert client_address("10.0.0.1", "1.2.3.4, junk, 10.9.9.9", trusted) == "10.9.9.9"
    assert client_address("10.0.0.1", "2001:db8::1", trusted) == "2001:db8::1"
    assert client_address("192.0.2.1", "1.2.3.4", trusted) == "192.0.2.1"
    assert client_address("10.0.0.1", None, trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", "1.2.3.4", ()) == "10.0.0.1"


@pytest.mark.parametrize(("level", "logged"), [("INFO", False), ("DEBUG", True)])
async def test_probes_and_scrapes_are_access_logged_only_at_debug(
    level: str,
    logged: bool,
    upstream: Upstream,
    start_gateway: StartGateway,
    log_stream: io.StringIO,
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging(level, "json", stream=log_stream)
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert (await gateway.get(probe)).status == 200
    assert (await gateway.post(PATH, json={"pageSize": 5})).status == 200
    flush_access_log()

    access = [e for e in json_lines(log_stream) if e["logger"] == "gateway.access"]
    paths = [e["path"] for e in access]
    assert paths == (["/healthz", "/readyz", "/metrics", PATH] if logged else [PATH])
    assert [e["level"] for e in access] == ["DEBUG"] * 3 * logged + ["INFO"]


def test_request_ids_are_unique_and_each_process_draws_its_own_prefix() -> None:
    first, second = RequestIds(), RequestIds()
    ids = [first.next() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len({i[:16] for i in ids}) == 1
    assert second.next()[:16] != ids[0][:16]


async def test_without_setup_the_access_line_goes_through_the_logging_module(
    upstream: Upstream, start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        assert (await gateway.post(PATH, json={"pageSize": 5})).status == 200

    (record,) = [r for r in caplog.records if r.name == "gateway.access"]
    assert record.getMessage().startswith(f"POST {PATH} 200 MISS ")
    assert record.__dict__["client"] == "127.0.0.1"


async def test_text_and_json_access_lines_carry_the_same_fields_in_the_same_order(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    names = {}
    for fmt in ("json", "text"):
        stream = io.StringIO()
        setup_logging("INFO", fmt, stream=stream)
        headers = {"User-Agent": 'a "quoted" agent=1'}
        assert (await gateway.post(PATH, json={"pageSize": 5}, headers=headers)).status == 200
        flush_access_log()
        (line,) = [x for x in stream.getvalue().splitlines() if "gateway.access" in x]
        if fmt == "json":
            entry = strict_json(line)
            names[fmt] = [k for k in entry if k not in ("ts", "level", "logger", "msg")]
            assert entry["user_agent"] == 'a "quoted" agent=1'
        else:
            fields = line.split(" request_id=", 1)[1]
            names[fmt] = ["request_id", *LOGFMT_NAME.findall(fields)]
            assert r'user_agent="a \"quoted\" agent=1"' in line
    assert names["json"] == names["text"] == list(ACCESS_FIELDS)


async def test_a_coalesced_answers_access_line_names_the_request_that_called_upstream(
    start_simulator: StartSimulator, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    upstream = await start_simulator(latency_ms=300)
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "json", stream=log_stream)
    leader = asyncio.ensure_future(
        gateway.post(PATH, json={"pageSize": 5}, headers={"X-Request-ID": "leader-1"})
    )
    await until(lambda: upstream.requests == 1, "the leader's call is at the upstream")
    follower = await gateway.post(PATH, json={"pageSize": 5}, headers={"X-Request-ID": "follow-1"})
    assert follower.headers["X-Cache"] == "COALESCED"
    assert (await leader).headers["X-Cache"] == "MISS"
    flush_access_log()

    access = {e["request_id"]: e for e in json_lines(log_stream) if e["logger"] == "gateway.access"}
    assert access["follow-1"]["source_request_id"] == "leader-1"
    assert access["leader-1"]["source_request_id"] is None


async def test_a_hits_access_line_names_the_request_whose_call_stored_the_answer(
    upstream: Upstream, start_gateway: StartGateway, log_stream: io.StringIO
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    setup_logging("INFO", "json", stream=log_stream)
    await ask_in_turn(gateway, "stored-by-1", "hit-2")

    access = {e["request_id"]: e for e in json_lines(log_stream) if e["logger"] == "gateway.access"}
    assert access["hit-2"]["cache"] == "HIT"
    assert access["hit-2"]["source_request_id"] == "stored-by-1"


def access_values(path: str, agent: str | None = None) -> tuple[Any, ...]:
    return (
        "0123456789abcdef0123456789abcdef", None, "127.0.0.1", "POST", path, 200, "HIT",
        "fedcba9876543210fedcba9876543210", 606, 11, 3, None, None, 0, 1.234, agent,
        "isales-gateway", __version__,
    )  # fmt: skip


async def test_repeated_and_many_distinct_access_values_render_as_when_each_was_new() -> None:
    stream = io.StringIO()  # in a loop, as served: lines go to the writer in batches
    access = AccessLog(stream, "text")
    forged = "/x\n2030-01-01T00:00:00.000Z INFO    gateway.access POST /forged"
    paths = [forged, forged, '/q"uoted path', "/" + "long" * 100] * 2
    paths += [f"/rest/{n}" for n in range(5000)]  # past the memo's bound: emptied, refilled
    for n, path in enumerate(paths):  # each line's own id and duration, whatever its shape
        values = access_values(path, path)
        access.request(logging.INFO, (f"{n:032x}", *values[1:14], n / 8, *values[15:]))
    access.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == len(paths)  # no value started a line of its own
    for n, (path, line) in enumerate(zip(paths, lines, strict=True)):
        rendered = dict(LOGFMT_PAIR.findall(line))
        assert rendered["path"] == rendered["user_agent"] == logfmt(path), line
        assert (rendered["request_id"], rendered["duration_ms"]) == (f"{n:032x}", str(n / 8))
        assert f" 200 HIT {n / 8:.1f}ms request_id=" in line
    assert not any(line.startswith("2030-") for line in lines)
    assert "\\x0a2030-01-01" in lines[0]
    assert "\\x0a2030-01-01" in lines[1]


def test_escape_text_escapes_exactly_the_unsafe_characters() -> None:
    unsafe = {*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0xD800, 0xE000)}
    for code in range(0x110000):
        text = "a" + chr(code)
        escaped = escape_text(text)
        if code in unsafe:
            assert escaped.startswith("a\\"), hex(code)
            assert chr(code) not in escaped, hex(code)
        else:
            assert escaped == text, hex(code)


def test_the_forwarded_traceparent_is_made_on_first_use_and_kept() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert RequestTrace().traceparent is None  # a request that forwards nothing
    fresh = RequestTrace(incoming_traceparent="")
    first = fresh.traceparent
    assert first is not None
    assert parse(first) is not None
    assert fresh.traceparent == first  # the same hop on every read (retries, spans)
    given = RequestTrace(incoming_traceparent=f"00-{trace_id}-00f067aa0ba902b7-01")
    forwarded = parse(given.traceparent)
    assert forwarded is not None
    assert forwarded.trace_id == trace_id
