"""HTTP handlers: the drop-in callresult route, health, readiness, metrics and admin.

Handlers deal with HTTP only (content type, body size, headers); the request path itself is
``CallResultService``. Errors they raise become answers in ``front.FrontDoor``, which also
answers the callresult route's usual requests itself, through ``callresult_reply``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Sized
from typing import Any, NamedTuple

from aiohttp import HttpVersion11, hdrs, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.auth import Caller, Callers, presented_key, require_admin
from gateway.errors import (
    BackendUnavailable,
    BodyTooLarge,
    CallerError,
    Unauthenticated,
    UnsupportedMediaType,
)
from gateway.health import readiness, redis_answers
from gateway.limiter import ANONYMOUS
from gateway.otel import RequestSpans
from gateway.redis_client import REDIS_FAILURES
from gateway.request_trace import current as current_trace
from gateway.service import CallResultService
from gateway.state import BREAKER, PARTS, SERVICE, Parts
from gateway.validation import CallResultQuery, parse_path_id, parse_request
from gateway.vendor import CALLRESULT_ROUTE, LOCALE_HEADER, LOCALES, MAX_INT, MAX_VDN_ID, MIN_VDN_ID

# The caller of a caller_header value that names no configured caller.
OTHER = "other"
CALLRESULT_PATH = CALLRESULT_ROUTE


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The request's body (decoded, as ``request.read()`` gives it), at most ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"Request body is larger than {limit} bytes.")
    content = request.content
    if content.is_eof() and content.exception() is None:
        # The whole body came with the head (a small request's usual case): taken as it is,
        # without the read's waits. Once only: nothing else reads the body of this request.
        raw = content.read_nowait()
        if len(raw) > limit:
            raise BodyTooLarge(f"Request body is larger than {limit} bytes.")
        return raw
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise BodyTooLarge(f"Request body is larger than {limit} bytes.") from exc
    except web.RequestPayloadError as exc:  # a broken gzip/deflate body, a broken chunk
        raise CallerError("Request body could not be read (Content-Encoding or framing).") from exc


# Hot queries come back byte for byte: validating each once is enough. ``parse_request`` is
# pure and its answer immutable; errors are not cached (they raise). Sized for a hot set of
# ten thousand questions (past it every hit pays parsing, hashing and the garbage: 0.6x in
# the bench); small bodies only, so even distinct crafted bodies hold it under ~15 MB.
_MEMO_MAX_BODY = 512


@functools.lru_cache(maxsize=16384)
def _parse_memo(vdn_id: str, campaign_id: str, raw: bytes, charset: str | None) -> CallResultQuery:
    return parse_request(vdn_id, campaign_id, raw, charset=charset)


def parse_query(
    vdn_id: str, campaign_id: str, raw: bytes, charset: str | None = None
) -> CallResultQuery:
    """``charset``: the request's Content-Type charset (None: UTF-8)."""
    small = len(raw) <= _MEMO_MAX_BODY and len(vdn_id) + len(campaign_id) <= 64
    if small and (charset is None or len(charset) <= 32):
        return _parse_memo(vdn_id, campaign_id, raw, charset)
    return parse_request(vdn_id, campaign_id, raw, charset=charset)


_MEDIA_TYPES: dict[str | None, tuple[str, str | None]] = {}


def media_type(request: web.BaseRequest) -> tuple[str, str | None]:
    """The request's media type and charset as aiohttp reads them, remembered for the few
    ``Content-Type`` values callers send (at most 256: others are read each time)."""
    raw = request.headers.get(hdrs.CONTENT_TYPE)
    known = _MEDIA_TYPES.get(raw)
    if known is None:
        known = request.content_type, request.charset
        if len(_MEDIA_TYPES) < 256:
            _MEDIA_TYPES[raw] = known
    return known


def request_key(request: web.BaseRequest) -> str | None:
    """The API key the request presents (``X-API-Key`` or a bearer token), if any."""
    return presented_key(request.headers.get("X-API-Key"), request.headers.get("Authorization"))


def share_name(request: web.BaseRequest, parts: Parts, caller: Caller | None) -> str:
    """Whose share of the upstream budget this request takes: the API-key caller; with auth
    off, the ``limit.caller_header`` value if it names a configured caller, "other" for any
    other value, and "anonymous" without the header (or without that setting)."""
    if caller is not None:
        return caller.name
    header = parts.settings.limit.caller_header
    named = request.headers.get(header) if header else None
    if named is None:
        return ANONYMOUS
    return named if named in parts.caller_names else OTHER


# RFC 9211 Cache-Status next to X-Cache (which stays: clients of the gateway read it).
CACHE_STATUS = {
    "HIT": "isales-gateway; hit",
    "STALE": "isales-gateway; hit; detail=stale",
    "MISS": "isales-gateway; fwd=miss",
    "COALESCED": "isales-gateway; fwd=miss; detail=coalesced",
    "BYPASS": "isales-gateway; fwd=bypass",
}


class Reply(NamedTuple):
    """An answer as the caller gets it, but for the headers every response gets (``X-Request-ID``,
    ``Server``, ``Date``, ``Content-Length``); ``cache`` is its ``X-Cache`` label."""

    status: int
    body: bytes
    headers: dict[str, str]
    cache: str = "NONE"


async def callresult(request: web.Request) -> web.Response:
    """The callresult route as the router reaches it: requests with ``Expect``, paths the front
    door leaves to the router, an app served without the front door (``front.GatewayRunner``)."""
    app, match = request.app, request.match_info
    ids = match["vdnId"], match["campaignId"]
    reply = await callresult_reply(request, app[PARTS], app[SERVICE], *ids)
    return web.Response(status=reply.status, body=reply.body, headers=reply.headers)


def callresult_reply(
    request: web.BaseRequest,
    parts: Parts,
    service: CallResultService,
    vdn_id: str,
    campaign_id: str,
) -> Awaitable[Reply]:
    """The answer to one callresult request (the path's ids given); raises ``GatewayError``."""
    if parts.spans is None:  # no coroutine of its own: this is every request's path
        return _callresult(request, parts, service, vdn_id, campaign_id)
    return _traced(request, parts, parts.spans, service, vdn_id, campaign_id)


async def _traced(
    request: web.BaseRequest,
    parts: Parts,
    spans: RequestSpans,
    service: CallResultService,
    vdn_id: str,
    campaign_id: str,
) -> Reply:
    with spans.request("POST callresult", request.headers):
        return await _callresult(request, parts, service, vdn_id, campaign_id)


async def _callresult(
    request: web.BaseRequest,
    parts: Parts,
    service: CallResultService,
    vdn_id: str,
    campaign_id: str,
) -> Reply:
    callers = parts.keys.current.callers
    caller = None if callers is None else callers.authenticate(request_key(request))
    trace = current_trace.get()
    if caller is not None and trace is not None:
        trace.caller = caller.name  # the access line's
    share = share_name(request, parts, caller)
    parts.metrics.count_caller_request(share)
    media, charset = media_type(request)
    if media != "application/json":
        raise UnsupportedMediaType()
    raw = await read_body(request, parts.settings.server.max_body_bytes)
    query = parse_query(vdn_id, campaign_id, raw, charset)
    headers = request.headers
    if trace is not None:
        trace.vdn_id, trace.campaign_id = query.vdn_id, query.campaign_id
        trace.incoming_traceparent = headers.get("traceparent", "")  # used if it calls
    if caller is not None:
        Callers.authorize(caller, query.vdn_id)  # before the cache: no peeking at other VDNs
    locale = headers.get(LOCALE_HEADER)
    refresh = "no-cache" in headers.get("Cache-Control", "").lower()
    asked = parts.clock.monotonic()
    answer = await service.answer(
        query, locale=locale if locale in LOCALES else None, refresh=refresh, caller=share
    )
    if parts.spans is not None and answer.cache == "COALESCED":
        leader = {"isales.leader_request_id": answer.source_request_id or ""}
        parts.spans.waited("coalescing wait", parts.clock.monotonic() - asked, **leader)
    cache = answer.cache
    response_headers = {"Content-Type": answer.content_type, "X-Cache": cache}
    if cache == "BYPASS" and refresh:
        response_headers["Cache-Status"] = "isales-gateway; fwd=request"
    elif cache in CACHE_STATUS:
        response_headers["Cache-Status"] = CACHE_STATUS[cache]
    if answer.warning:
        response_headers["Warning"] = answer.warning
    if trace is not None and answer.source_request_id:  # COALESCED: who made the call
        trace.source_request_id = answer.source_request_id
    body = answer.body
    if answer.gzip is not None:  # stored compressed: as is to gzip callers, else the original
        response_headers["Vary"] = "Accept-Encoding"
        if _ACCEPTS_GZIP[headers.get("Accept-Encoding", "")]:
            response_headers["Content-Encoding"] = "gzip"
            body = answer.gzip
    response_headers["Age"] = str(answer.age)  # last: it changes every second (front.py)
    return Reply(answer.status, body, response_headers, cache)


class _AcceptsGzip(dict[str, bool]):
    """``accepts_gzip`` of the few ``Accept-Encoding`` values callers send, remembered
    (emptied when full, so crafted values cannot grow it)."""

    def __missing__(self, accept_encoding: str) -> bool:
        if len(self) >= 256:
            self.clear()
        answer = self[accept_encoding] = accepts_gzip(accept_encoding)
        return answer


_ACCEPTS_GZIP = _AcceptsGzip()


def accepts_gzip(accept_encoding: str) -> bool:
    """``Accept-Encoding`` names gzip (or x-gzip) without refusing it with ``q=0``."""
    for item in accept_encoding.lower().split(","):
        coding, *params = item.split(";")
        if coding.strip() in ("gzip", "x-gzip"):
            weights = [p.strip()[2:] for p in params if p.strip().startswith("q=")]
            try:
                return float(weights[0] if weights else "1") > 0
            except ValueError:
                return False
    return False


async def expect_continue(request: web.Request) -> None:
    """``100 Continue`` only for a request that passes the key, size and type checks.

    Otherwise no interim answer: the handler then answers 401/403/413/415 before reading a
    body the client need not send.
    """
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers[hdrs.EXPECT]}")
    if request.version != HttpVersion11:
        return
    parts = request.app[PARTS]
    callers = parts.keys.current.callers
    if callers is not None:
        try:
            callers.authenticate(request_key(request))
        except Unauthenticated:
            return
    length = request.content_length
    if length is not None and length > parts.settings.server.max_body_bytes:
        return
    if request.content_type != "application/json":
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def purge_campaign(request: web.Request) -> web.Response:
    """Admin: drop every cached answer of one campaign, e.g. after the vendor corrected data."""
    parts = request.app[PARTS]
    require_admin(request_key(request), parts.keys.current.admin_sha256)
    vdn_id = parse_path_id("vdnId", request.match_info["vdnId"], MIN_VDN_ID, MAX_VDN_ID)
    campaign_id = parse_path_id("campaignId", request.match_info["campaignId"], 1, MAX_INT)
    try:
        purged = 0 if parts.cache is None else await parts.cache.purge_campaign(vdn_id, campaign_id)
    except BackendUnavailable:
        parts.metrics.redis_errors.labels("purge").inc()
        raise
    return web.json_response({"vdnId": vdn_id, "campaignId": campaign_id, "purged": purged})


async def admin_config(request: web.Request) -> web.Response:
    """Admin: the effective settings (file, environment, defaults), secrets as ``***``."""
    parts = request.app[PARTS]
    require_admin(request_key(request), parts.keys.current.admin_sha256)
    return web.json_response(parts.settings.redacted())


async def admin_stats(request: web.Request) -> web.Response:
    """Admin: what this replica holds now: cache entries, permits and queue, callers."""
    parts = request.app[PARTS]
    require_admin(request_key(request), parts.keys.current.admin_sha256)
    snapshot = parts.limiter.snapshot()
    callers = parts.keys.current.callers
    cache: dict[str, Any] = {"enabled": parts.cache is not None}
    if isinstance(parts.cache, Sized):  # the embedded store; Redis: see redis_keys
        cache["entries"] = len(parts.cache)
    if parts.redis is not None:
        try:
            cache["redis_keys"] = await parts.redis.dbsize()  # cache, locks and limiter keys
        except REDIS_FAILURES:
            parts.metrics.redis_errors.labels("ping").inc()
            cache["redis_keys"] = None
    breaker = request.app.get(BREAKER)
    return web.json_response(
        {
            "mode": parts.mode,
            "cache": cache,
            # The limiter reports this replica's totals; a per-caller split comes with fair
            # queuing.
            "limiter": {"in_flight": snapshot.in_flight, "queued": snapshot.queued},
            "queue_by_caller": None,
            "callers": None if callers is None else [c.name for c in callers.callers],
            "upstream": {"breaker": None if breaker is None else breaker.state.value},
        }
    )


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Says nothing about Redis or the upstream."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve, with Redis, breaker and upstream state (``gateway.health`` says when
    it is 503); never a secret."""
    parts = request.app[PARTS]
    redis_up = None
    if parts.redis is not None:
        redis_up = await redis_answers(parts.redis)
        if not redis_up:
            parts.metrics.redis_errors.labels("ping").inc()
    callers = parts.keys.current.callers
    status, body = readiness(
        started=SERVICE in request.app,
        draining=parts.lifecycle.draining,
        mode=parts.mode,
        redis_up=redis_up,
        limiter=parts.limiter,
        breaker=request.app.get(BREAKER),
        callers=None if callers is None else len(callers.callers),
    )
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[PARTS].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post(
        CALLRESULT_PATH, callresult, name="callresult", expect_handler=expect_continue
    )
    app.router.add_delete(
        "/admin/cache/campaigns/{vdnId}/{campaignId}", purge_campaign, name="admin"
    )
    app.router.add_get("/admin/config", admin_config, name="admin_config")
    app.router.add_get("/admin/stats", admin_stats, name="admin_stats")
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
