"""Around every request: a request id, one access-log line, metrics, and errors as responses.

This is the only place a ``GatewayError`` (or an aiohttp HTTP exception from routing)
becomes a response, and the only place an unexpected exception is logged with its trace; the
caller never sees a trace or a secret.
"""

from __future__ import annotations

import json
import logging
import re
import secrets

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import (
    BodyTooLarge,
    CallerError,
    GatewayError,
    MethodNotAllowed,
    NotFound,
)
from gateway.logs import bind_request_id, reset_request_id
from gateway.state import CALLER, PARTS, REQUEST_ID
from gateway.trace import RequestTrace
from gateway.trace import current as current_trace

access_log = logging.getLogger("gateway.access")
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
        content_type="application/json",
        charset="utf-8",
        headers=exc.headers(),
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


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id in and out, the request's metrics and its access-log line."""
    parts = request.app[PARTS]
    clock = parts.clock
    started = clock.monotonic()
    given = request.headers.get(REQUEST_ID_HEADER)
    # 128 random bits in 32 hex digits, as uuid4().hex gave, at a third of its cost
    request_id = given if given and _SAFE_ID.match(given) else secrets.token_hex(16)
    request[REQUEST_ID] = request_id
    trace = RequestTrace()
    current_trace.set(trace)
    bound = bind_request_id(request_id)  # every line logged during the request carries it
    try:
        response = await handler(request)
    finally:
        reset_request_id(bound)
    response.headers[REQUEST_ID_HEADER] = request_id
    elapsed = clock.monotonic() - started
    route = request.match_info.route.name or "other"
    cache = response.headers.get("X-Cache", "NONE")
    status = response.status
    parts.metrics.observe_request(route, status, cache, elapsed)
    if access_log.isEnabledFor(logging.INFO):
        method, path = request.method, request.path
        access_log.info(
            "%s %s %s %s %.1fms",
            method,
            path,
            status,
            cache,
            elapsed * 1000,
            extra={
                "request_id": request_id,
                "caller": request.get(CALLER),
                "method": method,
                "path": path,
                "status": status,
                "cache": cache,
                "vdn_id": trace.vdn_id,
                "campaign_id": trace.campaign_id,
                "queue_wait_ms": trace.queue_wait_ms,
                "upstream_ms": trace.upstream_ms,
                "upstream_attempts": trace.attempts,
                "duration_ms": round(elapsed * 1000, 3),
            },
        )
    return response
