"""The shared cache store: upstream answers in Redis, expired by Redis, purgeable per campaign.

Value format (never pickle): ``b"ISGW1\\n"``, a compact JSON header
``{"stored_at", "ttl", "stale", "content_type"}`` plus ``"request_id"`` (the request whose
call stored it) and ``"encoding": "gzip"`` when the body
follows gzip-compressed (large answers, see ``cache.with_gzip``), ``b"\\n"``, then the body.
``decode_entry`` validates strictly (the gzip member included), so a value someone else wrote
is a miss, never run and never a crash. A replica older than the "encoding" field reads a
compressed value as foreign (a miss), never as a wrong answer.

When built with ``channel``, both scripts publish what they changed (the key, or the campaign
prefix) on it in the same atomic step as the write: no replica can miss an invalidation
because a write succeeded and a separate publish did not (``cache_tiered``).

Keys: the store is given the cache's keys (``cache_policy.cache_key``: ``{vdn:campaign}:digest``)
and stores each under ``<namespace>:<key>`` (``redis_key``); what it publishes names the key
as given, so listeners compare it with their own keys.

Each entry is ``SET ... PX`` with its remaining life (``stored_at + ttl + stale`` minus now), so
Redis expires it and ``maxmemory`` eviction works per entry. A per-campaign index, a sorted set
``<namespace>:{vdn:campaign}:index`` scored by expiry (Redis's clock, ms), is written by the same
script; ``purge_campaign`` unlinks its members without ``KEYS`` or a keyspace ``SCAN``. The
index shares the entries' hash tag, so both scripts run on Redis Cluster.

Every Redis failure becomes ``BackendUnavailable`` in ``_redis_errors`` and nowhere else.
"""

from __future__ import annotations

import json
import logging
import math
import re
from typing import Any

from gateway.cache import gunzip, with_gzip
from gateway.cache_policy import CacheEntry, campaign_prefix
from gateway.clock import Clock
from gateway.redis_client import AnyRedis, redis_errors
from gateway.settings import DEFAULT_NAMESPACE

log = logging.getLogger("gateway.cache")

MAGIC = b"ISGW1\n"
MAX_HEADER_BYTES = 1024
MAX_BODY_BYTES = 32 * 1024 * 1024
# Sanity bounds, not policy: past them a value is corrupt or crafted.
MAX_EPOCH = 32_503_680_000.0  # year 3000
MAX_LIFETIME = 10 * 365 * 86400.0
INDEX_SUFFIX = "index"
_HEADER_FIELDS = frozenset({"stored_at", "ttl", "stale", "content_type"})
_OPTIONAL_FIELDS = frozenset({"encoding", "request_id"})
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # as the middleware accepts one
_CONTENT_TYPE = re.compile(r"[\x21-\x7e][\x20-\x7e]{0,254}")  # printable ASCII: a header value
# A non-empty hash tag, else Redis Cluster would hash the whole key and split entry from index.
_ENTRY_KEY = re.compile(r"(\{[^{}]+\}:)(.+)", re.DOTALL)
_UNLINK_BATCH = 500  # stays under Lua's unpack() stack limit

# KEYS[1] entry, KEYS[2] campaign index; ARGV[1] value, ARGV[2] PX in ms (>= 1), ARGV[3]
# the invalidation channel or "", ARGV[4] the key as the cache names it (what is published).
_PUT = """
local px = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
-- members whose entry has expired go now, so the index tracks live entries only
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZADD', KEYS[2], now + px, KEYS[1])
-- the index must outlive every entry it lists: lengthen its expiry, never shorten it
if redis.call('PTTL', KEYS[2]) < px then
  redis.call('PEXPIRE', KEYS[2], px)
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
"""

# KEYS[1] campaign index. Members share its hash tag, hence its slot (Redis Cluster).
# ARGV[1] unlink batch, ARGV[2] the invalidation channel or "", ARGV[3] the campaign prefix.
_PURGE = """
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local removed = 0
for i = 1, #members, tonumber(ARGV[1]) do
  local last = math.min(i + tonumber(ARGV[1]) - 1, #members)
  removed = removed + redis.call('UNLINK', unpack(members, i, last))
end
redis.call('UNLINK', KEYS[1])
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
end
return removed
"""


def encode_entry(entry: CacheEntry) -> bytes:
    """The stored form of ``entry`` (large bodies gzipped); ValueError if ``decode_entry``
    would not accept it."""
    entry = with_gzip(entry)
    fields: dict[str, object] = {
        "stored_at": entry.stored_at,
        "ttl": entry.ttl,
        "stale": entry.stale,
        "content_type": entry.content_type,
    }
    if entry.gzip is not None:
        fields["encoding"] = "gzip"
    if entry.request_id is not None:
        fields["request_id"] = entry.request_id
    header = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()
    raw = MAGIC + header + b"\n" + (entry.body if entry.gzip is None else entry.gzip)
    if len(entry.body) > MAX_BODY_BYTES or _parse(raw) is None:
        raise ValueError("cache entry cannot be stored: a field is out of bounds")
    return raw


def decode_entry(raw: bytes) -> CacheEntry | None:
    """The entry ``raw`` holds, or None for anything ``encode_entry`` would not have written."""
    return _parse(raw)


def _parse(raw: bytes) -> CacheEntry | None:
    if not raw.startswith(MAGIC):
        return None
    if len(raw) > len(MAGIC) + MAX_HEADER_BYTES + 1 + MAX_BODY_BYTES:
        return None
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES + 1)
    if end < 0:
        return None
    try:
        header = json.loads(raw[len(MAGIC) : end])
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not isinstance(header, dict) or not header.keys() >= _HEADER_FIELDS:
        return None
    if not header.keys() <= _HEADER_FIELDS | _OPTIONAL_FIELDS:
        return None
    request_id = header.get("request_id")
    if request_id is not None and not (
        isinstance(request_id, str) and _REQUEST_ID.fullmatch(request_id)
    ):
        return None
    if header.get("encoding", "gzip") != "gzip":
        return None
    stored_at = _number(header["stored_at"], MAX_EPOCH)
    ttl = _number(header["ttl"], MAX_LIFETIME)
    stale = _number(header["stale"], MAX_LIFETIME)
    content_type = header["content_type"]
    if stored_at is None or ttl is None or stale is None:
        return None
    if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
        return None
    body = raw[end + 1 :]
    if len(body) > MAX_BODY_BYTES:
        return None
    if "encoding" not in header:
        return CacheEntry(body, content_type, stored_at, ttl, stale, request_id=request_id)
    plain = gunzip(body, MAX_BODY_BYTES)
    if plain is None:
        return None
    return CacheEntry(plain, content_type, stored_at, ttl, stale, body, request_id)


def _number(value: Any, maximum: float) -> float | None:
    # bool is an int subclass; JSON true is not a number here
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= maximum:
        return None
    return number


def redis_key(namespace: str, key: str) -> str:
    """Where the cache's ``key`` (or campaign prefix) lives in Redis."""
    return f"{namespace}:{key}"


def index_key(namespace: str, entry_key: str) -> str:
    """The Redis key of the index of the campaign ``entry_key`` (a cache key) belongs to;
    ValueError for a foreign key."""
    match = _ENTRY_KEY.fullmatch(entry_key)
    if match is None or match.group(2) == INDEX_SUFFIX:
        raise ValueError("not a campaign cache key")
    return redis_key(namespace, match.group(1) + INDEX_SUFFIX)


class RedisCacheStore:
    """``CacheStore`` on a shared Redis; the client must return bytes (no decode_responses).

    ``get``, ``put`` and ``purge_campaign`` raise ``BackendUnavailable`` when Redis fails.
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        clock: Clock,
        channel: str = "",
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        if client.get_encoder().decode_responses:
            raise ValueError("RedisCacheStore needs a client without decode_responses")
        self._client = client
        self._clock = clock
        self.namespace = namespace
        self.channel = channel  # where writes announce themselves; "" = nowhere
        self._put = client.register_script(_PUT)
        self._purge = client.register_script(_PURGE)

    async def get(self, key: str) -> CacheEntry | None:
        """The entry, fresh or stale; None if absent, past its retention or not ours."""
        with redis_errors("cache get"):
            raw = await self._client.get(redis_key(self.namespace, key))
        if raw is None:
            return None
        entry = decode_entry(raw) if isinstance(raw, bytes) else None
        if entry is None:
            log.warning("cache value rejected: not a gateway entry")
            return None
        # Redis expires on its own clock; this keeps the store's contract at the boundary.
        if self._clock.time() >= entry.stored_at + entry.ttl + entry.stale:
            return None
        return entry

    async def put(self, key: str, entry: CacheEntry) -> None:
        """Store ``entry`` until its stale retention ends; one that cannot be encoded is skipped.

        Skipping (with a warning) rather than raising: the caller already has its answer, and
        a cache that cannot hold it must not turn it into an error.
        """
        index = index_key(self.namespace, key)
        try:
            value = encode_entry(entry)
        except ValueError:
            log.warning("cache entry not stored: out of the storable bounds")
            return
        lifetime = entry.ttl + entry.stale
        remaining = min(lifetime, entry.stored_at + lifetime - self._clock.time())
        px = max(1, math.ceil(remaining * 1000))
        with redis_errors("cache put"):
            await self._put(
                keys=[redis_key(self.namespace, key), index], args=[value, px, self.channel, key]
            )

    async def close(self) -> None:
        """Nothing runs in the background; the shared client is closed by the app."""

    async def purge_campaign(self, vdn_id: int, campaign_id: int) -> int:
        """Unlink one campaign's entries and its index; returns how many entries existed."""
        prefix = campaign_prefix(vdn_id, campaign_id)
        with redis_errors("cache purge"):
            removed = await self._purge(
                keys=[redis_key(self.namespace, prefix + INDEX_SUFFIX)],
                args=[_UNLINK_BATCH, self.channel, prefix],
            )
        return int(removed)
