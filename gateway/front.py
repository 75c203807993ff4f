"""Every request's first stop: its id, its errors as responses, its metrics and access line;
and the hot route answered without aiohttp's router and response machinery.

``GatewayRunner`` serves the app with ``FrontDoor`` as the server's request handler, in front
of the app's router. The front door

- gives each request its id (a safe ``X-Request-ID`` is kept, else a new one), its
  ``RequestTrace`` and its log binding;
- is the only place a ``GatewayError`` (or an aiohttp HTTP exception from routing) becomes a
  response, and the only place an unexpected exception is logged with its trace: the caller
  never sees a trace or a secret;
- counts every answered request and writes its access line (to ``logs.access_log()``,
  rendered directly and written off the loop, once ``setup_logging`` ran; else through the
  ``gateway.access`` logger);
- answers ``POST`` on the callresult route itself (``handlers.callresult_reply``) and writes
  the answer in one write: status line and headers made here as aiohttp makes them (``Date``,
  ``Content-Length``, keep-alive by the request's version), without the router's resolve, a
  middleware chain, a ``web.Response`` and its preparation, about a quarter of a cache hit's
  work (README "Performance"). A request with ``Expect``, or whose path the router reads
  otherwise (an encoded ``/`` or a brace in an id), goes the routed way, to the same handler.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Final

from aiohttp import HttpVersion, HttpVersion10, HttpVersion11, hdrs, web
from aiohttp.abc import AbstractStreamWriter

from gateway import __version__
from gateway.access_log import ACCESS_FIELDS, AccessValues, access_message
from gateway.errors import (
    BodyTooLarge,
    CallerError,
    ExpectationFailed,
    Forbidden,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    ParameterError,
    Unauthenticated,
)
from gateway.handlers import Reply, callresult_reply, request_key
from gateway.logs import access_log
from gateway.metrics import PARAMETER_CODE
from gateway.request_trace import RequestTrace
from gateway.request_trace import current as current_trace
from gateway.state import PARTS, SERVICE, Parts
from gateway.vendor import CALLRESULT_ROUTE, RESPONSE_CONTENT_TYPE

access_logger = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")

REQUEST_ID_HEADER: Final = "X-Request-ID"  # written as bytes in ``reply_bytes``
SERVER: Final = "isales-gateway"  # no versions in ``Server``
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HTTP_ERRORS: dict[int, type[CallerError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: BodyTooLarge,
    417: ExpectationFailed,
}
# The callresult route, "/rest/isales/v1/openapi/campaigns/{vdnId}/callresult/{campaignId}".
_HOT_HEAD, _, _rest = CALLRESULT_ROUTE.partition("{vdnId}")
_HOT_MIDDLE = _rest.partition("{campaignId}")[0]


def error_body(code: str, message: str) -> bytes:
    """The iSales shape, so a client that parses vendor errors parses ours."""
    return json.dumps(
        {"resultCode": code, "resultDesc": message, "returnCode": code, "returnDesc": message},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def error_reply(exc: GatewayError) -> Reply:
    headers = {"Content-Type": RESPONSE_CONTENT_TYPE, **exc.headers()}
    return Reply(exc.status, error_body(exc.result_code, exc.message), headers)


def as_gateway_error(exc: Exception, request_id: str | None) -> GatewayError:
    """What the caller is told about ``exc``: a ``GatewayError`` as raised, an aiohttp HTTP
    exception (routing) by its status, anything else a logged 500 without details."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(allowed=exc.allowed_methods)
    if isinstance(exc, web.HTTPException):
        mapped = _HTTP_ERRORS.get(exc.status)
        return mapped() if mapped else CallerError(exc.reason)
    log.exception("unexpected error", extra={"request_id": request_id})
    return GatewayError()


def hot_ids(method: str, path: str) -> tuple[str, str] | None:
    """``(vdnId, campaignId)`` of a ``POST`` the front door answers itself, else None."""
    return _hot_path_ids(path) if method == "POST" else None


@functools.lru_cache(maxsize=4096)  # hot paths repeat
def _hot_path_ids(path: str) -> tuple[str, str] | None:
    if not path.startswith(_HOT_HEAD):
        return None
    vdn_id, middle, campaign_id = path[len(_HOT_HEAD) :].partition(_HOT_MIDDLE)
    # What the router reads otherwise: an id spanning segments, or holding a brace.
    if not (middle and vdn_id and campaign_id) or "/" in vdn_id or "/" in campaign_id:
        return None
    return None if "{" in path or "}" in path else (vdn_id, campaign_id)


class RequestIds:
    """Unique request ids without a random draw per request: 32 hex digits, a random
    per-process prefix (64 bits) then a counter. Re-drawn in a forked child, so parent and
    child never collide."""

    def __init__(self) -> None:
        self._reseed()
        os.register_at_fork(after_in_child=self._reseed)

    def _reseed(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):016x}"


_ids = RequestIds()
# Probes and scrapes would drown the access log at INFO: they are logged at DEBUG.
_QUIET_ROUTES = frozenset({"healthz", "readyz", "metrics"})
_SERVICE = "isales-gateway"


@functools.lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> tuple[IPv4Network | IPv6Network, ...]:
    return tuple(ip_network(t, strict=False) for t in trusted)


@functools.lru_cache(maxsize=1024)
def _is_trusted(address: str, trusted: tuple[str, ...]) -> bool:
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in _networks(trusted))


def client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """The caller's address: the peer, unless the peer is a trusted proxy; then the nearest
    ``X-Forwarded-For`` hop (right to left) that is not a trusted proxy. A hop that is not
    an address stops the walk at the last trusted one: only trusted proxies are believed."""
    client = peer or ""
    if not trusted or not forwarded_for or not _is_trusted(client, trusted):
        return client
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        try:
            ip_address(hop)
        except ValueError:
            return client
        client = hop
        if not _is_trusted(hop, trusted):
            return client
    return client


# Control characters aiohttp refuses in a header value (a tab is allowed): a value from outside
# (the upstream's Content-Type, a stored entry's) must not split the response.
_FORBIDDEN_IN_HEADER: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@functools.lru_cache(maxsize=1024)
def _head_before(status: int, headers: tuple[tuple[str, str], ...], version: HttpVersion) -> bytes:
    """The status line and ``headers``, remembered: a hot route's answers share them.
    ValueError as ``reply_bytes``."""
    for name, value in headers:
        if _FORBIDDEN_IN_HEADER.search(value):
            raise ValueError(f"a control character in the {name} header's value")
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    head = [f"HTTP/{version.major}.{version.minor} {status} {reason}\r\n"]
    head += [f"{name}: {value}\r\n" for name, value in headers]
    return "".join(head).encode()


_SERVER_AND_DATE: Final = f"\r\nServer: {SERVER}\r\nDate: ".encode()
_ENDS: Final = {  # after Content-Length, by (version, keep-alive): Connection where it differs
    (HttpVersion10, True): b"\r\nConnection: keep-alive\r\n\r\n",
    (HttpVersion10, False): b"\r\n\r\n",
    (HttpVersion11, True): b"\r\n\r\n",
    (HttpVersion11, False): b"\r\nConnection: close\r\n\r\n",
}


class HttpDate:
    """The ``Date`` header's value, made once per second of ``clock``."""

    def __init__(self, time: Callable[[], float]) -> None:
        self._time = time
        self._second = -1
        self._text = ""

    def now(self) -> str:
        second = int(self._time())
        if second != self._second:
            self._second, self._text = second, formatdate(second, usegmt=True)
        return self._text


def reply_bytes(
    reply: Reply, request_id: str, date: str, version: HttpVersion, keep_alive: bool
) -> bytes:
    """The whole HTTP response of ``reply``, as aiohttp's ``web.Response`` would write it:
    the reply's headers, then ``X-Request-ID``, ``Server``, ``Date``, ``Content-Length`` and,
    where the version's default differs, ``Connection``. ``Age``, which changes every second,
    goes after the others (``callresult_reply`` puts it last, so the routed way writes the
    same). ValueError: a header value holds a control character (never sent: it could start
    a forged header or response)."""
    headers = reply.headers
    age = headers.get("Age")
    fixed = tuple(headers.items())
    if age is not None:
        fixed = tuple(item for item in fixed if item[0] != "Age")
        if not age.isdigit():  # ours always is; anything else is checked like the rest
            _head_before(reply.status, (("Age", age),), version)
    parts = [_head_before(reply.status, fixed, version)]
    if age is not None:
        parts += (b"Age: ", age.encode(), b"\r\n")
    parts += (b"X-Request-ID: ", request_id.encode(), _SERVER_AND_DATE, date.encode())
    end = _ENDS.get((version, keep_alive), b"\r\n\r\n")  # another 1.x: no Connection
    parts += (b"\r\nContent-Length: ", str(len(reply.body)).encode(), end, reply.body)
    return b"".join(parts)


class _Written(web.StreamResponse):
    """A response the front door has written itself: aiohttp's preparation and end have
    nothing left to do, and only whether the connection stays open is read from it. Two
    instances serve every request (nothing in them changes)."""

    def __init__(self, keep_alive: bool) -> None:
        super().__init__()
        self._stays_open = keep_alive

    @property
    def keep_alive(self) -> bool:
        return self._stays_open

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
_KEEP_OPEN: Final = _Written(True)
_CLOSE: Final = _Written(False)


class FrontDoor:
    """The server's request handler: the app's router (``routed``) behind it (module
    docstring). Made by ``GatewayRunner`` once the app has started."""

    def __init__(self, app: web.Application, routed: RequestHandler) -> None:
        self._parts = app[PARTS]
        self._service = app[SERVICE]
        self._routed = routed
        self._date = HttpDate(self._parts.clock.time)

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        started = self._parts.clock.monotonic()
        given = request.headers.get(REQUEST_ID_HEADER)
        request_id = given if given and _SAFE_ID.match(given) else _ids.next()
        trace = RequestTrace(request_id=request_id)
        # Every line logged during the request carries its id. The request has a task of its
        # own (aiohttp's), so the variable is gone with it; tasks it starts copy it.
        current_trace.set(trace)
        ids = None if hdrs.EXPECT in request.headers else hot_ids(request.method, request.path)
        if ids is None:
            return await self._route(request, trace, started)
        return await self._callresult(request, ids, trace, started)

    async def _callresult(
        self, request: web.BaseRequest, ids: tuple[str, str], trace: RequestTrace, started: float
    ) -> web.StreamResponse:
        request_id = trace.request_id or ""
        try:
            reply = await callresult_reply(request, self._parts, self._service, *ids)
        except Exception as exc:  # every failure is an answer (CancelledError is not caught)
            reply = self._failed(exc, request, trace)
        version, keep_alive, date = request.version, request.keep_alive, self._date.now()
        try:
            data = reply_bytes(reply, request_id, date, version, keep_alive)
        except ValueError as exc:
            reply = self._failed(exc, request, trace)
            data = reply_bytes(reply, request_id, date, version, keep_alive)
        try:
            await request.writer.write_eof(data)
        except ConnectionError:  # the caller left: logged as answered, as aiohttp does
            keep_alive = False
        size = len(reply.body)
        self._observe(request, trace, started, "callresult", reply.status, reply.cache, size)
        return _KEEP_OPEN if keep_alive else _CLOSE

    async def _route(
        self, request: web.BaseRequest, trace: RequestTrace, started: float
    ) -> web.StreamResponse:
        try:
            response = await self._routed(request)
        except Exception as exc:
            reply = self._failed(exc, request, trace)
            response = web.Response(status=reply.status, body=reply.body, headers=reply.headers)
        headers = response.headers
        headers[REQUEST_ID_HEADER] = trace.request_id or ""
        headers[hdrs.SERVER] = SERVER
        assert isinstance(request, web.Request)  # made by the app's request factory
        route = request.match_info.route.name or "other"
        cache = headers.get("X-Cache", "NONE")
        size = response.content_length if isinstance(response, web.Response) else None
        self._observe(request, trace, started, route, response.status, cache, size)
        return response

    def _failed(self, exc: Exception, request: web.BaseRequest, trace: RequestTrace) -> Reply:
        """``exc`` as the caller's answer; its code noted on the trace (the requests metric's
        ``code``), a refused key counted."""
        error = as_gateway_error(exc, trace.request_id)
        trace.error_code = PARAMETER_CODE if isinstance(error, ParameterError) else error.code
        failures = self._parts.metrics.auth_failures
        if isinstance(error, Unauthenticated):
            failures.labels("missing_key" if request_key(request) is None else "unknown_key").inc()
        elif isinstance(error, Forbidden):
            failures.labels("forbidden").inc()
        return error_reply(error)

    def _observe(
        self,
        request: web.BaseRequest,
        trace: RequestTrace,
        started: float,
        route: str,
        status: int,
        cache: str,
        size: int | None,
    ) -> None:
        """The request's metrics and its access-log line."""
        parts = self._parts
        elapsed = parts.clock.monotonic() - started
        parts.metrics.observe_request(route, status, cache, elapsed, trace.error_code)
        level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
        fast = access_log()
        if fast is not None:
            if level >= fast.level:
                values = _access_values(request, status, cache, size, trace, elapsed, parts)
                fast.request(level, values)
        elif access_logger.isEnabledFor(level):
            values = _access_values(request, status, cache, size, trace, elapsed, parts)
            fields = dict(zip(ACCESS_FIELDS, values, strict=True))
            access_logger.log(level, "%s", access_message(values), extra=fields)


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose server takes every request through a ``FrontDoor``."""

    async def setup(self) -> None:
        await super().setup()
        server = self.server
        assert server is not None
        server.request_handler = FrontDoor(self.app, server.request_handler)


def _access_values(
    request: web.BaseRequest,
    status: int,
    cache: str,
    size: int | None,
    trace: RequestTrace,
    elapsed: float,
    parts: Parts,
) -> AccessValues:
    """The access line's values, in the order of ``ACCESS_FIELDS``."""
    method, path = request.method, request.path
    headers = request.headers
    peer = request.remote
    trusted = parts.settings.server.trusted_proxies
    client = client_address(peer, headers.get("X-Forwarded-For"), trusted) if trusted else peer
    return (
        trace.request_id or "",
        trace.caller,
        client or "",
        method,
        path,
        status,
        cache,
        trace.source_request_id,  # COALESCED: the request whose upstream call answered
        size,
        trace.vdn_id,
        trace.campaign_id,
        trace.queue_wait_ms,
        trace.upstream_ms,
        trace.attempts,
        round(elapsed * 1000, 3),
        headers.get("User-Agent"),
        _SERVICE,
        __version__,
    )
