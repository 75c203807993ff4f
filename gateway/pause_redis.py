"""``UpstreamPause`` for a fleet: one Redis key holds the moment the pause ends.

The key ``<namespace>:upstream:pause`` holds that moment (epoch seconds on the replicas' clocks,
which NTP keeps within far less than any pause) and expires with it (``PX``), so Redis never
keeps a stale pause. A script sets it only if it ends later than the pause in force.

Each replica also remembers the latest pause it knows of. Redis failing never shortens a pause
this replica saw, and never stops a request: it then goes by its own memory only (a pause is
a courtesy to the vendor; the limiter alone keeps the vendor's limit).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

from gateway.clock import Clock
from gateway.redis_client import REDIS_FAILURES, AnyRedis
from gateway.settings import DEFAULT_NAMESPACE

log = logging.getLogger("gateway.pause")


def pause_key(namespace: str) -> str:
    return f"{namespace}:upstream:pause"


PAUSE_KEY = pause_key(DEFAULT_NAMESPACE)
# KEYS[1] the pause; ARGV[1] its new end (epoch seconds), ARGV[2] its life in ms.
_EXTEND = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""


class RedisPause:
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

    async def pause(self, seconds: float) -> None:
        until = self._clock.time() + seconds
        self._until = max(self._until, until)
        life_ms = max(1, math.ceil(seconds * 1000))
        try:
            await self._extend(keys=[self._key], args=[repr(until), life_ms])
        except REDIS_FAILURES:
            self._failed("set")

    async def remaining(self) -> float:
        now = self._clock.time()
        if self._until > now:
            return self._until - now  # known here: no round trip
        try:
            value = await self._redis.get(self._key)
        except REDIS_FAILURES:
            self._failed("read")
            return 0.0
        try:
            until = float(value) if value is not None else 0.0
        except ValueError:
            return 0.0  # not ours: never a reason to stop calling
        if not math.isfinite(until):
            return 0.0
        self._until = max(self._until, until)
        return max(0.0, until - now)

    async def close(self) -> None:
        """The client belongs to the app."""

    def _failed(self, what: str) -> None:
        log.debug("Redis failed to %s the upstream pause; going by this replica's", what)
        if self._on_error is not None:
            self._on_error()
