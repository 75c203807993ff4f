"""The fleet limiter that never fails open: global over Redis, a local share when Redis fails.

GLOBAL: permits come from ``RedisLimiter``, which claims this replica's membership by
heartbeat. Any Redis failure (acquire, heartbeat, release, subscription, a write refused)
switches to FALLBACK: one warning, ``on_degraded(True)``, no caller touches Redis any more, no
heartbeat is sent (a heartbeat claims membership), and one probe task tries a write every
``probe_s``. This replica then grants at most ``share = max_concurrent // replicas`` in flight
and starts per window; the fleet sets that share aside for every replica it does not hear
from, so the shares add up, whether all replicas are cut off or one alone.

Way down: local grants begin ``settle_s`` after the latest membership claim was sent, when the
fleet surely counts this replica as gone and every permit it granted out of the full budget
meanwhile has ended and left the window (``settle_time``). A failed probe is no claim and
never postpones it. Permits granted before the fall keep counting: global ones still held
count against the share, and a global permit still unsent counts as a pending local start.
Way up: once a probe's write succeeds (RECOVERING) local grants stop; once the local permits
have ended and their starts left the window, a heartbeat claims membership again and queued
callers move to Redis (GLOBAL, ``on_degraded(False)``, one info line). If that claim fails,
FALLBACK again, settling from that claim. A caller keeps its deadline across a switch.
A global permit granted ahead of the window's edge (``limit.grant_ahead_s``) is held until it,
as the Redis limiter's own would be; the local share grants nothing ahead (a fallback is rare).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from gateway.clock import Clock, Rearm
from gateway.errors import BackendUnavailable, QueueFull, QueueTimeout
from gateway.limiter.memory import WindowBudget, hold_until, still_waiting
from gateway.limiter.protocol import (
    ANONYMOUS,
    FleetLimiter,
    FleetPermit,
    FleetTimings,
    LimitConfig,
    LimiterSnapshot,
    Permit,
    shutting_down,
)
from gateway.limiter.redis_limiter import RedisLimiter
from gateway.limiter.scheduler import FairScheduler, Turn
from gateway.redis_client import AnyRedis

log = logging.getLogger("gateway.limiter")


def settle_time(timings: FleetTimings, window_s: float) -> float:
    """Seconds from sending the latest membership claim until a cut-off replica may grant.

    The claim may still be applied ``claim_s`` (plus ``skew_s`` between the clocks) after it was
    sent; the fleet counts the replica a member ``member_s`` past that and may grant out of
    the full budget until then; each such permit ends within ``lease_s`` and its start leaves
    the window ``window_s`` later.
    """
    t = timings
    return t.claim_s + t.skew_s + t.member_s + t.lease_s + window_s


class Mode(enum.Enum):
    GLOBAL = "global"
    FALLBACK = "fallback"
    RECOVERING = "recovering"  # Redis takes writes again; local permits draining


@dataclass(eq=False)
class FailoverPermit:
    """A permit of either kind; ``sent()`` records its start (once) where it belongs."""

    owner: FailoverLimiter
    name: str
    shared: FleetPermit | None  # None: a local permit
    pending: bool = field(default=True, init=False)

    def check(self) -> None:
        if self.shared is not None:
            self.shared.check()

    async def sent(self) -> None:
        # Granted ahead of the window's edge: held until it, then checked again.
        shared = self.shared
        if shared is not None and await hold_until(self.owner.clock, shared.not_before):
            shared.check()
        self.owner._record(self)
        if self.shared is not None and self.owner.mode is Mode.GLOBAL:
            await self.shared.sent()  # outside GLOBAL it stays pending in Redis: the safe side


class FailoverLimiter:
    """``Limiter`` over Redis that falls back to a local share instead of failing open.

    ``permit()`` raises ``QueueFull``/``QueueTimeout`` as any limiter, never
    ``BackendUnavailable`` for a Redis outage (only once closed). ``on_error`` is called once
    per failed Redis call; ``on_degraded`` with True/False when leaving/regaining GLOBAL.
    The ``RedisLimiter`` it wraps gets the same ``limit`` and ``timings``, and ``limit.share``.
    """

    def __init__(
        self,
        client: AnyRedis,
        limit: LimitConfig,
        timings: FleetTimings,
        *,
        clock: Clock,
        probe_s: float = 0.5,
        namespace: str = "isales:v1",
        on_error: Callable[[], None] = lambda: None,
        on_degraded: Callable[[bool], None] = lambda degraded: None,
    ) -> None:
        share = limit.share
        # Used only through ``FleetLimiter``: what this class needs of it, declared.
        self.shared: FleetLimiter = RedisLimiter(
            client,
            limit,
            timings,
            clock=clock,
            share=share,
            namespace=namespace,
            on_failure=self._failed,
        )
        self._budget = WindowBudget(share, limit.window_s)
        # The local queue, while Redis cannot decide: the same fair rule, on this share.
        self._queue: FairScheduler[asyncio.Future[str | None]] = FairScheduler(
            budget=share,
            window_s=limit.window_s,
            max_queue=limit.max_queue,
            policy=limit.policy,
            background_max=min(limit.background_max, share),
        )
        self._window = limit.window_s
        self._max_wait = limit.max_wait_s
        self._probe_s = probe_s
        self.settle_s = settle_time(timings, limit.window_s)
        self._clock = self.clock = clock
        self._on_error = on_error
        self._on_degraded = on_degraded
        self._mode = Mode.GLOBAL
        self._local_from = math.inf  # FALLBACK: local grants from this monotonic time
        # Local waiters, by (caller, background); a waiter's result None means: go global.
        self._waiters: dict[asyncio.Future[str | None], tuple[str, bool]] = {}
        self._names = (f"{uuid.uuid4().hex}:local:{n}" for n in itertools.count())
        self._last_local_start = -math.inf
        self._unsent: dict[str, FailoverPermit] = {}  # granted, start pending (both kinds)
        self._timer = Rearm(clock, self._serve)
        self._probe: asyncio.Task[None] | None = None
        self._closed = False
        self._shedding = False

    @property
    def mode(self) -> Mode:
        return self._mode

    def start(self) -> None:
        """Claim membership now, so a Redis down at start-up shows at once."""
        self.shared.start()

    def snapshot(self) -> LimiterSnapshot:
        shared = self.shared.snapshot()
        by_caller = dict(shared.queued_by_caller)
        for caller, count in self._queue.queued_by_caller().items():
            by_caller[caller] = by_caller.get(caller, 0) + count
        known = self._mode is Mode.GLOBAL  # cut off, the fleet's count is not known here
        return LimiterSnapshot(
            shared.in_flight + self._budget.in_flight,
            shared.queued + self._queue.queued(),
            by_caller,
            fleet_in_flight=shared.fleet_in_flight if known else None,
            fleet_starts=shared.fleet_starts if known else None,
        )

    def shed(self) -> None:
        self._shedding = True
        self.shared.shed()
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            self._queue.leave(waiter)
            if not waiter.done():
                waiter.set_exception(shutting_down())

    async def close(self) -> None:
        """Stop probing, fail local waiters, close the Redis limiter."""
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        self._timer.cancel()
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            self._queue.leave(waiter)
            if not waiter.done():
                waiter.set_exception(BackendUnavailable("The limiter is closed."))
        await self.shared.close()

    @asynccontextmanager
    async def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AsyncIterator[Permit]:
        self.start()
        async with AsyncExitStack() as stack:
            stack.callback(self._serve)  # runs last: a release in either mode may let one in
            permit = await self._enter(stack, caller, background)
            self._unsent[permit.name] = permit
            stack.callback(self._record, permit)  # never sent: counts from its release
            yield permit

    async def _enter(self, stack: AsyncExitStack, caller: str, background: bool) -> FailoverPermit:
        if self._shedding:
            raise shutting_down()
        deadline = self._clock.monotonic() + self._max_wait
        moved = False  # admitted once already: keeps its deadline
        while not self._closed:
            if self._mode is Mode.GLOBAL:
                with contextlib.suppress(BackendUnavailable):  # the hook has fallen back
                    shared = await self._enter_global(
                        stack, deadline if moved else None, caller, background
                    )
                    return FailoverPermit(self, shared.lease, shared)
            elif (name := await self._acquire_local(deadline, caller, background)) is not None:
                stack.callback(self._release_local, caller, background)
                return FailoverPermit(self, name, None)
            moved = True
        raise BackendUnavailable("The limiter is closed.")

    async def _enter_global(
        self, stack: AsyncExitStack, deadline: float | None, caller: str, background: bool
    ) -> FleetPermit:
        permit = self.shared.permit(caller, background=background)
        if deadline is None:
            return await stack.enter_async_context(permit)
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock.monotonic())):
                return await stack.enter_async_context(permit)
        except TimeoutError:
            raise QueueTimeout(self._queue.retry_after(caller)) from None

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
        if permit.shared is not None:  # released unsent: it could not go out before its edge
            now = max(now, permit.shared.not_before)
        if local:
            self._budget.sent(now)
        else:
            self._budget.record(now)
        self._last_local_start = now
        self._serve()  # a pending start now leaves the window at a known time

    async def _acquire_local(self, deadline: float, caller: str, background: bool) -> str | None:
        waiter: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        try:
            self._queue.join(caller, waiter, background=background)
        except QueueFull as full:
            raise QueueFull(self._settling() + full.retry_after) from None
        self._waiters[waiter] = (caller, background)
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
                    self._release_local(caller, background)
            self._leave(waiter)
            self._serve()
            raise
        finally:
            timer.cancel()

    def _leave(self, waiter: asyncio.Future[str | None]) -> None:
        self._waiters.pop(waiter, None)
        self._queue.leave(waiter)

    def _expire(self, waiter: asyncio.Future[str | None]) -> None:
        if not waiter.done():
            caller, _ = self._waiters.get(waiter, (ANONYMOUS, False))
            retry_after = self._settling() + self._queue.retry_after(caller)
            self._leave(waiter)
            waiter.set_exception(QueueTimeout(retry_after))

    def _settling(self) -> float:
        settling = max(0.0, self._local_from - self._clock.monotonic())
        return self._window if settling == math.inf else settling  # recovering: about a window

    def _release_local(self, caller: str, background: bool) -> None:
        self._budget.finish()
        self._queue.finished(caller, background=background)

    def _serve(self) -> None:
        """Grant local permits in the fair order, or move every waiter to Redis in GLOBAL."""
        if self._mode is Mode.GLOBAL:
            waiters, self._waiters = self._waiters, {}
            for waiter in waiters:
                self._queue.leave(waiter)
                if not waiter.done():
                    waiter.set_result(None)
            return
        while self._waiters and self._mode is Mode.FALLBACK:
            now = self._clock.monotonic()
            busy = self._budget.in_flight + self.shared.snapshot().in_flight
            unsent_global = sum(p.shared is not None for p in self._unsent.values())
            delay = max(self._local_from - now, self._budget.delay(now, unsent_global))
            if busy >= self._budget.max_concurrent and delay == 0:
                return  # every permit of the share is held: a release serves again
            # The next turn, or when to look again: the share's room first, then the caps.
            turn = now + delay if delay > 0 else self._queue.next_live(now, still_waiting)
            if not isinstance(turn, Turn):
                if turn != math.inf:
                    self._timer.arm(turn)
                return
            self._waiters.pop(turn.item, None)
            self._budget.grant()
            turn.item.set_result(next(self._names))

    def _failed(self, exc: BackendUnavailable) -> None:
        """Every Redis failure, from any call of the Redis limiter, lands here."""
        self._on_error()
        if self._closed:
            return
        if self._mode is Mode.GLOBAL:
            share, cause = self._budget.max_concurrent, exc.__cause__ or exc
            log.warning(
                "limiter: Redis unavailable (%s); local limit %d from %.1f s after the last "
                "heartbeat",
                cause,
                share,
                self.settle_s,
            )
            self._on_degraded(True)
        self._mode = Mode.FALLBACK
        self.shared.beating = False  # a heartbeat claims membership: none while on the share
        # From the latest claim, not from now: a failed probe claims nothing and moves nothing.
        self._local_from = self.shared.claimed_at + self.settle_s
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())
        self._serve()

    def _drained(self) -> bool:
        """No local permit in flight and no local start within the window."""
        now = self._clock.monotonic()
        return self._budget.in_flight == 0 and now - self._last_local_start >= self._window

    async def _recover(self) -> None:
        """The one probe: a write every ``probe_s``; once Redis takes it, rejoin the fleet."""
        while not self._closed and self._mode is not Mode.GLOBAL:
            await self._clock.sleep(self._probe_s)
            if self._mode is Mode.FALLBACK:
                try:
                    await self.shared.probe()
                except BackendUnavailable:
                    continue  # the hook counted it
                self._mode = Mode.RECOVERING  # no local grant from now on
            if not self._drained():
                continue  # local permits still count only here: rejoin once they are over
            try:
                await self.shared.beat()
            except BackendUnavailable:
                continue  # the hook fell back, settling from this claim
            self._mode = Mode.GLOBAL
            self._local_from = math.inf
            self.shared.beating = True
            log.info("limiter: Redis is back; global limit again")
            self._on_degraded(False)
            self._serve()
