"""Building the shared Redis client from ``redis.url``, with short, explicit time budgets.

redis-py's defaults (5 s socket timeouts, retries with backoff, a pool that waits 20 s for a
connection) would let a sick Redis stall every request for seconds; here every call has the
``redis.timeout_ms`` budget and at most one quick retry.

Two budgets, because they bound two different things. ``redis.timeout_ms`` bounds what Redis
does: connecting, and every read and write. ``redis.pool_timeout_ms`` (1 s by default) bounds
the wait for one of the ``redis.pool_size`` connections when all are in use, counted from when
the call asks. That wait is queueing in this process, not Redis: in a burst, hundreds of calls
queue for the pool while the replica's loop is busy with the burst's other work for a few
hundred ms, and a wait as short as a Redis timeout failed them on a healthy Redis (a cache
lookup became a miss counted as a Redis error, the coalescer fell back to the replica alone).
A sick Redis stays bounded: a call waits at most ``pool_timeout_ms`` for a connection, then
has its own budget (``timeout_ms`` per try, the retry included: about 1 s against a frozen
Redis with the defaults, as before), so 2 s at most, and that only when the pool is full. A
larger pool is no fix: a loop held 300 ms expires every waiter's timer, however many
connections there are short of one per request. A wait that leaves out the loop's other work
would be harder to state in seconds, and to bound.
On a cluster redis-py's pool does not wait at all (a node with all its connections in use
fails the next command at once): ``BoundedCluster`` gives commands the same bounded wait.

Accepted URLs: ``redis://``, ``rediss://`` (TLS), ``unix://``,
``redis+sentinel://[:password@]host:port[,host:port...]/service_name[/db]`` for Sentinel, and
``redis+cluster://[[user]:password@]host:port[,host:port...]`` for Redis Cluster (any of its
nodes; the client learns the rest): redis-py's ``RedisCluster`` with the same budgets. On a
cluster every script's keys share one hash tag and channels are sharded (``redis_bus``).

Sentinel: redis-py's pool asks the sentinels for the primary only when it opens a connection,
and a connection stays with the server it opened on: after a failover the pool would keep
talking to the old primary, which takes writes until the sentinels demote it (many seconds
later), and a pub/sub connection would never move. ``SentinelPool`` asks the sentinels every
``_FOLLOW_S`` and, when the primary changed, drops every connection, in use or not (a command
under way fails and its one retry reconnects; a subscriber's listener subscribes again), so
everything talks to the new primary within about ``_FOLLOW_S``. Each ask also drops any
connection open to another server than the primary named: one that was connecting during the
switch got the old address after that sweep (a subscriber's would stay there, kept alive by
its PINGs). When no sentinel answers, it
keeps the primary it had (new connections included). What a switch means for the
limiter's state is the limiter's business (``gateway.limiter.redis_scripts``, lineage).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final, TypeAlias, cast
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    MaxConnectionsError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
)

from gateway.errors import BackendUnavailable, ConfigError
from gateway.settings import RedisSettings, cluster_nodes

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


def connect(settings: RedisSettings) -> AnyRedis:
    """A client for ``settings.url``; connects lazily, so building it never blocks."""
    url = settings.url
    common = _common(settings)
    pool_size, pool_timeout = settings.pool_size, settings.pool_timeout_ms / 1000
    if url.startswith("redis+sentinel://"):
        return _sentinel(url, pool_size, pool_timeout, common)
    if url.startswith("redis+cluster://"):
        return _cluster(url, pool_size, pool_timeout, common)
    # The pool times its wait from taking its lock, which nobody holds across an await: from
    # the call's ask.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=pool_timeout, **common
    )
    return GatewayRedis.from_pool(pool)  # owns the pool: aclose() closes its connections


_FOLLOW_S: Final = 0.5  # how often a Sentinel-managed pool asks which server is the primary


class SentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool, bounded (``max_connections``, waiting ``timeout``, the pool
    wait, for a free connection, as the standalone pool), that follows a failover at once
    (module docstring).
    """

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]
        self._watcher: asyncio.Task[None] | None = None
        self.switches = 0  # primary changes seen (the first discovery is none)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._follow())
        return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]

    async def get_master_address(self) -> Any:
        """The primary the sentinels name (redis-py asks on every new connection). When no
        sentinel answers at all, the one named last: new connections go where the open ones
        are. When sentinels answer but name none (it is down, a failover is under way), none.
        """
        address, answered = await self._ask_sentinels()
        if address is None:
            if answered or self.master_address is None:
                raise MasterNotFoundError(f"No master found for {self.service_name!r}")
            return self.master_address
        if self.master_address != address:
            if self.master_address is not None:
                self.switches += 1
                log.warning(
                    "Redis Sentinel: the primary of %s is now %s:%s (was %s:%s)",
                    self.service_name, *address, *self.master_address,
                )  # fmt: skip
            self.master_address = address
            # Every connection, in use or not: one released later would come back to the old
            # primary, and a subscriber's is never released.
            await ConnectionPool.disconnect(self, inuse_connections=True)
        return address

    async def _ask_sentinels(self) -> tuple[tuple[str, int] | None, bool]:
        """(the primary's address or None, whether any sentinel answered), as redis-py's
        ``discover_master`` but telling "nobody answered" from "nobody names one"."""
        manager, answered = self.sentinel_manager, False
        for sentinel in manager.sentinels:
            try:
                masters = await sentinel.sentinel_masters()
            except REDIS_FAILURES:
                continue
            answered = True
            state = masters.get(self.service_name)
            if state and manager.check_master_state(state, self.service_name):
                return (state["ip"], int(state["port"])), True
        return None, answered

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(_FOLLOW_S)
            try:
                await self.get_master_address()
            except REDIS_FAILURES as exc:  # none named: connections stay as they are
                log.debug("Redis Sentinel: no primary named for %s (%s)", self.service_name, exc)
            else:
                await self._drop_strays()

    async def _drop_strays(self) -> None:
        """Disconnect the connections open to another server than the primary named last."""
        primary = self.master_address
        connections = (*self._get_free_connections(), *self._get_in_use_connections())
        for connection in connections:
            address = (getattr(connection, "host", None), getattr(connection, "port", None))
            if primary is not None and connection.is_connected and address != tuple(primary):
                await connection.disconnect()

    async def aclose(self) -> None:
        """The client closing: the watcher, this pool's connections and the sentinels'."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await super().aclose()
        await self.sentinel_manager.aclose()


def _sentinel(
    url: str, pool_size: int, pool_timeout: float, common: dict[str, Any]
) -> aioredis.Redis:
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
    return cast(
        aioredis.Redis,
        sentinel.master_for(
            path[0],
            redis_class=GatewayRedis,
            connection_pool_class=SentinelPool,
            max_connections=pool_size,
            timeout=pool_timeout,
        ),
    )


async def check_sentinel(client: AnyRedis) -> None:
    """Refuse a Sentinel URL whose sentinels answer but none of them knows its primary's name
    (a typo would otherwise look like an outage for ever). Warns when no sentinel answers: the
    replica starts degraded and follows once one does. Nothing for other clients.
    """
    if isinstance(client, RedisCluster):
        return
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return
    answered = []
    for sentinel in pool.sentinel_manager.sentinels:
        try:
            answered.append(await sentinel.sentinel_masters())
        except REDIS_FAILURES as exc:
            log.warning("Redis Sentinel %s does not answer (%s)", _address(sentinel), exc)
    if answered and not any(pool.service_name in masters for masters in answered):
        raise ConfigError(
            "redis.url",
            f"no sentinel knows a primary named {pool.service_name!r} "
            f"(they know: {', '.join(sorted({n for m in answered for n in m})) or 'none'})",
        )
    if not answered:
        log.warning("no Redis Sentinel answers; the replica starts degraded and retries")
        return
    try:
        await client.info("replication")
    except NoPermissionError:
        log.warning(
            "Redis denies INFO to the gateway's user: the limiter cannot tell a failover from "
            "its primary's replication id and may grant a permit twice across one; allow +info"
        )
    except REDIS_FAILURES:
        pass  # down or failing over: the eviction policy check says so


def _address(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


class _ClosedUnderfoot:
    """A command whose connection is closed under it while it is sent (redis-py 8.1: another
    task's error handling disconnects it, as a cluster does on a node's failure and the
    Sentinel pool on a switch) fails in redis-py with ``AttributeError`` (its writer gone):
    here a Redis ``ConnectionError``, so it fails like any lost connection (the cache fails
    open, the limiter falls back) instead of escaping as an unexpected error (a 500 once,
    under a cluster primary's restart)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)  # type: ignore[misc]
        except AttributeError as exc:
            raise RedisConnectionError("The connection was closed under the command.") from exc


class GatewayRedis(_ClosedUnderfoot, aioredis.Redis):  # type: ignore[misc]
    """redis-py's client (standalone, Sentinel) with ``_ClosedUnderfoot``."""


class BoundedCluster(_ClosedUnderfoot, RedisCluster):  # type: ignore[misc]
    """redis-py's ``RedisCluster`` whose commands wait their turn, up to ``pool_timeout``
    seconds from when they ask, while ``pool_size`` are under way (module docstring), instead
    of failing at once when a node has all its connections in use.
    """

    def __init__(self, *, pool_size: int, pool_timeout: float, **kwargs: Any) -> None:
        # Each node gets one connection more than commands can be under way: the slot map's
        # read (one at a time) during a full turn. No node ever runs out, whatever the routing.
        super().__init__(max_connections=pool_size + 1, **kwargs)
        self.pool_size = pool_size
        self.pool_timeout = pool_timeout
        self._turns = asyncio.Semaphore(pool_size)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self.pool_timeout):
                await self._turns.acquire()
        except TimeoutError:
            raise MaxConnectionsError("No connection available.") from None
        try:
            return await super().execute_command(*args, **kwargs)
        finally:
            self._turns.release()


def _cluster(url: str, pool_size: int, pool_timeout: float, common: dict[str, Any]) -> RedisCluster:
    parts = urlsplit(url)
    return BoundedCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in cluster_nodes(url)],
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        # common's retry is the cluster's: one quick retry, after the slot map is read again
        # (a failover, a moved slot).
        **common,
    )


async def check_eviction_policy(client: AnyRedis) -> None:
    """Refuse a Redis whose ``maxmemory-policy`` may evict any key (``allkeys-*``): it would
    evict the limiter's keys, which have no TTL so that ``volatile-*`` policies never pick them.
    On a cluster every primary is asked. Warns (and goes on) when the policy cannot be read:
    Redis down, or CONFIG not allowed. A Sentinel URL is checked first (``check_sentinel``).
    """
    await check_sentinel(client)
    try:
        if isinstance(client, RedisCluster):
            await client.initialize()
            replies = {
                node.name: await client.execute_command(
                    "CONFIG", "GET", "maxmemory-policy", target_nodes=node
                )
                for node in client.get_primaries()
            }
        else:
            replies = {"Redis": await client.config_get("maxmemory-policy")}
    except REDIS_FAILURES as exc:
        log.warning("cannot read Redis maxmemory-policy (%s); it must not be allkeys-*", exc)
        return
    for where, reply in replies.items():
        policy = _text(reply.get(b"maxmemory-policy", reply.get("maxmemory-policy", "")))
        if policy.startswith("allkeys-"):
            raise ConfigError(
                "redis.url",
                f"{where} maxmemory-policy is {policy}: it may evict the upstream limiter's "
                "keys and break the vendor's limit; use volatile-lru, volatile-lfu, "
                "volatile-ttl, volatile-random or noeviction (cache entries carry TTLs, the "
                "limiter's keys none)",
            )


CLUSTER_MIN_VERSION: Final = (7, 0)  # SSUBSCRIBE / SPUBLISH


async def check_server(client: AnyRedis) -> None:
    """The start-up checks: ``check_eviction_policy``, and on a cluster that every primary
    runs Redis 7.0 or later (sharded pub/sub). ConfigError for what cannot work; warns and
    goes on when Redis cannot be asked."""
    await check_eviction_policy(client)
    if not isinstance(client, RedisCluster):
        return
    try:
        versions = {
            node.name: (await client.info("server", target_nodes=node)).get("redis_version")
            for node in client.get_primaries()
        }
    except REDIS_FAILURES as exc:
        log.warning("cannot read the cluster's Redis versions (%s); 7.0 or later needed", exc)
        return
    for where, version in versions.items():
        if not version_at_least(_text(version), CLUSTER_MIN_VERSION):
            raise ConfigError(
                "redis.url",
                f"{where} runs Redis {version}: a cluster needs 7.0 or later (sharded pub/sub)",
            )


def version_at_least(version: str, least: tuple[int, ...]) -> bool:
    """``"7.0.15"`` against ``(7, 0)``; an unreadable version passes (not ours to judge)."""
    try:
        parts = tuple(int(p) for p in version.split(".")[: len(least)])
    except ValueError:
        return True
    return parts >= least


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
