"""Around every request: a request id, one access-log line, metrics, and errors as responses.

The access line goes to ``logs.access_log()`` (rendered directly, written off the loop) once
``setup_logging`` ran, else through the ``gateway.access`` logger.

This is the only place a ``GatewayError`` (or an aiohttp HTTP exception from routing)
becomes a response, and the only place an unexpected exception is logged with its trace; the
caller never sees a trace or a secret.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import re
import secrets
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway import __version__
from gateway.access_log import ACCESS_FIELDS, AccessValues
from gateway.errors import (
    BodyTooLarge,
    CallerError,
    GatewayError,
    MethodNotAllowed,
    NotFound,
)
from gateway.logs import access_log, bind_request_id, reset_request_id
from gateway.request_trace import RequestTrace
from gateway.request_trace import current as current_trace
from gateway.state import PARTS, REQUEST_ID, Parts
from gateway.vendor import RESPONSE_CONTENT_TYPE

access_logger = logging.getLogger("gateway.access")
log = logging.getLogger("gateway")

REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_HTTP_ERRORS: dict[int, type[CallerError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: BodyTooLarge,
}


def error_body(code: str, message: str) -> bytes:
    """The iSales shape, so a client that parses vendor errors parses ours."""
    return json.dumps(
        {"resultCode": code, "resultDesc": message, "returnCode": code, "returnDesc": message},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode()


def error_response(exc: GatewayError) -> web.Response:
    return web.Response(
        status=exc.status,
        body=error_body(exc.result_code, exc.message),
        headers={"Content-Type": RESPONSE_CONTENT_TYPE, **exc.headers()},
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        mapped = _HTTP_ERRORS.get(exc.status)
        return error_response(mapped() if mapped else CallerError(exc.reason))
    except Exception:
        log.exception("unexpected error", extra={"request_id": request.get(REQUEST_ID)})
        return error_response(GatewayError())


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


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, the request's metrics and its access-log line."""
    parts = request.app[PARTS]
    clock = parts.clock
    started = clock.monotonic()
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given if given and _SAFE_ID.match(given) else _ids.next()
    request[REQUEST_ID] = request_id
    trace = RequestTrace(request_id=request_id)
    current_trace.set(trace)
    bound = bind_request_id(request_id)  # every line logged during the request carries it
    try:
        response = await handler(request)
    finally:
        reset_request_id(bound)
    headers = response.headers
    headers[REQUEST_ID_HEADER] = request_id
    elapsed = clock.monotonic() - started
    route = request.match_info.route.name or "other"
    cache = headers.get("X-Cache", "NONE")
    status = response.status
    parts.metrics.observe_request(route, status, cache, elapsed, trace.error_code)
    level = logging.DEBUG if route in _QUIET_ROUTES else logging.INFO
    fast = access_log()
    if fast is not None:
        if fast.enabled(level):
            fast.request(level, *_access_line(request, response, cache, trace, elapsed, parts))
    elif access_logger.isEnabledFor(level):
        message, values = _access_line(request, response, cache, trace, elapsed, parts)
        fields = dict(zip(ACCESS_FIELDS, values, strict=True))
        access_logger.log(level, "%s", message, extra=fields)
    return response


def _access_line(
    request: web.Request,
    response: web.StreamResponse,
    cache: str,
    trace: RequestTrace,
    elapsed: float,
    parts: Parts,
) -> tuple[str, AccessValues]:
    """The access line's message and its values, in the order of ``ACCESS_FIELDS``."""
    request_id = trace.request_id or request[REQUEST_ID]
    method, path, status = request.method, request.path, response.status
    headers = request.headers
    peer = request.remote
    trusted = parts.settings.server.trusted_proxies
    client = client_address(peer, headers.get("X-Forwarded-For"), trusted) if trusted else peer
    size = response.content_length if isinstance(response, web.Response) else None
    duration = elapsed * 1000
    return f"{method} {path} {status} {cache} {duration:.1f}ms", (
        request_id,
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
        round(duration, 3),
        headers.get("User-Agent"),
        _SERVICE,
        __version__,
    )
