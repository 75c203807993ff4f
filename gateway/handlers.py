"""HTTP handlers: the drop-in callresult route, health, readiness and metrics.

Handlers deal with HTTP only (content type, body size, headers); the request path itself is
``CallResultService``.
"""

from __future__ import annotations

import asyncio
import functools
import json

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.auth import Callers, presented_key, require_admin
from gateway.cache_policy import LOCALES
from gateway.errors import BodyTooLarge, CallerError, UnsupportedMediaType
from gateway.state import CALLER, PARTS, SERVICE
from gateway.trace import current as current_trace
from gateway.validation import MAX_INT, CallResultQuery, parse_path_id, parse_request

CALLRESULT_PATH = "/rest/isales/v1/openapi/campaigns/{vdnId}/callresult/{campaignId}"


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"Request body is larger than {limit} bytes.")
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
def _parse_memo(vdn_id: str, campaign_id: str, raw: bytes) -> CallResultQuery:
    return parse_request(vdn_id, campaign_id, raw)


def parse_query(vdn_id: str, campaign_id: str, raw: bytes) -> CallResultQuery:
    if len(raw) <= _MEMO_MAX_BODY and len(vdn_id) + len(campaign_id) <= 64:
        return _parse_memo(vdn_id, campaign_id, raw)
    return parse_request(vdn_id, campaign_id, raw)


def _key(request: web.Request) -> str | None:
    return presented_key(request.headers.get("X-API-Key"), request.headers.get("Authorization"))


async def callresult(request: web.Request) -> web.Response:
    parts = request.app[PARTS]
    caller = None if parts.callers is None else parts.callers.authenticate(_key(request))
    if caller is not None:
        request[CALLER] = caller.name
    if request.content_type != "application/json":
        raise UnsupportedMediaType()
    raw = await read_body(request, parts.settings.server.max_body_bytes)
    query = parse_query(request.match_info["vdnId"], request.match_info["campaignId"], raw)
    trace = current_trace.get()
    if trace is not None:
        trace.vdn_id, trace.campaign_id = query.vdn_id, query.campaign_id
    if caller is not None:
        Callers.authorize(caller, query.vdn_id)  # before the cache: no peeking at other VDNs
    locale = request.headers.get("locale")
    refresh = "no-cache" in request.headers.get("Cache-Control", "").lower()
    answer = await request.app[SERVICE].answer(
        query, locale=locale if locale in LOCALES else None, refresh=refresh
    )
    headers = {"Content-Type": answer.content_type, "X-Cache": answer.cache, "Age": str(answer.age)}
    if answer.warning:
        headers["Warning"] = answer.warning
    body = answer.body
    if answer.gzip is not None:  # stored compressed: as is to gzip callers, else the original
        headers["Vary"] = "Accept-Encoding"
        if accepts_gzip(request.headers.get("Accept-Encoding", "")):
            headers["Content-Encoding"] = "gzip"
            body = answer.gzip
    return web.Response(status=answer.status, body=body, headers=headers)


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


async def purge_campaign(request: web.Request) -> web.Response:
    """Admin: drop every cached answer of one campaign, e.g. after the vendor corrected data."""
    parts = request.app[PARTS]
    require_admin(_key(request), parts.settings.admin.key_sha256)
    vdn_id = parse_path_id("vdnId", request.match_info["vdnId"], 1, 9999)
    campaign_id = parse_path_id("campaignId", request.match_info["campaignId"], 1, MAX_INT)
    purged = 0 if parts.cache is None else await parts.cache.purge_campaign(vdn_id, campaign_id)
    return web.json_response({"vdnId": vdn_id, "campaignId": campaign_id, "purged": purged})


async def healthz(request: web.Request) -> web.Response:
    """Alive: the process answers. Says nothing about Redis or the upstream."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to serve: started, with what is degraded (never a secret)."""
    parts = request.app[PARTS]
    ready = SERVICE in request.app
    degraded = []
    if parts.redis is not None and not await _redis_answers(parts.redis):
        degraded.append("redis")
    body: dict[str, object] = {
        "status": "ready" if ready else "starting",
        "mode": parts.mode,
        "degraded": degraded,
    }
    return web.Response(
        status=200 if ready else 503,
        body=json.dumps(body).encode(),
        content_type="application/json",
    )


async def _redis_answers(redis: Redis) -> bool:
    try:
        async with asyncio.timeout(1.0):
            return bool(await redis.ping())
    except (RedisError, OSError, TimeoutError):
        return False


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[PARTS].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_post(CALLRESULT_PATH, callresult, name="callresult")
    app.router.add_delete(
        "/admin/cache/campaigns/{vdnId}/{campaignId}", purge_campaign, name="admin"
    )
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/readyz", readyz, name="readyz")
    app.router.add_get("/metrics", metrics, name="metrics")
