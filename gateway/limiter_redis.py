"""The fleet-wide limiter: every replica sharing one Redis shares one upstream budget.

State, under one hash tag so each script runs on Redis Cluster; times are Redis ``TIME`` in
ms, so replicas with skewed clocks agree:

    {ns:limit}:leases    ZSET lease -> expiry       in flight; a crashed holder's lease lapses
    {ns:limit}:starts    ZSET lease -> start        sliding window (+ margin), by time sent; a
                                                    pending (unsent) start is scored now + lease
                                                    (renewed with it) so it counts until sent
    {ns:limit}:queue     ZSET ticket -> first try   one ticket per replica that has waiters
    {ns:limit}:alive     ZSET ticket -> expiry      heartbeat: a dead replica's ticket lapses
    {ns:limit}:wants     ZSET ticket -> waiters     that replica's demand (at most max)
    {ns:limit}:released  channel                    a message per release (or spare grant)
    {ns:limit}:gate      string: ms                 no grants before it (after an outage)

Fairness. Within a replica waiters queue FIFO on local futures and one dispatcher task talks
to Redis for them. Across replicas the tickets queue oldest first: a ticket gets
``free - (wants of all older tickets)`` permits at once, so an older replica's demand is
reserved and a faster replica cannot take it. After a grant the replica's next ticket goes to
the back, so replicas with waiters take turns (batch by batch) and none is locked out; spare
capacity still flows to younger tickets. A dead replica's reservation holds only until its
ticket's heartbeat lapses (``_ticket_ttl_ms``: 2.4 windows + 0.5 s).

Waiting never polls: the dispatcher retries on a release message, or when the script's hint
has passed (oldest start leaving the window, nearest lease expiry, or a short pause behind
older tickets), plus 0-5 ms of jitter so replicas do not stampede. The jitter is absolute, not
a share of the hint: a share of a window-long hint made every batch start ~9 % late and cost
the fleet that much of the vendor's budget (README "Performance").

A start is granted pending and recorded at Redis's ``TIME`` when the permit's ``sent()`` runs,
or at release if it never did (Redis's time then is never earlier than the real send). A crashed
holder's unsent starts count until its lease lapses and a window more: it may have sent them as
it died.

Held leases are renewed every ``lease_s / 3`` (one task for all) and released on every exit
path, shielded from cancellation. Redis errors become ``BackendUnavailable`` in ``_redis``
only; a failed release is logged, not raised: the lease lapses by itself, as does a grant
whose reply was lost. ``QueueFull``/``QueueTimeout`` bound this replica's queue; their
``retry_after`` is this replica's own estimate. Needs Redis >= 5 (scripts that call TIME).

After an outage (see ``limiter_failover``) ``adopt`` registers permits granted locally meanwhile
and sets the gate (``SET NX``, it expires when it opens): the acquire script grants nothing
before it, so every replica, even one that never noticed the outage, starts at one moment.
With an ``on_failure`` hook, every Redis failure is reported to it and logged at debug only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.clock import Clock
from gateway.errors import BackendUnavailable, QueueFull, QueueTimeout
from gateway.limiter import LimiterSnapshot
from gateway.limiter_scripts import (
    ACQUIRE,
    ADOPT,
    FORGET,
    RELEASE,
    RENEW,
    SENT,
    LimiterKeys,
)

log = logging.getLogger("gateway.limiter")
T = TypeVar("T")

_OP_BOUND_S = 2.0  # backstop over the client's own (shorter) timeouts: no call waits forever
_BLOCKED_HINT_MS = 250  # every permit is held: a release message normally comes sooner
_BEHIND_HINT_MS = 100  # older tickets go first; a spare-capacity message normally comes sooner
_JITTER_MS = 5.0
_RESUBSCRIBE_S = 0.5


class RedisLimiter:
    """``Limiter`` over Redis: at most ``max_concurrent`` in flight and starts per ``window_s``
    across every replica on the same keys. ``permit()`` raises ``QueueFull`` and
    ``QueueTimeout`` (this replica's queue bounds) and ``BackendUnavailable`` (Redis failed;
    nothing is left behind locally). ``on_failure`` hears of every Redis failure, background
    ones (renewal, release, subscription) included.
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
        namespace: str = "isales:v1",
        on_failure: Callable[[BackendUnavailable], None] | None = None,
    ) -> None:
        self.keys = LimiterKeys.for_namespace(namespace)
        self._client = client
        self._max = max_concurrent
        self._window_s = window_s
        self._max_queue = max_queue
        self._max_wait = max_wait_s
        self._lease_s = lease_s
        self._clock = clock
        self._on_failure = on_failure
        # The hook's owner reports outages once; a warning per failed call would flood the log.
        self._level = logging.WARNING if on_failure is None else logging.DEBUG
        # Twice the longest a live dispatcher goes between attempts (a lapsed live ticket only
        # loses its place); a dead replica's reservation holds no longer than this.
        longest_hint = max(window_s * 1000, _BLOCKED_HINT_MS) + _JITTER_MS
        self._ticket_ttl_ms = round(2 * longest_hint + 500)
        sources = {
            "acquire": ACQUIRE,
            "renew": RENEW,
            "forget": FORGET,
            "adopt": ADOPT,
            "sent": SENT,
            "release": RELEASE,
        }
        self._scripts = {name: client.register_script(src) for name, src in sources.items()}
        self._replica = uuid.uuid4().hex
        self._tickets = itertools.count()
        self._waiters: deque[asyncio.Future[str]] = deque()
        self._trying: asyncio.Future[str] | None = None
        self._held: set[str] = set()
        self._wake: asyncio.Future[None] | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    def snapshot(self) -> LimiterSnapshot:
        return LimiterSnapshot(len(self._held), self._queued())

    @asynccontextmanager
    async def permit(self) -> AsyncIterator[RedisPermit]:
        lease = await self._acquire()
        permit = RedisPermit(self, lease)
        try:
            yield permit
        finally:
            self._held.discard(lease)
            # Shielded: a cancellation arriving now must not abandon the release half-way.
            release = self._release(lease, record_start=not permit.recorded)
            await asyncio.shield(self._spawn(release))

    async def close(self) -> None:
        """Stop background tasks, fail local waiters, release held leases (best effort)."""
        self._closed = True
        tasks = [t for t in (self._dispatcher, self._renewer, self._subscriber) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_waiters(BackendUnavailable("The limiter is closed."))
        for lease in list(self._held):
            self._spawn(self._release(lease, record_start=True))  # sent or not: the later time
        if self._background:
            await asyncio.wait(self._background, timeout=_OP_BOUND_S)

    async def ping(self) -> None:
        """Raise ``BackendUnavailable`` unless Redis answers within the client's budget."""
        await self._redis("ping", self._client.ping())

    async def adopt(
        self, leases: Sequence[str], starts: Sequence[tuple[str, float | None]], hold_s: float
    ) -> float:
        """Register permits taken without Redis: ``leases`` still held (for ``lease_s``) and
        ``starts`` as (name, seconds ago), None for a start not sent yet (pending: ``record_sent``
        records it). Sets the fleet's gate ``hold_s`` from now unless one is set already; returns
        the seconds until it opens. Raises ``BackendUnavailable``.
        """
        k = self.keys
        ms = [round(self._lease_s * 1000), round(self._window_s * 1000), math.ceil(hold_s * 1000)]
        args: list[str | int] = [*ms]
        args += [len(leases), *leases]
        for name, age_s in starts:
            args += [name, -1 if age_s is None else max(0, round(age_s * 1000))]
        wait_ms = await self._redis(
            "adopt", self._scripts["adopt"]([k.leases, k.starts, k.gate], args)
        )
        return int(wait_ms) / 1000

    def forget(self, lease: str, record_start: bool) -> None:
        """Release an adopted lease in the background (it lapses by itself if this fails),
        recording its start now if ``record_start`` (it was never sent).
        """
        self._spawn(self._release(lease, record_start))

    async def record_sent(self, lease: str) -> bool:
        """Record ``lease``'s start at Redis's time now; False (logged) if Redis failed."""
        sent = self._scripts["sent"]([self.keys.starts], [lease])
        try:
            await self._redis("sent", sent)
        except BackendUnavailable as exc:
            log.log(self._level, "limiter start not recorded, stays pending: %s", exc.__cause__)
            return False
        return True

    def record_sent_later(self, lease: str) -> None:
        """``record_sent`` in the background (for an adopted start the caller holds locally)."""

        async def record() -> None:
            await self.record_sent(lease)

        self._spawn(record())

    def _queued(self) -> int:
        # A caller that found the queue empty is trying its luck, not queued, until refused
        # (as with the in-memory limiter, whose idle fast path never queues).
        return len(self._waiters) - (self._trying is not None and not self._trying.done())

    def _retry_after(self, ahead: int) -> float:
        return (ahead // self._max + 1) * self._window_s

    async def _acquire(self) -> str:
        if self._closed:
            raise BackendUnavailable("The limiter is closed.")
        ahead = self._queued()
        if ahead >= self._max_queue:
            raise QueueFull(self._retry_after(ahead))
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self._waiters:
            self._trying = waiter
        self._waiters.append(waiter)
        deadline = self._clock.call_later(self._max_wait, lambda: self._expire(waiter))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted in the tick the caller went away: hand the permit back.
                self._held.discard(waiter.result())
                self._spawn(self._release(waiter.result(), record_start=True))
            self._leave(waiter)
            raise
        finally:
            deadline.cancel()

    def _expire(self, waiter: asyncio.Future[str]) -> None:
        if not waiter.done():
            ahead = self._waiters.index(waiter) if waiter in self._waiters else 0
            self._leave(waiter)
            waiter.set_exception(QueueTimeout(self._retry_after(ahead)))

    def _leave(self, waiter: asyncio.Future[str]) -> None:
        with contextlib.suppress(ValueError):  # already served
            self._waiters.remove(waiter)
        if not self._waiters:
            self._wake_up()  # so the dispatcher drops the ticket now, not after its hint

    async def _dispatch(self) -> None:
        """Serve the local queue until it is empty; at most one runs per limiter."""
        ticket: str | None = None
        try:
            while True:
                if not self._waiters:
                    if ticket is None:
                        return  # no await between the check and the end: no waiter is missed
                    leaving, ticket = ticket, None
                    await self._leave_queue(leaving)
                    continue
                ticket = ticket or f"{self._replica}:{next(self._tickets)}"
                self._wake = asyncio.get_running_loop().create_future()
                try:
                    granted, hint_ms = await self._try(ticket)
                except BackendUnavailable as exc:
                    self._fail_waiters(exc)
                    continue
                self._trying = None
                if granted:
                    self._grant([f"{ticket}:{i}" for i in range(1, granted + 1)])
                    ticket = None  # the script removed it: the next batch queues afresh
                    continue
                if self._subscriber is None or self._subscriber.done():
                    self._subscriber = asyncio.create_task(self._listen())
                jitter_ms = random.uniform(0, _JITTER_MS)  # noqa: S311 - spreading, not secrecy
                timer = self._clock.call_later((hint_ms + jitter_ms) / 1000, self._wake_up)
                try:
                    await self._wake
                finally:
                    timer.cancel()
        finally:
            if ticket is not None:  # cancelled by close()
                self._spawn(self._leave_queue(ticket))

    async def _try(self, ticket: str) -> tuple[int, int]:
        k = self.keys
        args: list[str | float] = [self._max, self._window_s * 1000, self._lease_s * 1000]
        args += [ticket, min(len(self._waiters), self._max), self._ticket_ttl_ms]
        args += [_BLOCKED_HINT_MS, _BEHIND_HINT_MS, k.released]
        keys = [k.leases, k.starts, k.queue, k.alive, k.wants, k.gate]
        granted, hint_ms = await self._redis("acquire", self._scripts["acquire"](keys, args))
        return int(granted), int(hint_ms)

    def _grant(self, leases: list[str]) -> None:
        for lease in leases:
            while self._waiters and self._waiters[0].done():
                self._waiters.popleft()  # cancelled; its task has not cleaned up yet
            if self._waiters:
                self._held.add(lease)
                self._waiters.popleft().set_result(lease)
            else:  # the waiter left while the script ran
                self._spawn(self._release(lease, record_start=True))
        if self._held and (self._renewer is None or self._renewer.done()):
            self._renewer = asyncio.create_task(self._renew())

    def _fail_waiters(self, exc: BackendUnavailable) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                failure = BackendUnavailable(exc.message)
                failure.__cause__ = exc.__cause__
                waiter.set_exception(failure)

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _renew(self) -> None:
        """Extend every held lease each ``lease_s / 3`` so long calls keep their permit."""
        while self._held:
            await self._clock.sleep(self._lease_s / 3)
            held = list(self._held)
            if not held:
                return
            keys = [self.keys.leases, self.keys.starts]
            renew = self._scripts["renew"](
                keys, [self._lease_s * 1000, self._window_s * 1000, *held]
            )
            try:
                lost = await self._redis("renew", renew)
            except BackendUnavailable as exc:
                log.log(self._level, "limiter lease renewal failed: %s", exc.__cause__)
                continue
            for lease in lost:
                name = lease.decode() if isinstance(lease, bytes) else str(lease)
                if name in self._held:
                    log.error("limiter lease %s lapsed while held; the limit may be exceeded", name)

    async def _release(self, lease: str, record_start: bool) -> None:
        """``record_start``: never sent, or not recorded; it may have gone out until now."""
        k = self.keys
        args: list[str | int] = [k.released, lease, int(record_start)]
        release = self._scripts["release"]([k.leases, k.starts], args)
        try:
            await self._redis("release", release)
        except BackendUnavailable as exc:
            log.log(self._level, "limiter release failed, the lease will lapse: %s", exc.__cause__)
        else:
            self._wake_up()  # the local head may retry now, before the message comes round

    async def _leave_queue(self, ticket: str) -> None:
        k = self.keys
        leave = self._scripts["forget"]([k.queue, k.alive, k.wants], [k.released, ticket])
        with contextlib.suppress(BackendUnavailable):  # a dead ticket lapses by itself
            await self._redis("leave", leave)

    async def _listen(self) -> None:
        """One subscription per limiter: any release in the fleet wakes the dispatcher."""
        while True:
            pubsub = self._client.pubsub()
            try:
                await self._redis("subscribe", pubsub.subscribe(self.keys.released))
                while True:
                    wait = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if await self._redis("listen", wait) is not None:
                        self._wake_up()
            except BackendUnavailable as exc:
                log.log(self._level, "limiter wake-ups lost, waiting on hints: %s", exc.__cause__)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await self._clock.sleep(_RESUBSCRIBE_S)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _redis(self, action: str, call: Awaitable[T]) -> T:
        """The one place Redis errors become ``BackendUnavailable``."""
        try:
            async with asyncio.timeout(_OP_BOUND_S):
                return await call
        except (RedisError, OSError) as exc:  # OSError: builtin Connection/TimeoutError too
            failure = BackendUnavailable(f"Shared limiter unavailable ({action}).")
            failure.__cause__ = exc
            if self._on_failure is not None:
                self._on_failure(failure)
            raise failure from exc


class RedisPermit:
    """A permit of ``RedisLimiter``: ``sent()`` records its start at Redis's time (once)."""

    def __init__(self, limiter: RedisLimiter, lease: str) -> None:
        self.lease = lease
        self.recorded = False
        self._limiter = limiter

    async def sent(self) -> None:
        if not self.recorded:
            self.recorded = await self._limiter.record_sent(self.lease)
