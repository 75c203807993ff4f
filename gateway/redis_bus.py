"""Redis pub/sub for every listener of the gateway: one subscription loop, one publish.

The cache tier (invalidations), the coalescer (outcomes) and the limiter (releases) each keep
one subscription that must survive Redis restarts, failovers and stalled links. ``listen``
is that loop, written once: subscribe, wait for the confirmation, hand every message to the
listener, PING when quiet (a link that stalls shows as silence: ``Subscription.heard`` stops
moving, and a user such as the cache tier stops trusting it), and on any failure drop the
connection, report the loss, pause ``RETRY_S`` and start over on a fresh connection. A
listener learns what it may rely on from ``Subscription.live`` and ``heard_within``;
messages published while it was not subscribed are lost (pub/sub keeps nothing), so every
user also has a way to catch up that does not rest on them.

Redis shapes. Standalone and Sentinel: PUBLISH / SUBSCRIBE through the shared client (pub/sub
ignores the DB number: channels carry the namespace). Redis Cluster (``RedisCluster``):
sharded pub/sub, SPUBLISH / SSUBSCRIBE, on a connection of its own to the primary that owns
the channel's slot, found anew at every (re)subscription, so a failover or a resharding moves
the subscription with the slot. A script may PUBLISH only on a standalone Redis: on a cluster
a script's SPUBLISH must name a channel in the slot of the script's keys, so there the caller
publishes after the script (``bus.in_scripts`` says which). A subscription can ask for the
classic kind on a cluster (``sharded=False``) for a channel that a script PUBLISHes: such
messages reach every node of a cluster, the channel's slot owner included.

Failures are Redis's own exceptions here, reported as ``BackendUnavailable`` (from them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from typing import Final

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import SlotNotCoveredError

from gateway.clock import Clock
from gateway.errors import BackendUnavailable
from gateway.redis_client import REDIS_FAILURES, AnyRedis

log = logging.getLogger("gateway.redis")

READ_S: Final = 1.0  # a read's bound, and the PING interval when quiet; messages wake at once
CONFIRM_S: Final = 5.0  # the longest a (re)subscription may take to be confirmed
RETRY_S: Final = 1.0  # the pause before subscribing again after a loss
_CLOSE_RETRY_S: Final = 0.5  # how long close() waits before cancelling again

_NODE_KWARGS: Final = frozenset(
    {"username", "password", "credential_provider", "socket_timeout", "socket_connect_timeout"}
    | {"client_name", "socket_keepalive", "socket_keepalive_options"}
)

OnMessage = Callable[[bytes], None]
OnLost = Callable[[BackendUnavailable], None]


class Subscription:
    """One channel listened to in the background (``RedisBus.subscribe``); ``close`` ends it."""

    def __init__(
        self,
        bus: RedisBus,
        channel: str,
        on_message: OnMessage,
        *,
        on_lost: OnLost | None = None,
        sharded: bool | None = None,
    ) -> None:
        self.channel = channel
        self.live = False  # subscribed, confirmed, and not yet known to be lost
        self.heard = -math.inf  # monotonic time the subscription last heard from Redis
        self._bus = bus
        self._changed = asyncio.Event()
        listening = bus.listen(channel, on_message, on_lost=on_lost, sharded=sharded, state=self)
        self._task = asyncio.create_task(listening)

    def heard_within(self, seconds: float) -> bool:
        """Live, and heard from (a message, a confirmation, a pong) in the last ``seconds``."""
        return self.live and self._bus.clock.monotonic() - self.heard <= seconds

    async def ready(self, within: float) -> None:
        """Return once live; ``BackendUnavailable`` if not within ``within`` seconds."""
        try:
            async with asyncio.timeout(within):
                while not self.live:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError as exc:
            raise BackendUnavailable(f"Redis unavailable (subscribe {self.channel}).") from exc

    def _set(self, live: bool) -> None:
        self.live = live
        if live:
            self.heard = self._bus.clock.monotonic()
        self._changed.set()

    async def close(self) -> None:
        """End the subscription; cancelled again until it has ended, since a cancellation can
        be lost inside redis-py (``_honour_cancellation``; and on Python 3.11 a ``wait_for``
        in its connect loses one that lands as the connection completes, CPython gh-86296)."""
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=_CLOSE_RETRY_S)
        self.live = False


class RedisBus:
    """Publishing and subscribing on the channels of one Redis (standalone, Sentinel or
    Cluster: ``client``'s type decides). The client must return bytes."""

    def __init__(self, client: AnyRedis, *, clock: Clock) -> None:
        self.client = client
        self.clock = clock
        self.cluster = isinstance(client, RedisCluster)

    @property
    def in_scripts(self) -> bool:
        """True where a script may publish on a namespace's channels itself (not a cluster)."""
        return not self.cluster

    async def publish(self, channel: str, message: bytes | str) -> None:
        """PUBLISH (SPUBLISH on a cluster); ``BackendUnavailable`` when Redis fails."""
        try:
            if self.cluster:
                await self.client.execute_command("SPUBLISH", channel, message)
            else:
                await self.client.publish(channel, message)
        except REDIS_FAILURES as exc:
            raise BackendUnavailable(f"Redis unavailable (publish {channel}).") from exc

    def subscribe(
        self,
        channel: str,
        on_message: OnMessage,
        *,
        on_lost: OnLost | None = None,
        sharded: bool | None = None,
    ) -> Subscription:
        """``listen`` in a task of its own, until ``Subscription.close``."""
        return Subscription(self, channel, on_message, on_lost=on_lost, sharded=sharded)

    async def listen(
        self,
        channel: str,
        on_message: OnMessage,
        *,
        on_lost: OnLost | None = None,
        sharded: bool | None = None,
        state: Subscription | None = None,
    ) -> None:
        """Call ``on_message`` with each message's data until cancelled (see the module doc).

        ``on_lost`` is called after each loss of a confirmed subscription and each failed
        attempt. ``sharded``: SSUBSCRIBE (default: on a cluster) or SUBSCRIBE.
        """
        sharded = self.cluster if sharded is None else sharded
        fresh_map = False
        while True:
            node: aioredis.Redis | None = None
            pubsub: PubSub | None = None
            try:
                node, pubsub = await self._open(channel, fresh_map)
                fresh_map = False
                await self._subscribe(pubsub, channel, sharded)
                if state is not None:
                    state._set(True)
                await self._read(pubsub, on_message, state)
            except (*REDIS_FAILURES, TimeoutError) as exc:
                fresh_map = True  # the slot's owner may have changed (failover, resharding)
                lost = BackendUnavailable(f"Redis unavailable (listen {channel}).")
                lost.__cause__ = exc
                if state is not None:
                    state._set(False)
                if on_lost is not None:
                    on_lost(lost)
            finally:
                if state is not None:
                    state.live = False
                with contextlib.suppress(*REDIS_FAILURES):
                    if pubsub is not None:
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
                    if node is not None:
                        await node.aclose()
            await self.clock.sleep(RETRY_S)

    async def _open(self, channel: str, fresh_map: bool) -> tuple[aioredis.Redis | None, PubSub]:
        """A pub/sub connection for ``channel`` (and the node client to close with it);
        ``fresh_map``: read the cluster's slot map again first."""
        client = self.client
        if not isinstance(client, RedisCluster):
            return None, client.pubsub()
        await client.initialize()  # the slot map; a no-op once known
        if fresh_map:
            await client.nodes_manager.initialize()
        owner = client.get_node_from_key(channel)
        if owner is None:
            raise SlotNotCoveredError(f"no node owns the slot of {channel}")
        # The cluster's credentials and time budgets; no retries: this loop is the retry.
        kwargs = {k: v for k, v in owner.connection_kwargs.items() if k in _NODE_KWARGS}
        node = aioredis.Redis(host=owner.host, port=int(owner.port), **kwargs)
        return node, node.pubsub()

    async def _subscribe(self, pubsub: PubSub, channel: str, sharded: bool) -> None:
        if sharded:
            await pubsub.ssubscribe(channel)
        else:
            await pubsub.subscribe(channel)
        async with asyncio.timeout(CONFIRM_S):
            while (await pubsub.get_message(timeout=READ_S)) is None:
                pass  # the first reply on a fresh connection is the confirmation

    async def _read(
        self, pubsub: PubSub, on_message: OnMessage, state: Subscription | None
    ) -> None:
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=READ_S)
            _honour_cancellation()
            if not pubsub.subscribed:  # the server dropped it (a slot moved): start over
                raise RedisConnectionError("unsubscribed by the server")
            if message is None:
                # Silence: ask, so a link that stalls shows as silence, not as peace.
                await pubsub.ping()
                _honour_cancellation()
                continue
            if state is not None:
                state.heard = self.clock.monotonic()
            if message.get("type") in ("message", "smessage"):
                data = message.get("data")
                if isinstance(data, bytes):
                    try:
                        on_message(data)
                    except Exception:  # a listener's bug must not end everyone's wake-ups
                        log.exception("pub/sub: a listener failed on a message; going on")


def _honour_cancellation() -> None:
    """Raise ``CancelledError`` if this task was asked to stop. redis-py 8.1's ``PubSub``
    (seen in ``ping()``) can swallow the cancellation that ``Subscription.close`` sends; the
    loop then went on reading and ``close`` never returned."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
