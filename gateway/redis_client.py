"""Building the shared Redis client from ``redis.url``, with short, explicit time budgets.

redis-py's defaults (5 s socket timeouts, retries with backoff, a pool that waits 20 s for a
connection) would let a sick Redis stall every request for seconds; here every call has the
``redis.timeout_ms`` budget and at most one quick retry.

Accepted URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``, and
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`` for Sentinel.
Redis Cluster is refused by the settings for now: the keys of each script share a hash tag,
but the pub/sub and the client type have not been made to work on a cluster.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeAlias, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

from gateway.errors import BackendUnavailable, ConfigError
from gateway.settings import RedisSettings

log = logging.getLogger("gateway")

# Whatever a Redis call can raise when Redis fails: an error reply, a timeout, a refused or
# dropped connection (OSError covers the builtin ConnectionError and TimeoutError), and on a
# cluster a slot no node serves or a topology that cannot be read (not RedisErrors).
REDIS_FAILURES: Final = (RedisError, OSError, RedisClusterException)
# The shared client: one endpoint (standalone, Sentinel) or a cluster.
AnyRedis: TypeAlias = aioredis.Redis | RedisCluster


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """The one place a Redis failure becomes the gateway's ``BackendUnavailable`` (raised
    from it); ``what`` names the backend and operation for the log.
    """
    try:
        yield
    except REDIS_FAILURES as exc:
        raise BackendUnavailable(f"Redis unavailable ({what}).") from exc


def _common(settings: RedisSettings) -> dict[str, Any]:
    budget = settings.timeout_ms / 1000
    return {
        "socket_timeout": budget,
        "socket_connect_timeout": budget,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 15,
        "client_name": "isales-gateway",
    }


def connect(settings: RedisSettings) -> aioredis.Redis:
    """A client for ``settings.url``; connects lazily, so building it never blocks."""
    url = settings.url
    common = _common(settings)
    if url.startswith("redis+sentinel://"):
        return _sentinel(url, common)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=settings.pool_size, timeout=common["socket_timeout"], **common
    )
    return aioredis.Redis.from_pool(pool)  # owns the pool: aclose() closes its connections


def _sentinel(url: str, common: dict[str, Any]) -> aioredis.Redis:
    parts = urlsplit(url)
    hosts = parts.netloc.rsplit("@", 1)[-1]
    password = unquote(parts.password) if parts.password else None
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.rpartition(":")
        if host and not port.isdigit():
            raise ConfigError("redis.url", f"bad sentinel address {item!r}")
        sentinels.append((host or item, int(port) if host else 26379))
    path = [p for p in parts.path.split("/") if p]
    if not path or (len(path) > 1 and not path[1].isdigit()):
        raise ConfigError("redis.url", "redis+sentinel:// needs .../service_name[/db]")
    db = int(path[1]) if len(path) > 1 else 0
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, sentinel_kwargs=dict(common), password=password, db=db, **common
    )
    return cast(aioredis.Redis, sentinel.master_for(path[0]))


async def check_eviction_policy(client: aioredis.Redis) -> None:
    """Refuse a Redis whose ``maxmemory-policy`` may evict any key (``allkeys-*``): it would
    evict the limiter's keys, which have no TTL so that ``volatile-*`` policies never pick them.
    Warns (and goes on) when the policy cannot be read: Redis down, or CONFIG not allowed.
    """
    try:
        reply = await client.config_get("maxmemory-policy")
    except REDIS_FAILURES as exc:
        log.warning("cannot read Redis maxmemory-policy (%s); it must not be allkeys-*", exc)
        return
    policy = reply.get("maxmemory-policy", "")
    policy = policy.decode() if isinstance(policy, bytes) else str(policy)
    if policy.startswith("allkeys-"):
        raise ConfigError(
            "redis.url",
            f"Redis maxmemory-policy is {policy}: it may evict the upstream limiter's keys "
            "and break the vendor's limit; use volatile-lru, volatile-lfu, volatile-ttl, "
            "volatile-random or noeviction (cache entries carry TTLs, the limiter's keys none)",
        )
