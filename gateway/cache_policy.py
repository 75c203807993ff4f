"""Cache decisions: the key, what may be stored, for how long, how fresh an entry is, and what
a lookup means for the caller.

Pure functions of their inputs (the time is passed in), tested without I/O. As in hishel, a
lookup becomes a decision value (``FromCache``, ``Revalidate``, ``Fetch``) that the service
acts on; the service does the I/O, this module says which answer and which ``X-Cache`` label.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import date, timedelta
from enum import Enum
from typing import ClassVar, Final

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


# The ``X-Cache`` labels (design: "Cache semantics").
HIT: Final = "HIT"
MISS: Final = "MISS"
STALE: Final = "STALE"
COALESCED: Final = "COALESCED"
BYPASS: Final = "BYPASS"


@dataclass(frozen=True, slots=True)
class FromCache:
    """Answer with the fresh ``entry`` (``X-Cache: HIT``), ``age`` seconds old."""

    entry: CacheEntry
    age: int
    lookup: ClassVar[str] = "hit"  # the ``result`` label of the lookups metric


@dataclass(frozen=True, slots=True)
class Revalidate:
    """Answer with the stale ``entry`` at once (``X-Cache: STALE``) and refresh it in the
    background: it expired less than ``swr`` seconds ago."""

    entry: CacheEntry
    age: int
    lookup: ClassVar[str] = "stale"


@dataclass(frozen=True, slots=True)
class Fetch:
    """Ask the upstream (coalesced, under the limit). ``stale``: a copy past its TTL but still
    kept, the answer instead of an overload or upstream error (stale-if-error)."""

    stale: CacheEntry | None = None

    @property
    def lookup(self) -> str:
        return "miss" if self.stale is None else "stale"


Lookup = FromCache | Revalidate | Fetch
_FETCH: Final = Fetch()


def on_lookup(entry: CacheEntry | None, now: float, policy: CachePolicy) -> Lookup:
    """What a cache lookup that found ``entry`` (None: nothing) at ``now`` means."""
    if entry is None:
        return _FETCH
    state = freshness(entry, now)
    if state is Freshness.FRESH:
        return FromCache(entry, age_seconds(entry, now))
    if state is Freshness.EXPIRED:
        return _FETCH  # past its stale retention: as good as absent
    if now < entry.stored_at + entry.ttl + policy.swr:
        return Revalidate(entry, age_seconds(entry, now))
    return Fetch(entry)


def fetched_label(*, led: bool, cached: bool, cache_on: bool, refresh: bool) -> str:
    """``X-Cache`` of an answer that went through the coalescer: COALESCED for a follower of
    another request's call; HIT when the leader found a fresh answer on its double check
    (``cached``); BYPASS without a cache or for a caller's ``no-cache``; else MISS."""
    if not led:
        return COALESCED
    if cached:
        return HIT
    if not cache_on or refresh:
        return BYPASS
    return MISS


def stale_reason(*, overloaded: bool) -> str:
    """The ``reason`` label of a stale copy served instead of an error (stale-if-error)."""
    return "overload" if overloaded else "upstream_error"


def stale_warning(why: str) -> str:
    """The ``Warning`` header of a stale answer (RFC 7234 code 110)."""
    return f'110 isales-gateway "Response is stale: {why}"'


def reusable(entry: CacheEntry, since: float, now: float) -> bool:
    """An entry a leader may answer with instead of calling: fresh and stored at or after
    ``since`` (the double check before a call; ``no-cache`` sets ``since``)."""
    return entry.stored_at >= since and freshness(entry, now) is Freshness.FRESH
