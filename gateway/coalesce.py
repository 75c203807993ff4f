"""Identical in-flight misses share one upstream call.

``Coalescer.run(key, fetch)`` returns ``fetch()``'s result and whether this caller led.
The call runs in a task of its own, so the leader's caller going away does not cancel the
answer that followers are waiting for. When the last caller of a call has gone, the call is
cancelled (a call still queued for a permit then costs the upstream nothing). A failure is
handed to every waiter of that round; the next caller starts a new round.
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

    async def close(self) -> None:
        """Stop background work (at shutdown)."""
        ...


class _Call(Generic[T]):
    __slots__ = ("callers", "future")

    def __init__(self, future: asyncio.Future[T]) -> None:
        self.future = future
        self.callers = 0


class InProcessCoalescer(Generic[T]):
    def __init__(self) -> None:
        self._calls: dict[str, _Call[T]] = {}

    def waiting(self) -> int:
        return len(self._calls)

    async def close(self) -> None:
        """Nothing runs in the background; calls in progress finish or are cancelled."""

    async def run(self, key: str, fetch: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        call = self._calls.get(key)
        led = call is None
        if call is None:
            call = _Call(asyncio.ensure_future(fetch()))
            self._calls[key] = call
            call.future.add_done_callback(lambda done: self._forget(key, done))
        call.callers += 1
        try:
            return await asyncio.shield(call.future), led
        finally:
            call.callers -= 1
            if call.callers == 0 and not call.future.done():
                call.future.cancel()  # nobody is left to answer

    def _forget(self, key: str, future: asyncio.Future[T]) -> None:
        call = self._calls.get(key)
        if call is not None and call.future is future:
            del self._calls[key]
        if not future.cancelled():
            future.exception()  # retrieved: a failure no caller awaited is not "never retrieved"
