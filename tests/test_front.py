"""The front door: the callresult route answered without the router, written in one write.

What a caller sees must not depend on which way a request went: the front door's own writer
(the route's usual requests) or aiohttp's (``Expect``, every other route). Requests go over a
raw socket so that the bytes, the HTTP version and keep-alive are what the tests choose.
"""

from __future__ import annotations

import asyncio
import gzip

import pytest
from aiohttp import HttpVersion, HttpVersion10, HttpVersion11

from gateway.clock import ManualClock
from gateway.front import hot_ids, reply_bytes
from gateway.handlers import Reply
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support.raw_http import Reply as Received
from tests.support.raw_http import read_replies

ROUTE = "/rest/isales/v1/openapi/campaigns/11/callresult/3"
QUERY = b'{"pageSize": 5, "pageNum": 1}'
LARGE = b'{"pageSize": 500, "pageNum": 1}'
# Headers that differ from one answer to the next whichever way it went.
PER_ANSWER = {"date", "x-request-id"}


@pytest.mark.parametrize(
    ("method", "path", "ids"),
    [
        ("POST", ROUTE, ("11", "3")),
        ("POST", "/rest/isales/v1/openapi/campaigns/abc/callresult/-1", ("abc", "-1")),
        ("GET", ROUTE, None),
        ("PUT", ROUTE, None),
        ("POST", ROUTE + "/", None),
        ("POST", "/rest/isales/v1/openapi/campaigns/11/2/callresult/3", None),
        ("POST", "/rest/isales/v1/openapi/campaigns//callresult/3", None),
        ("POST", "/rest/isales/v1/openapi/campaigns/11/callresult/", None),
        ("POST", "/rest/isales/v1/openapi/campaigns/{11}/callresult/3", None),
        ("POST", "/rest/isales/v1/openapi/campaigns/11/callresult/3}", None),
        ("POST", "/rest/isales/v1/openapi/campaigns/11/callresults/3", None),
        ("POST", "/rest/isales/v2/openapi/campaigns/11/callresult/3", None),
        ("POST", "/healthz", None),
    ],
)
def test_the_front_door_takes_the_routes_usual_requests_and_leaves_the_rest_to_the_router(
    method: str, path: str, ids: tuple[str, str] | None
) -> None:
    assert hot_ids(method, path) == ids


def head_of(data: bytes) -> list[str]:
    return data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")


REPLY = Reply(200, b'{"a":1}', {"Content-Type": "application/json", "X-Cache": "HIT"}, "HIT")


def test_a_reply_is_written_with_the_headers_every_response_gets() -> None:
    data = reply_bytes(REPLY, "rid-1", "Tue, 01 Dec 2026 13:00:00 GMT", HttpVersion11, True)

    assert head_of(data) == [
        "HTTP/1.1 200 OK",
        "Content-Type: application/json",
        "X-Cache: HIT",
        "X-Request-ID: rid-1",
        "Server: isales-gateway",
        "Date: Tue, 01 Dec 2026 13:00:00 GMT",
        "Content-Length: 7",
    ]
    assert data.endswith(b'\r\n\r\n{"a":1}')


@pytest.mark.parametrize(
    ("version", "keep_alive", "connection"),
    [
        (HttpVersion11, True, None),
        (HttpVersion11, False, "Connection: close"),
        (HttpVersion10, True, "Connection: keep-alive"),
        (HttpVersion10, False, None),
    ],
)
def test_connection_is_said_where_the_versions_default_differs(
    version: tuple[int, int], keep_alive: bool, connection: str | None
) -> None:
    lines = head_of(reply_bytes(REPLY, "r", "d", version, keep_alive))  # type: ignore[arg-type]

    assert lines[0] == f"HTTP/{version[0]}.{version[1]} 200 OK"
    assert [line for line in lines if line.startswith("Connection")] == (
        [connection] if connection else []
    )


def test_a_status_without_a_reason_phrase_gets_an_empty_one() -> None:
    data = reply_bytes(REPLY._replace(status=599), "r", "d", HttpVersion11, True)

    assert head_of(data)[0] == "HTTP/1.1 599 "


@pytest.mark.parametrize("name", ["Content-Type", "Age"])
@pytest.mark.parametrize("value", ["text/plain\r\nSet-Cookie: a=1", "a\nb", "a\x00b", "a\x7fb"])
def test_a_header_value_with_a_control_character_is_never_written(name: str, value: str) -> None:
    reply = REPLY._replace(headers={name: value})

    with pytest.raises(ValueError, match=name):
        reply_bytes(reply, "r", "d", HttpVersion11, True)


def test_age_changes_every_second_and_is_written_after_the_other_headers() -> None:
    heads = [
        head_of(reply_bytes(REPLY._replace(headers={**REPLY.headers, "Age": age}), *args))
        for age, args in [
            ("0", ("r1", "d1", HttpVersion11, True)),
            ("7", ("r2", "d2", HttpVersion10, False)),
        ]
    ]

    assert heads[0][1:4] == ["Content-Type: application/json", "X-Cache: HIT", "Age: 0"]
    assert heads[0][4] == "X-Request-ID: r1"
    assert heads[1][:5] == [
        "HTTP/1.0 200 OK",
        "Content-Type: application/json",
        "X-Cache: HIT",
        "Age: 7",
        "X-Request-ID: r2",
    ]
    assert heads[1][-2:] == ["Date: d2", "Content-Length: 7"]


def test_another_http_1_version_gets_no_connection_header() -> None:
    lines = head_of(reply_bytes(REPLY, "r", "d", HttpVersion(1, 2), False))

    assert lines[0] == "HTTP/1.2 200 OK"
    assert not [line for line in lines if line.startswith("Connection")]


def test_a_tab_in_a_header_value_is_written_as_aiohttp_allows() -> None:
    reply = REPLY._replace(headers={"Warning": '110 -\t"stale"'})

    assert 'Warning: 110 -\t"stale"' in head_of(reply_bytes(reply, "r", "d", HttpVersion11, True))


def request(
    body: bytes = QUERY,
    *,
    version: str = "1.1",
    path: str = ROUTE,
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: gateway.test", f"Content-Length: {len(body)}"]
    given = {"Content-Type": "application/json", **(headers or {})}
    lines += [f"{name}: {value}" for name, value in given.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def one_by_one(port: int, *raws: bytes) -> list[Received]:
    """Each request on one keep-alive connection, the next sent once the last is answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received: list[Received] = []
    try:
        async with asyncio.timeout(10):
            for raw in raws:
                writer.write(raw)
                received += await read_replies(reader, count=1)
    finally:
        writer.close()
    return received


def same_answer(front: Received, routed: Received) -> None:
    assert front.status == routed.status
    assert front.body == routed.body
    assert [n for n in front.names if n not in PER_ANSWER] == [
        n for n in routed.names if n not in PER_ANSWER
    ]
    kept = {k: v for k, v in front.headers.items() if k not in PER_ANSWER}
    assert kept == {k: v for k, v in routed.headers.items() if k not in PER_ANSWER}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (QUERY, {}),  # a hit
        (LARGE, {"Accept-Encoding": "gzip"}),  # a hit stored gzipped, sent as stored
        (LARGE, {}),  # the same, sent as the upstream sent it
        (QUERY, {"Content-Type": "text/plain"}),  # a gateway error
        (b'{"pageSize": 500000}', {}),  # a vendor rule answered locally
        (b"{", {}),  # not JSON
    ],
)
async def test_the_front_door_and_the_router_give_the_same_answer(
    body: bytes,
    headers: dict[str, str],
    upstream: Upstream,
    start_gateway: StartGateway,
    clock: ManualClock,
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url), clock=clock)
    assert gateway.port is not None
    first, again = await one_by_one(gateway.port, request(body), request(body))
    assert first.headers.get("x-cache") in ("MISS", None)
    routed_headers = {**headers, "Expect": "100-continue"}

    front, routed = await one_by_one(
        gateway.port, request(body, headers=headers), request(body, headers=routed_headers)
    )

    same_answer(front, routed)
    assert again.headers.get("x-cache") in ("HIT", None)
    if headers.get("Accept-Encoding") == "gzip":
        assert front.headers["content-encoding"] == "gzip"
        assert gzip.decompress(front.body) == again.body
    assert upstream.requests <= 1


async def test_http_1_0_is_answered_in_1_0_and_closed_unless_kept_alive(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    assert gateway.port is not None

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(request(version="1.0"))
        async with asyncio.timeout(10):
            closed = await read_replies(reader, count=1)
            after = await reader.read()  # b"": the gateway closed the connection
    finally:
        writer.close()
    kept = await one_by_one(
        gateway.port,
        request(version="1.0", headers={"Connection": "keep-alive"}),
        request(version="1.0", headers={"Connection": "keep-alive"}),
    )

    assert [(r.version, r.status, r.headers.get("connection")) for r in closed] == [
        ("HTTP/1.0", 200, None)
    ]
    assert after == b""
    assert [(r.version, r.headers.get("connection"), r.body) for r in kept] == [
        ("HTTP/1.0", "keep-alive", closed[0].body)
    ] * 2


async def test_pipelined_requests_are_answered_in_order_on_one_connection(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    assert gateway.port is not None
    ids = [f"pipelined-{n}" for n in range(5)]
    bodies = [b'{"pageSize": %d, "pageNum": 1}' % (n + 1) for n in range(5)]
    raws = [request(b, headers={"X-Request-ID": i}) for i, b in zip(ids, bodies, strict=True)]

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"".join(raws) + request(headers={"Connection": "close"}))
        async with asyncio.timeout(10):
            replies = await read_replies(reader)
    finally:
        writer.close()

    assert [r.headers["x-request-id"] for r in replies[:5]] == ids
    assert [len(r.json()["data"]) for r in replies[:5]] == [1, 2, 3, 4, 5]
    assert replies[5].headers["connection"] == "close"
    assert len(replies) == 6


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (QUERY, {}, 200),
        (chunked(QUERY[:9], QUERY[9:]), {"Transfer-Encoding": "chunked"}, 200),
        (chunked(b"[" + b" " * 6000, b" " * 6000 + b"]"), {"Transfer-Encoding": "chunked"}, 413),
    ],
)
async def test_a_body_that_comes_in_pieces_is_read_like_one_that_comes_whole(
    body: bytes,
    headers: dict[str, str],
    status: int,
    upstream: Upstream,
    start_gateway: StartGateway,
) -> None:
    """A small body usually comes with the head and is taken without waiting; one still on its
    way is waited for, and held to the same size limit."""
    gateway = await start_gateway(gateway_settings(upstream.url))  # 8192 bytes at most
    assert gateway.port is not None
    raw = request(body, headers=headers)
    if "Transfer-Encoding" in headers:
        raw = raw.replace(f"Content-Length: {len(body)}\r\n".encode(), b"")
    cut = raw.index(b"\r\n\r\n") + 4 + 5  # the head and five bytes of the body

    whole = await one_by_one(gateway.port, raw)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(raw[:cut])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(raw[cut:])
        async with asyncio.timeout(10):
            pieces = await read_replies(reader, count=1)
    finally:
        writer.close()

    assert [r.status for r in whole + pieces] == [status, status]
    if status == 200:
        assert pieces[0].body == whole[0].body
        assert pieces[0].headers["x-cache"] == "HIT"
    else:
        assert pieces[0].json()["resultCode"] == whole[0].json()["resultCode"] == "GW41300"
    assert upstream.requests == (1 if status == 200 else 0)
