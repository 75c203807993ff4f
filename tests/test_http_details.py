"""HTTP as clients and proxies expect it: Allow, Server, Cache-Status, 100 Continue, trace ids."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.auth import key_digest
from gateway.traceparent import outgoing_traceparent, parse
from tests.conftest import StartGateway, StartSimulator, Upstream, gateway_settings
from tests.support.fleet import path
from tests.support.waiting import until

KEY = "caller-key-0123456789"
CALLER = f'[[callers]]\nname = "reporting"\nkey_sha256 = "{key_digest(KEY)}"\nvdn_ids = ["*"]\n'


async def test_a_405_names_the_allowed_methods_and_server_names_no_versions(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    wrong = await gateway.get(path(3))
    health = await gateway.get("/healthz")

    assert wrong.status == 405
    assert wrong.headers["Allow"] == "POST"
    for response in (wrong, health):
        assert response.headers["Server"] == "isales-gateway"


async def test_cache_status_follows_rfc_9211_next_to_x_cache(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    # A no-cache request right after an identical answer landed gets that answer (issue 10):
    # off here, so the third request is a forced refresh.
    settings = gateway_settings(upstream.url, cache__no_cache_min_age_s=0)
    gateway = await start_gateway(settings)
    miss = await gateway.post(path(3), json={"pageSize": 5})
    hit = await gateway.post(path(3), json={"pageSize": 5})
    forced = await gateway.post(
        path(3), json={"pageSize": 5}, headers={"Cache-Control": "no-cache"}
    )

    assert (miss.headers["X-Cache"], miss.headers["Cache-Status"]) == (
        "MISS",
        "isales-gateway; fwd=miss",
    )
    assert (hit.headers["X-Cache"], hit.headers["Cache-Status"]) == ("HIT", "isales-gateway; hit")
    assert forced.headers["Cache-Status"] == "isales-gateway; fwd=request"


async def first_line(port: int, headers: str, body: bytes = b"") -> bytes:
    """What the gateway sends first for a request with ``Expect: 100-continue``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path(3)} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{headers}\r\n".encode()
        )
        await writer.drain()
        line = await reader.readline()
        if body:
            writer.write(body)
        return line
    finally:
        writer.close()


async def test_100_continue_comes_only_after_the_key_and_the_size_pass(
    tmp_path: Path, upstream: Upstream, start_gateway: StartGateway
) -> None:
    (tmp_path / "callers.toml").write_text(CALLER)
    settings = gateway_settings(
        upstream.url, auth__enabled="true", auth__callers_file=str(tmp_path / "callers.toml")
    )
    gateway = await start_gateway(settings)
    port = gateway.server.port
    assert port is not None
    json_type = "Content-Type: application/json\r\n"

    good = await first_line(port, f"X-API-Key: {KEY}\r\n{json_type}Content-Length: 2\r\n", b"{}")
    no_key = await first_line(port, f"{json_type}Content-Length: 2\r\n")
    too_big = await first_line(port, f"X-API-Key: {KEY}\r\n{json_type}Content-Length: 99999\r\n")

    assert good.startswith(b"HTTP/1.1 100")
    assert no_key.startswith(b"HTTP/1.1 401")
    assert too_big.startswith(b"HTTP/1.1 413")


def test_a_valid_traceparent_keeps_its_trace_and_an_invalid_one_starts_a_new_one() -> None:
    given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    passed = parse(outgoing_traceparent(given))
    fresh = parse(outgoing_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01"))

    assert passed is not None
    assert fresh is not None
    assert (passed.trace_id, passed.flags) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01")
    assert passed.parent_id != "00f067aa0ba902b7", "the gateway's hop is the new parent"
    assert fresh.trace_id != "0" * 32
    assert parse("garbage") is None
    assert parse(None) is None


async def test_the_request_id_and_the_traceparent_reach_the_upstream(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    response = await gateway.post(
        path(3),
        json={},
        headers={"X-Request-ID": "req-42", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
    )
    assert response.status == 200
    (received,) = upstream.state.received

    assert received.headers["x-request-id"] == "req-42"
    forwarded = parse(received.headers["traceparent"])
    assert forwarded is not None
    assert forwarded.trace_id == trace_id


async def test_a_coalesced_answer_names_the_request_that_made_the_upstream_call(
    start_simulator: StartSimulator, start_gateway: StartGateway
) -> None:
    upstream = await start_simulator(latency_ms=300)
    gateway = await start_gateway(gateway_settings(upstream.url))
    leader = asyncio.ensure_future(
        gateway.post(path(5), json={}, headers={"X-Request-ID": "leader-1"})
    )
    await until(lambda: upstream.requests > 0, "the leader's call is at the upstream")
    follower = await gateway.post(path(5), json={}, headers={"X-Request-ID": "follower-1"})
    await leader

    assert follower.headers["X-Cache"] == "COALESCED"
    (received,) = upstream.state.received
    assert received.headers["x-request-id"] == "leader-1"
