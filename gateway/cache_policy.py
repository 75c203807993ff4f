"""Cache decisions: the key, what may be stored, for how long, and how fresh an entry is.

Pure functions of their inputs (the time is passed in), tested without I/O.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum

from gateway.validation import CallResultQuery
from gateway.vendor import CAMPAIGN_NOT_FOUND, DEFAULT_LOCALE, SUCCESS


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Seconds: ``ttl_closed`` for ranges that ended, ``ttl_open`` otherwise, then ``stale``
    retention; ``negative`` for "campaign does not exist"; ``swr``: how long after its TTL a
    stale copy is served at once while it is refreshed in the background."""

    ttl_closed: float = 86400.0
    ttl_open: float = 30.0
    stale: float = 3600.0
    negative: float = 0.0
    swr: float = 0.0


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """An upstream answer as stored: its raw bytes and when it was stored (epoch seconds);
    ``gzip``: the same bytes gzip-compressed, when the store keeps them so (large answers);
    ``request_id``: the X-Request-ID of the request whose upstream call stored it."""

    body: bytes
    content_type: str
    stored_at: float
    ttl: float
    stale: float
    gzip: bytes | None = None
    request_id: str | None = None


class Freshness(Enum):
    FRESH = "fresh"
    STALE = "stale"
    EXPIRED = "expired"


def campaign_prefix(vdn_id: int, campaign_id: int) -> str:
    """Every key of one campaign starts with this; the braces are a Redis Cluster hash tag.

    Keys name a question, not a place: a shared store puts its namespace in front
    (``cache_redis.redis_key``), so the in-memory store and the local tier need none.
    """
    return f"{{{vdn_id}:{campaign_id}}}:"


@functools.lru_cache(maxsize=16384)  # pure, and hot keys repeat: hash each question once
def cache_key(query: CallResultQuery, locale: str | None = None) -> str:
    """One key per distinct question: vdnId, campaignId, the canonical body and the locale.

    ``locale`` is the one the upstream call sends (None: none, the vendor's default zh_CN).
    A body sent verbatim (it breaks an undocumented rule) is keyed by its JSON value, key
    order and spacing aside, apart from every canonical body.
    """
    if query.verbatim is not None:
        value = json.loads(query.verbatim) if query.verbatim.strip() else {}
        canonical = "verbatim " + json.dumps(value, sort_keys=True, separators=(",", ":"))
    else:
        canonical = json.dumps(query.body(), sort_keys=True, separators=(",", ":"))
    material = f"{locale or DEFAULT_LOCALE}\n{canonical}".encode()
    digest = hashlib.sha256(material).hexdigest()[:32]
    return campaign_prefix(query.vdn_id, query.campaign_id) + digest


def business_code(status: int, body: bytes) -> str | None:
    """The ``resultCode`` of a vendor answer, or None if it is not one."""
    if status != 200:
        return None
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("resultCode") if isinstance(parsed, dict) else None
    return code if isinstance(code, str) else None


def fresh_ttl(query: CallResultQuery, code: str | None, today: date, policy: CachePolicy) -> float:
    """Seconds an answer stays fresh; 0 means do not store it.

    Only successes are stored, plus "campaign does not exist" when a negative TTL is set. A
    range whose end lies before yesterday (UTC) is closed in every time zone, so its result
    set no longer grows.
    """
    if code == CAMPAIGN_NOT_FOUND:
        return policy.negative
    if code != SUCCESS:
        return 0.0
    if query.end_time is not None and query.end_time < today - timedelta(days=1):
        return policy.ttl_closed
    return policy.ttl_open


def freshness(entry: CacheEntry, now: float) -> Freshness:
    age = now - entry.stored_at
    if age < entry.ttl:
        return Freshness.FRESH
    if age < entry.ttl + entry.stale:
        return Freshness.STALE
    return Freshness.EXPIRED


def age_seconds(entry: CacheEntry, now: float) -> int:
    """The ``Age`` header value: whole seconds since the upstream answered, never negative."""
    return max(0, int(now - entry.stored_at))
