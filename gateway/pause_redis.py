"""``UpstreamPause`` for a fleet: one Redis key holds the moment the pause ends, and one
channel tells every replica when it moves.

The key ``<namespace>:upstream:pause`` holds that moment (epoch seconds on the replicas' clocks,
which NTP keeps within far less than any pause) and expires with it (``PX``), so Redis never
keeps a stale pause. A script sets it only if it ends later than the pause in force, and then
publishes the new end on ``<namespace>:upstream:pause`` (the channel; on a cluster the
replica publishes right after the script, ``redis_bus``).

Each replica keeps the latest end it knows of, and ``remaining()`` answers from it without a
round trip while its subscription (``redis_bus``) is trusted: live, heard from within
``SILENCE_S``, and the key read once since it was (re)confirmed, so a pause published while
it was down is caught up on. Otherwise ``remaining()`` reads the key, as a replica without a
subscription must. Redis failing never shortens a pause this replica saw, and never stops a
request: it then goes by its own memory only (a pause is a courtesy to the vendor; the limiter
alone keeps the vendor's limit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Final

from gateway.clock import Clock
from gateway.errors import BackendUnavailable
from gateway.redis_bus import RedisBus, Subscription
from gateway.redis_client import REDIS_FAILURES, AnyRedis
from gateway.settings import DEFAULT_NAMESPACE

log = logging.getLogger("gateway.pause")

# The subscription is trusted only if heard from (a message or the answer to its own PING,
# sent every second) this recently: a stalled link shows as silence.
SILENCE_S: Final = 3.0


def pause_key(namespace: str) -> str:
    """The key of a namespace's pause, and the channel its new ends are published on."""
    return f"{namespace}:upstream:pause"


PAUSE_KEY = pause_key(DEFAULT_NAMESPACE)
# KEYS[1] the pause; ARGV[1] its new end (epoch seconds), ARGV[2] its life in ms, ARGV[3] the
# channel to publish the new end on ("": the caller publishes).
_EXTEND = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[1]) end
  return 1
end
return 0
"""


def parse_end(value: object) -> float | None:
    """The pause's end that a stored or published ``value`` holds; None if it holds none."""
    if not isinstance(value, bytes | str):
        return None
    try:
        until = float(value)
    except ValueError:
        return None  # not ours: never a reason to stop calling
    return until if math.isfinite(until) else None


class RedisPause:
    """``UpstreamPause`` shared through Redis (see the module doc); ``close`` ends the
    subscription, which starts with the first ``remaining``."""

    def __init__(
        self,
        client: AnyRedis,
        *,
        clock: Clock,
        on_error: Callable[[], None] | None = None,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        self._redis = client
        self._key = pause_key(namespace)
        self._clock = clock
        self._on_error = on_error
        self._until = 0.0  # the latest end this replica knows of
        self._extend = client.register_script(_EXTEND)
        self._bus = RedisBus(client, clock=clock)
        self._listener: Subscription | None = None
        self._closed = False
        self._synced = False  # the key was read since the subscription was last confirmed
        self._losses = 0  # subscriptions lost so far: a read that spans one proves nothing

    @property
    def subscribed(self) -> bool:
        """True while the subscription is confirmed (it may not be caught up yet)."""
        return self._listener is not None and self._listener.live

    @property
    def trusted(self) -> bool:
        """True while this replica hears every new pause (no read needed)."""
        listener = self._listener
        return self._synced and listener is not None and listener.heard_within(SILENCE_S)

    async def pause(self, seconds: float) -> None:
        until = self._clock.time() + seconds
        self._until = max(self._until, until)
        life_ms = max(1, math.ceil(seconds * 1000))
        channel = self._key if self._bus.in_scripts else ""
        try:
            extended = await self._extend(keys=[self._key], args=[repr(until), life_ms, channel])
            if extended and not channel:
                await self._bus.publish(self._key, repr(until))
        except REDIS_FAILURES:
            self._failed("set")
        except BackendUnavailable:
            self._failed("publish")

    async def remaining(self) -> float:
        now = self._clock.time()
        if self._until > now:
            return self._until - now  # known here: no round trip
        self._listen()
        if self.trusted:
            return 0.0  # a pause set elsewhere would have been heard
        listener, losses = self._listener, self._losses
        confirmed = listener is not None and listener.live  # before the read: see _heard
        try:
            value = await self._redis.get(self._key)
        except REDIS_FAILURES:
            self._failed("read")
            return 0.0
        if confirmed and losses == self._losses and listener is self._listener:
            # Subscribed before the read: a pause set after it is published to us.
            self._synced = True
        until = parse_end(value)
        if until is None:
            return 0.0
        self._until = max(self._until, until)
        return max(0.0, until - now)

    async def close(self) -> None:
        self._closed = True
        self._synced = False
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    def _listen(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = self._bus.subscribe(self._key, self._heard, on_lost=self._lost)

    def _heard(self, data: bytes) -> None:
        until = parse_end(data)
        if until is not None:
            self._until = max(self._until, until)

    def _lost(self, exc: BackendUnavailable) -> None:
        log.debug("upstream pause: subscription lost (%s); reading the key until it is back", exc)
        self._losses += 1
        self._synced = False

    def _failed(self, what: str) -> None:
        log.debug("Redis failed to %s the upstream pause; going by this replica's", what)
        if self._on_error is not None:
            self._on_error()
