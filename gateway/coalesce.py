"""Identical in-flight misses share one upstream call.

``Coalescer.run(key, fetch)`` returns ``fetch()``'s result and whether this caller led.
The call runs in a task of its own, so a leader whose client goes away does not cancel the
answer the followers (and the cache) are waiting for. A failure is handed to every waiter of
that round; the next caller starts a new round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class Coalescer(Protocol[T]):
    async def run(self, key: str, fetch: Callable[[], Awaitable[T]]) -> tuple[T, bool]: ...

    def waiting(self) -> int:
        """Calls in progress in this process (for metrics)."""
        ...


class InProcessCoalescer(Generic[T]):
    def __init__(self) -> None:
        self._calls: dict[str, asyncio.Future[T]] = {}

    def waiting(self) -> int:
        return len(self._calls)

    async def run(self, key: str, fetch: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        call = self._calls.get(key)
        if call is not None:
            return await asyncio.shield(call), False
        call = asyncio.ensure_future(fetch())
        self._calls[key] = call
        call.add_done_callback(lambda done: self._forget(key, done))
        return await asyncio.shield(call), True

    def _forget(self, key: str, call: asyncio.Future[T]) -> None:
        if self._calls.get(key) is call:
            del self._calls[key]
        if not call.cancelled():
            call.exception()  # retrieved: a failure no follower awaited is not "never retrieved"
