"""The fleet limiter that never fails open: global over Redis, a local share when Redis fails.

GLOBAL: permits come from ``RedisLimiter``. Any Redis failure (acquire, renewal, release,
subscription) switches to FALLBACK: one warning, ``on_degraded(True)``, no caller touches
Redis any more, one probe task pings it every ``probe_s``. This replica then grants at most
``max(1, max_concurrent // replicas)`` in flight and starts per window: the shares add up.

Way down: permits granted before the failure, to any replica, are invisible now but end within
the upstream timeout, which ``lease_s`` outlives; so local grants begin ``settle_s`` (default
``max(lease_s, window_s)``) after the failure was noticed, callers queue meanwhile (same
bounds), and this replica's global permits still held count against its share.
Way up: once a ping succeeds local grants stop (RECOVERING); held local permits (as leases) and
local starts within the window are registered (``RedisLimiter.adopt``), which sets the fleet's
gate at the first adopter's Redis time + ``probe_s + window_s``. Redis grants nothing before
it, so replicas still on their share notice and adopt first, and one that never noticed the
outage waits too. Then GLOBAL: queued callers move to Redis, ``on_degraded(False)``, one info
line. A local permit is released locally and its adopted lease in Redis (else it would hold a
global slot for ``lease_s``). A caller keeps its deadline across a switch.

Starts count from when they are sent (``Permit.sent()``), as in every limiter. Local permits
keep theirs on the local budget. A global permit still unsent counts as a pending start of the
local window too (it may go out during an outage, unseen by Redis); one sent or released
outside GLOBAL is recorded locally. Adoption carries each start's age, or "not sent yet" for a
pending one, which the permit's ``sent()`` (or release) then records in Redis.

Limitation: a replica cut off from Redis while the others reach it keeps its local share while
they use the whole budget; the limit holds only if such a partition lasts under ``settle_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from gateway.clock import Clock, Rearm
from gateway.errors import BackendUnavailable, QueueFull, QueueTimeout
from gateway.limiter import LimiterSnapshot, Permit, WindowBudget
from gateway.limiter_redis import RedisLimiter, RedisPermit

log = logging.getLogger("gateway.limiter")


class Mode(enum.Enum):
    GLOBAL = "global"
    FALLBACK = "fallback"
    RECOVERING = "recovering"  # Redis answers again; registering local permits


@dataclass(eq=False)
class FailoverPermit:
    """A permit of either kind; ``sent()`` records its start (once) where it belongs."""

    owner: FailoverLimiter
    name: str
    shared: RedisPermit | None  # None: a local permit
    pending: bool = field(default=True, init=False)

    async def sent(self) -> None:
        self.owner._record(self)
        if self.shared is not None and self.owner.mode is Mode.GLOBAL:
            await self.shared.sent()  # outside GLOBAL, adoption carries the local record


class FailoverLimiter:
    """``Limiter`` over Redis that falls back to a local share instead of failing open.

    ``permit()`` raises ``QueueFull``/``QueueTimeout`` as any limiter, never
    ``BackendUnavailable`` for a Redis outage (only once closed). ``on_error`` is called once
    per failed Redis call; ``on_degraded`` with True/False when leaving/regaining GLOBAL.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        max_concurrent: int,
        window_s: float,
        max_queue: int,
        max_wait_s: float,
        lease_s: float,
        clock: Clock,
        replicas: int = 1,
        probe_s: float = 0.5,
        settle_s: float | None = None,
        namespace: str = "isales:v1",
        on_error: Callable[[], None] = lambda: None,
        on_degraded: Callable[[bool], None] = lambda degraded: None,
    ) -> None:
        self.shared = RedisLimiter(
            client,
            max_concurrent=max_concurrent,
            window_s=window_s,
            max_queue=max_queue,
            max_wait_s=max_wait_s,
            lease_s=lease_s,
            clock=clock,
            namespace=namespace,
            on_failure=self._failed,
        )
        self._budget = WindowBudget(max(1, max_concurrent // replicas), window_s)
        self._window = window_s
        self._max_queue = max_queue
        self._max_wait = max_wait_s
        self._probe_s = probe_s
        # Until every unseen global permit has ended and left the window.
        self._settle_s = max(lease_s, window_s) if settle_s is None else settle_s
        self._clock = clock
        self._on_error = on_error
        self._on_degraded = on_degraded
        self._mode = Mode.GLOBAL
        self._epoch = 0  # bumped on every fall: a recovery begun before it is void
        self._settled_at = 0.0
        self._waiters: deque[asyncio.Future[str | None]] = deque()  # None: go global
        self._names = (f"{uuid.uuid4().hex}:local:{n}" for n in itertools.count())
        self._held: set[str] = set()
        self._recent: deque[tuple[float, str]] = deque()  # starts recorded here, by time sent
        self._unsent: dict[str, FailoverPermit] = {}  # granted, start pending (both kinds)
        self._adopted: set[str] = set()
        self._timer = Rearm(clock, self._serve)
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def mode(self) -> Mode:
        return self._mode

    def snapshot(self) -> LimiterSnapshot:
        shared = self.shared.snapshot()
        queued = sum(not w.done() for w in self._waiters)
        return LimiterSnapshot(shared.in_flight + self._budget.in_flight, shared.queued + queued)

    async def close(self) -> None:
        """Stop probing, fail local waiters, close the Redis limiter (releasing its leases)."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        self._timer.cancel()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("The limiter is closed."))
        await self.shared.close()

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[Permit]:
        async with AsyncExitStack() as stack:
            stack.callback(self._serve)  # runs last: a release in either mode may let one in
            permit = await self._enter(stack)
            self._unsent[permit.name] = permit
            stack.callback(self._record, permit)  # never sent: counts from its release
            yield permit

    async def _enter(self, stack: AsyncExitStack) -> FailoverPermit:
        deadline = self._clock.monotonic() + self._max_wait
        moved = False  # admitted once already: keeps its deadline, skips the length bound
        while not self._closed:
            if self._mode is Mode.GLOBAL:
                with contextlib.suppress(BackendUnavailable):  # the hook has fallen back
                    shared = await self._enter_global(stack, deadline if moved else None)
                    return FailoverPermit(self, shared.lease, shared)
            elif (name := await self._acquire_local(deadline, moved)) is not None:
                stack.callback(self._release_local, name)
                return FailoverPermit(self, name, None)
            moved = True
        raise BackendUnavailable("The limiter is closed.")

    async def _enter_global(self, stack: AsyncExitStack, deadline: float | None) -> RedisPermit:
        if deadline is None:
            return await stack.enter_async_context(self.shared.permit())
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock.monotonic())):
                return await stack.enter_async_context(self.shared.permit())
        except TimeoutError:
            raise QueueTimeout(self._budget.retry_after(0)) from None

    def _record(self, permit: FailoverPermit) -> None:
        """``permit``'s start went out now (or it is released unsent): count it from now."""
        if not permit.pending:
            return
        permit.pending = False
        self._unsent.pop(permit.name, None)
        local = permit.shared is None
        if not local and self._mode is Mode.GLOBAL:
            return  # Redis has it; a fall now waits ``settle_s``, longer than a window
        now = self._clock.monotonic()
        if local:
            self._budget.sent(now)
        else:
            self._budget.record(now)
        self._recent.append((now, permit.name))
        while self._recent[0][0] <= now - self._window:
            self._recent.popleft()
        if local and permit.name in self._adopted:
            self.shared.record_sent_later(permit.name)
        self._serve()  # a pending start now leaves the window at a known time

    async def _acquire_local(self, deadline: float, admitted: bool) -> str | None:
        ahead = len(self._waiters) + self.shared.snapshot().queued
        if not admitted and ahead >= self._max_queue:
            raise QueueFull(self._retry_after(ahead))
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        left = deadline - self._clock.monotonic()
        timer = self._clock.call_later(left, lambda: self._expire(waiter))
        self._serve()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                name = waiter.result()
                if name is not None:  # granted in the tick the caller went away
                    self._record(FailoverPermit(self, name, None))
                    self._release_local(name)
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            self._serve()
            raise
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future[str | None]) -> None:
        if not waiter.done():
            ahead = self._waiters.index(waiter) if waiter in self._waiters else 0
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            waiter.set_exception(QueueTimeout(self._retry_after(ahead)))

    def _retry_after(self, ahead: int) -> float:
        settling = max(0.0, self._settled_at - self._clock.monotonic())
        return settling + self._budget.retry_after(ahead)

    def _release_local(self, name: str) -> None:
        self._budget.finish()
        self._held.discard(name)
        if name in self._adopted and not self._closed:
            self._adopted.discard(name)
            # Its start again at release: ``record_sent_later`` may have run before ``adopt``.
            self.shared.forget(name, record_start=True)

    def _serve(self) -> None:
        """Grant local permits to the head of the queue, or move it to Redis in GLOBAL."""
        while self._waiters:
            if self._waiters[0].done():
                self._waiters.popleft()  # expired or cancelled
                continue
            if self._mode is Mode.GLOBAL:
                self._waiters.popleft().set_result(None)
                continue
            if self._mode is Mode.RECOVERING:
                return
            now = self._clock.monotonic()
            busy = self._budget.in_flight + self.shared.snapshot().in_flight
            unsent_global = sum(p.shared is not None for p in self._unsent.values())
            delay = max(self._settled_at - now, self._budget.delay(now, unsent_global))
            if busy >= self._budget.max_concurrent or delay > 0:
                if delay > 0 and delay != math.inf:
                    self._timer.arm(now + delay)
                return
            name = next(self._names)
            self._budget.grant()
            self._held.add(name)
            self._waiters.popleft().set_result(name)

    def _failed(self, exc: BackendUnavailable) -> None:
        """Every Redis failure, from any call of the Redis limiter, lands here."""
        self._on_error()
        if self._closed or self._mode is Mode.FALLBACK:
            return
        if self._mode is Mode.GLOBAL:
            share, cause = self._budget.max_concurrent, exc.__cause__ or exc
            log.warning("limiter: Redis unavailable (%s); local limit %d", cause, share)
            self._on_degraded(True)
        self._mode = Mode.FALLBACK
        self._epoch += 1
        self._settled_at = self._clock.monotonic() + self._settle_s
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())
        self._serve()

    async def _recover(self) -> None:
        """The one probe: ping every ``probe_s``; once Redis answers, hand over to it."""
        while not self._closed and self._mode is not Mode.GLOBAL:
            await self._clock.sleep(self._probe_s)
            epoch = self._epoch
            try:
                await self.shared.ping()
                self._mode = Mode.RECOVERING  # no local grant from now on
                now = self._clock.monotonic()
                held = sorted(self._held)
                starts: list[tuple[str, float | None]]
                starts = [(n, now - t) for t, n in self._recent if t > now - self._window]
                starts += [(name, None) for name in self._unsent]
                self._adopted.update(held)
                await self.shared.adopt(held, starts, hold_s=self._probe_s + self._window)
            except BackendUnavailable:
                continue  # the hook counted it (and fell back again if it was recovering)
            if epoch == self._epoch:
                self._mode = Mode.GLOBAL
                log.info("limiter: Redis is back; global limit again")
                self._on_degraded(False)
                self._serve()
