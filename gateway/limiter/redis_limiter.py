"""The fleet-wide limiter: every replica sharing one Redis shares one upstream budget.

State, under one hash tag so each script runs on Redis Cluster; times are Redis ``TIME`` in
ms, so replicas with skewed clocks agree. No key has a TTL (eviction cannot pick them):

    {ns:limit}:meta      HASH epoch, gate, replid, replicas   the state's generation (and the
                                                    primary's lineage); no grants before gate
    {ns:limit}:leases    ZSET lease -> expiry       in flight; a crashed holder's lease lapses
    {ns:limit}:starts    ZSET lease -> start        sliding window (+ margin), by time sent; a
                                                    pending (unsent) start is scored now + lease
                                                    (renewed with it) so it counts until sent
    {ns:limit}:members   ZSET replica -> expiry     replicas heard from (heartbeats)
    {ns:limit}:demand    ZSET replica\ncaller -> expiry   who waits where; a dead replica's lapses
    {ns:limit}:wants     HASH replica\ncaller -> waiters  that demand (at most max)
    {ns:limit}:finish    HASH caller -> finish tag  fair queuing between callers, fleet-wide
    {ns:limit}:policy    HASH caller -> "weight cap"   the callers file, as replicas last said
    {ns:limit}:since     ZSET replica\\ncaller -> time  a caller's demands, oldest served first
    {ns:limit}:released  channel                    a message per release (or spare grant)

Safety never rests on Redis keeping its data (README "The vendor's limit"):

- Epoch. Every grant and heartbeat names the epoch the replica knows. A missing epoch means
  Redis lost the state (restarted empty, flushed, evicted); the script that finds it so starts
  a new one whose gate opens ``lease_s + window_s`` later, when every permit of the old epoch
  has ended at the vendor and left the window. A replica told of a new epoch stops trusting
  the permits it has not used yet (``check`` raises ``PermitLost``); the ones already sent end
  before the gate opens. A primary change is a lost epoch too (``redis_scripts``, lineage).
- Leases cover the vendor. ``lease_s`` is the longest a request can keep the vendor busy after
  its grant (send allowance + upstream timeout + abandoned hold), so a lease lapses only after
  its request is surely over, even if its holder froze or died.
- Fencing. A permit is sent within ``fence_s`` of the acquire call that granted it, or not at
  all (``check``): a holder frozen between grant and send never sends on a lapsed lease.
- Membership. Each replica claims membership by heartbeat every ``beat_s`` (member for
  ``3 * beat_s``). The fleet grants out of ``max - share * (replicas - members)``: a replica not
  heard from may be on its fallback share (``failover``), so its share is set aside. A
  heartbeat carries a "not after" time (``claim_s`` past its sending, on the wall clock): one
  that waited in a paused or cut-off Redis is ignored, so a stale claim never counts a replica
  as a member while it is on its fallback share.

Fairness. The budget is shared between callers, not replicas: each replica keeps its waiters
in a ``FairScheduler`` (per-caller queues, each bounded) and tells Redis how many of each
caller wait there; the acquire script hands out the free permits by start-time fair queuing
over every caller waiting anywhere in the fleet (the rule of ``scheduler``, with each
caller's finish tag in Redis), so a caller spread over three replicas gets one share, not
three. A permit that falls to a caller waiting on another replica is left for that replica
(it is woken by the "spare" message); a dead replica's demand lapses after ``_demand_ttl_ms``.
Background work (refresh-ahead) gets a permit only when no caller waits anywhere, within its
cap; ``max_in_flight`` caps count a caller's leases fleet-wide.

Waiting never polls, and one acquire serves every local waiter: it tells Redis the waiters per
caller (counted up to ``max`` each), takes what falls to them, and says when to try again and
what may end the wait sooner (``redis_scripts.Wait``). Every permit held (checked first), or
permits left for callers waiting elsewhere: a release message or "spare" message ends the
wait (so a batch's first release costs one try, which then finds the window full), else the
hint (nearest lease expiry, or a short pause), plus 0-5 ms of jitter so replicas woken by one
message do not stampede. A full window (or a closed gate) only time ends: the timer is aimed
at the oldest start's exit on Redis's clock, and releases or messages meanwhile cost no try
(a release records a start, it never removes one). A new waiter costs a try only when it
changes what Redis hears (a new caller, or one below ``max``); a grant that serves all of a
caller's waiters here ends its demand in the same script (no withdraw). So the Redis work per
permit does not grow with the queue's depth (``tests/test_limiter_redis_costs.py``). A full
window's wait does not end when a replica joins (the budget grows by its share): the grant
that allows then comes at the window's edge, at most one window later.

Granted ahead. With ``limit.grant_ahead_s``, a start leaving the window that soon counts as
gone (per acquire call, atomically: two replicas cannot both count the same exit as theirs
to fill); the script says how long after it ran the latest such exit comes, and the replica
holds the permit's ``sent()`` until that long after the reply arrived (later than Redis's
edge, since the reply left Redis after the script ran). ``sent()`` then checks the permit
again (the fence, the epoch): a permit that lapsed while held is lost, not sent. A permit
released unsent counts its start from no earlier than that edge. Everything else is unchanged:
in flight from the grant, the start pending until recorded at the time it was sent.

A start is granted pending and recorded when the permit's ``sent()`` runs, in the background
(the request does not wait for Redis), at Redis's ``TIME`` less the time since ``sent()``
counted before the call, or at the grant's script time plus the time since its acquire was
sent, whichever is sooner: each is never earlier than it went out; or at release if it never
did.
Redis errors become ``BackendUnavailable`` in ``_redis`` only
and are reported to ``on_failure``; a failed release is logged, not raised: the lease lapses
by itself. ``close`` gives back the permits that never went out and leaves the sent ones to
lapse (the vendor may still be working on them). Needs Redis >= 5 (scripts that call TIME).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import logging
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from gateway.clock import Clock
from gateway.errors import BackendUnavailable, PermitLost, QueueFull, QueueTimeout
from gateway.limiter.memory import hold_until
from gateway.limiter.protocol import (
    ANONYMOUS,
    BACKGROUND,
    FleetTimings,
    LimitConfig,
    LimiterSnapshot,
    shutting_down,
)
from gateway.limiter.redis_scripts import (
    AcquireResult,
    CallerDemand,
    LimiterKeys,
    LimiterScripts,
    Limits,
    Wait,
)
from gateway.limiter.scheduler import CallerPolicy, FairScheduler
from gateway.redis_bus import RedisBus
from gateway.redis_client import AnyRedis, redis_errors

log = logging.getLogger("gateway.limiter")
T = TypeVar("T")

_OP_BOUND_S = 2.0  # backstop over the client's own (shorter) timeouts: no call waits forever
_BLOCKED_HINT_MS = 250  # every permit is held: a release message normally comes sooner
_BEHIND_HINT_MS = 100  # others' turns first; a spare-capacity message normally comes sooner
_JITTER_MS = 5.0
# A local duration carried onto Redis's clock is stretched by this much, so a clock that runs
# faster than the replica's (NTP slews at most 0.05 %) cannot make a recorded start early.
_RATE_ALLOWANCE = 1e-3


@dataclass(frozen=True, slots=True)
class Grant:
    """A lease granted by one acquire call sent at ``asked_at`` (monotonic), in ``generation``;
    its request may go out from ``not_before`` (monotonic) on. ``redis_ms``: Redis's time as
    that call's script ran (0: unknown), which its clock had not yet reached at ``asked_at``."""

    lease: str
    asked_at: float
    generation: int
    not_before: float = -float("inf")
    redis_ms: float = 0.0


_Waiter = asyncio.Future[Grant]


class RedisLimiter:
    """``Limiter`` over Redis: at most ``max_concurrent`` in flight and starts per ``window_s``
    across every replica on the same keys. ``permit()`` raises ``QueueFull`` and
    ``QueueTimeout`` (this replica's queue bounds) and ``BackendUnavailable`` (Redis failed;
    nothing is left behind locally). ``on_failure`` hears of every Redis failure, background
    ones (heartbeat, release, subscription) included.

    ``limit``, ``timings`` and ``share`` (what the fleet sets aside for each replica not heard
    from: ``limit.share`` under a ``failover``, else 0) must be the same on every replica.
    """

    def __init__(
        self,
        client: AnyRedis,
        limit: LimitConfig,
        timings: FleetTimings,
        *,
        clock: Clock,
        share: int = 0,
        namespace: str = "isales:v1",
        on_failure: Callable[[BackendUnavailable], None] | None = None,
    ) -> None:
        self.keys = LimiterKeys.for_namespace(namespace)
        self._client = client
        self._limit = limit
        self._timings = timings
        self._clock = clock
        self._beat_period = min(timings.beat_s, timings.lease_s / 3)  # held leases renewed too
        self._renew_s = self._beat_period / 2
        self._on_failure = on_failure
        # The hook's owner reports outages once; a warning per failed call would flood the log.
        self._level = logging.WARNING if on_failure is None else logging.DEBUG
        # Twice the longest a live dispatcher goes between attempts (a lapsed live demand is
        # only registered again); a dead replica's demand is reserved no longer than this.
        longest_hint = max(limit.window_s * 1000, _BLOCKED_HINT_MS) + _JITTER_MS
        self._demand_ttl_ms = round(2 * longest_hint + 500)
        self.replica = uuid.uuid4().hex
        self._scripts = LimiterScripts(client, self.keys, self.replica)
        self._limits = Limits(
            max_concurrent=limit.max_concurrent,
            window_ms=limit.window_s * 1000,
            lease_ms=timings.lease_s * 1000,
            hold_ms=self.hold_s * 1000,
            share=share,
            replicas=limit.replicas,
            demand_ttl_ms=self._demand_ttl_ms,
            blocked_hint_ms=_BLOCKED_HINT_MS,
            behind_hint_ms=_BEHIND_HINT_MS,
            ahead_ms=limit.grant_ahead_s * 1000,
        )
        if limit.grant_ahead_s >= timings.fence_s / 2:
            raise ValueError("grant_ahead_s must be well below fence_s: a held permit is sent")
        self._tickets = itertools.count()
        # Every waiter queues here, even one that finds the budget free (its try takes a round
        # trip): each caller's bound counts one more, the waiter being tried.
        self._queue: FairScheduler[_Waiter] = FairScheduler(
            budget=limit.max_concurrent,
            window_s=limit.window_s,
            max_queue=limit.max_queue + 1,
            policy=lambda caller: _one_more(limit.policy(caller)),
            background_max=limit.background_max,
        )
        self._waiters: dict[_Waiter, str] = {}  # every waiter, by caller: to fail them all
        self._registered: set[str] = set()  # callers whose demand here Redis knows of
        self._trying: _Waiter | None = None
        self._held: dict[str, RedisPermit] = {}
        self._epoch = ""  # learnt from the first reply
        self._generation = 0  # bumped on each new epoch: older grants are not trusted
        self.beating = True  # heartbeats claim membership; the failover stops them
        self.claimed_at = -float("inf")  # when the latest heartbeat was sent (monotonic)
        self.members = 0  # replicas counted at the latest heartbeat
        self.fleet: tuple[int, int] | None = None  # in flight, starts: the latest heartbeat
        self._wake: asyncio.Future[None] | None = None
        self._waiting_on: Wait | None = None  # what the dispatcher's current wait is for
        self._kicked = False  # the wait was ended by a local change or its timer
        self._dispatcher: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False
        self._shedding = False

    @property
    def hold_s(self) -> float:
        """How long a new epoch grants nothing: every older lease lapses and leaves the window."""
        return self._timings.lease_s + self._limit.window_s

    def snapshot(self) -> LimiterSnapshot:
        fleet_in_flight, fleet_starts = self.fleet or (None, None)
        return LimiterSnapshot(
            len(self._held),
            self._queued(),
            self._queue.queued_by_caller(),
            fleet_in_flight=fleet_in_flight,
            fleet_starts=fleet_starts,
        )

    def start(self) -> None:
        """Start claiming membership (heartbeats); ``permit()`` starts it too."""
        if self._beater is None and not self._closed:
            self._beater = asyncio.create_task(self._beat_forever())

    @asynccontextmanager
    async def permit(
        self, caller: str = ANONYMOUS, *, background: bool = False
    ) -> AsyncIterator[RedisPermit]:
        self.start()
        name = BACKGROUND if background else caller
        grant = await self._acquire(name, background)
        permit = RedisPermit(self, grant)
        self._held[grant.lease] = permit
        try:
            yield permit
        finally:
            self._held.pop(grant.lease, None)
            self._queue.finished(name, background=background)
            # Closed mid-call (shutdown): the vendor may still be working on it; it lapses.
            if not (self._closed and permit.went_out):
                # In the background: the caller's answer does not wait for Redis (the lease
                # counts until the release lands: the safe side), and a cancellation arriving
                # now cannot abandon it half-way. ``close`` waits for it.
                self._spawn(self._release(grant, record_start=not permit.recorded))

    def shed(self) -> None:
        self._shedding = True
        self._fail_waiters(shutting_down())
        self._kick()  # the dispatcher withdraws this replica's demand

    async def close(self) -> None:
        """Stop background tasks, fail local waiters, give back the permits never sent.

        A permit already sent stays held until its lease lapses: the vendor may still be
        working on it (an abandoned call), and releasing it now would let another start.
        """
        self._closed = True
        tasks = [t for t in (self._dispatcher, self._beater, self._subscriber) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_waiters(BackendUnavailable("The limiter is closed."))
        for permit in list(self._held.values()):
            if not permit.went_out:
                self._spawn(self._release(permit.grant, record_start=True))
        if self._background:
            await asyncio.wait(self._background, timeout=_OP_BOUND_S)

    async def probe(self) -> None:
        """Raise ``BackendUnavailable`` unless Redis takes a write within the client's budget
        (a Redis that answers PING but refuses writes is down for the limiter).
        """
        await self._redis("probe", self._scripts.probe())

    async def beat(self) -> int:
        """Claim membership and renew held leases; the number of members. Raises
        ``BackendUnavailable`` (reported to ``on_failure``), also for a claim that arrived late.
        """
        now = self._clock.monotonic()
        self.claimed_at = now
        # A lease is renewed once older than half a beat period (most calls end sooner), so
        # it is at most 1.5 periods (lease_s / 2) old when renewed: as safe as renewing all.
        renew = [
            lease
            for lease, p in self._held.items()
            if p.grant.generation == self._generation and now - p.renewed_at >= self._renew_s
        ]
        reply = await self._redis(
            "heartbeat",
            self._scripts.heartbeat(
                epoch=self._epoch,
                member_ttl_ms=round(self._timings.member_s * 1000),
                not_after_ms=round((self._clock.time() + self._timings.claim_s) * 1000),
                lease_ms=round(self._timings.lease_s * 1000),
                hold_ms=round(self.hold_s * 1000),
                window_ms=round(self._limit.window_s * 1000),
                renew=renew,
            ),
        )
        if reply.late:
            raise self._failure("heartbeat", TimeoutError("the heartbeat reached Redis too late"))
        self.fleet = (reply.in_flight, reply.starts)
        if reply.epoch != self._epoch:
            self._new_epoch(reply.epoch)
        else:
            for lease in renew:
                if (permit := self._held.get(lease)) is not None:
                    permit.renewed_at = now
        for lease in reply.lost:
            if lease in self._held:
                log.error("limiter lease %s lapsed while held; the limit may be exceeded", lease)
        members = reply.members
        replicas = self._limit.replicas
        if members > replicas and self.members <= replicas:
            log.error(
                "limiter: %d replicas share this Redis but limit.replicas is %d: set it to the "
                "fleet size, or a replica cut off from Redis may exceed the vendor's limit",
                members,
                replicas,
            )
        self.members = members
        return members

    def check(self, grant: Grant) -> None:
        """Raise ``PermitLost`` unless ``grant`` may still be sent now."""
        if grant.generation != self._generation:
            raise PermitLost("The shared limiter's state was lost since this permit's grant.")
        if self._clock.monotonic() > grant.asked_at + self._timings.fence_s:
            raise PermitLost("This permit was not used in time; its lease may have lapsed.")

    async def record_sent(
        self, lease: str, sent_at: float | None = None, grant: Grant | None = None
    ) -> bool:
        """Record ``lease``'s start at Redis's time, as of ``sent_at`` (monotonic; default now);
        False (logged) if Redis failed.

        Redis's time now less the time since ``sent_at`` is late by the record's way to Redis
        (its pool wait, a busy loop: 0.8 ms median in a 500-miss storm, 55-80 ms for the first
        batch), and the next batch's edge with it. ``grant``'s acquire bounds it too: Redis's
        clock had not reached ``grant.redis_ms`` at ``grant.asked_at``, so it had not reached
        that plus the time since (stretched by ``_RATE_ALLOWANCE``) at ``sent_at``. The script
        records the sooner of the two, each never before the request went out.
        """
        now = self._clock.monotonic()
        ago_s = 0.0 if sent_at is None else now - sent_at
        bound = None
        if grant is not None and grant.redis_ms > 0:
            since_s = (now if sent_at is None else sent_at) - grant.asked_at
            bound = grant.redis_ms + max(0.0, since_s) * 1000 * (1 + _RATE_ALLOWANCE)
        try:
            await self._redis("sent", self._scripts.sent(lease, ago_s=ago_s, not_after_ms=bound))
        except BackendUnavailable as exc:
            log.log(self._level, "limiter start not recorded, stays pending: %s", exc.__cause__)
            return False
        return True

    def _new_epoch(self, epoch: str) -> None:
        if self._epoch:
            log.warning(
                "limiter: Redis lost the shared limiter's state; nothing is granted for %.1f s "
                "while permits nobody can see any more lapse",
                self.hold_s,
            )
        self._epoch = epoch
        self._generation += 1  # held leases of the lost epoch: nothing to renew any more

    async def _beat_forever(self) -> None:
        period = self._beat_period
        while not self._closed:
            if self.beating:
                with contextlib.suppress(BackendUnavailable):  # reported to on_failure
                    await self.beat()
            await self._clock.sleep(period)

    def _queued(self) -> int:
        # A caller that found nobody waiting is trying its luck, not queued, until refused
        # (as with the in-memory limiter, whose idle fast path never queues).
        return self._queue.queued() - (self._trying is not None and not self._trying.done())

    async def _acquire(self, caller: str, background: bool) -> Grant:
        if self._closed:
            raise BackendUnavailable("The limiter is closed.")
        if self._shedding:
            raise shutting_down()
        trying = self._trying
        tried = trying is not None and not trying.done() and self._waiters.get(trying) == caller
        ahead = self._queue.queued(caller) - tried
        if not background and ahead >= self._bound(caller):
            raise QueueFull(self._queue.retry_after(caller))
        waiter: _Waiter = asyncio.get_running_loop().create_future()
        idle = not self._waiters
        # What Redis hears of this caller (at most max waiters) changes only below max.
        news = self._queue.queued(caller) < self._limit.max_concurrent
        self._queue.join(caller, waiter, background=background)  # background: may raise
        self._waiters[waiter] = caller
        if idle:
            self._trying = waiter
        deadline = self._clock.call_later(self._limit.max_wait_s, lambda: self._expire(waiter))
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = asyncio.create_task(self._dispatch())
        elif news:
            self._kick()  # a new caller's demand changes what Redis should hear
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted in the tick the caller went away: hand the permit back.
                self._queue.finished(caller, background=background)
                self._spawn(self._release(waiter.result(), record_start=True))
            self._leave(waiter)
            raise
        finally:
            deadline.cancel()

    def _bound(self, caller: str) -> int:
        bound = self._limit.policy(caller).max_queue
        return self._limit.max_queue if bound is None else bound

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.done():
            caller = self._waiters.get(waiter, ANONYMOUS)
            retry_after = self._queue.retry_after(caller)
            self._leave(waiter)
            waiter.set_exception(QueueTimeout(retry_after))

    def _leave(self, waiter: _Waiter) -> None:
        self._waiters.pop(waiter, None)
        self._queue.leave(waiter)
        if not self._waiters:
            self._kick()  # so the dispatcher withdraws the demand now, not after its hint

    def _demand(self) -> dict[str, int]:
        """Waiters per caller (the script counts at most ``max`` of each)."""
        demand: dict[str, int] = {}
        for caller in self._waiters.values():
            demand[caller] = demand.get(caller, 0) + 1
        return demand

    async def _dispatch(self) -> None:
        """Serve the local queue until it is empty; at most one runs per limiter.

        One acquire serves every local waiter (the script grants up to ``max`` at once) and
        says when to try again and what may end the wait sooner (``Wait``): a release or a
        message when every permit is held or permits wait for others; only time when the
        window is full or the gate closed, so releases and messages cost no try then. This
        replica's own demand changing always ends the wait (``_kick``).
        """
        try:
            while True:
                demand = self._demand()
                if not demand:
                    if not self._registered:
                        return  # no await between the check and the end: no waiter is missed
                    await self._withdraw(self._registered)
                    self._registered = set()
                    continue
                self._wake = asyncio.get_running_loop().create_future()
                self._kicked, self._waiting_on = False, None  # while trying: any news counts
                asked_at = self._clock.monotonic()
                ticket = f"{self.replica}:{next(self._tickets)}"
                try:
                    result = await self._try(ticket, demand)
                except BackendUnavailable as exc:
                    self._fail_waiters(exc)
                    continue
                # The edge came ``not_before_s`` after the script ran, so no sooner after now.
                not_before = self._clock.monotonic() + result.not_before_s
                # A caller granted all its waiters has no demand in Redis any more.
                served = {c for c, n in result.grants if n >= demand.get(c, 0)}
                self._registered = set(demand) - served
                if result.stale or result.epoch != self._epoch:
                    self._new_epoch(result.epoch)
                    continue  # nothing was done under the old epoch: ask again in this one
                self._trying = None
                if result.grants:
                    self._grant(ticket, result, asked_at, not_before)
                    if not self._waiters:
                        continue  # everyone served (the script ended what it could)
                self._waiting_on = result.wait
                if result.wait is Wait.TIME:
                    if self._wake.done() and not self._kicked:
                        # only fleet news came meanwhile, and it cannot free a start
                        self._wake = asyncio.get_running_loop().create_future()
                    delay = result.hint_s  # aimed at the window's edge on Redis's clock
                else:
                    if self._subscriber is None or self._subscriber.done():
                        self._subscriber = asyncio.create_task(self._listen())
                    jitter = random.uniform(0, _JITTER_MS) / 1000  # noqa: S311 - not secrecy
                    delay = result.hint_s + jitter  # replicas woken by one message spread
                timer = self._clock.call_later(delay, self._kick)
                try:
                    await self._wake
                finally:
                    timer.cancel()
        finally:
            if self._closed and self._registered:  # cancelled by close()
                self._spawn(self._withdraw(self._registered))

    async def _try(self, ticket: str, demand: dict[str, int]) -> AcquireResult:
        callers = []
        for caller in sorted(self._registered | set(demand)):
            if caller == BACKGROUND:
                weight, cap = 1.0, self._limit.background_max
            else:
                rule = self._limit.policy(caller)
                weight, cap = rule.weight, rule.max_in_flight or 0
            callers.append(CallerDemand(caller, demand.get(caller, 0), weight, cap))
        call = self._scripts.acquire(
            self._limits, epoch=self._epoch, ticket=ticket, background=BACKGROUND, callers=callers
        )
        return await self._redis("acquire", call)

    def _grant(
        self, ticket: str, result: AcquireResult, asked_at: float, not_before: float
    ) -> None:
        for caller, count in result.grants:
            for i in range(1, count + 1):
                lease = f"{caller}\n{ticket}:{i}"
                grant = Grant(lease, asked_at, self._generation, not_before, result.redis_ms)
                if caller == BACKGROUND:
                    turn = self._queue.next(self._clock.monotonic())
                else:
                    turn = self._queue.next_for(caller)
                if turn is None or turn.item.done():  # the waiter left while the script ran
                    if turn is not None:
                        self._queue.finished(turn.caller, background=turn.background)
                    self._spawn(self._release(grant, record_start=True))
                    continue
                self._waiters.pop(turn.item, None)
                turn.item.set_result(grant)

    def _fail_waiters(self, exc: BackendUnavailable | QueueFull) -> None:
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters:
            self._queue.leave(waiter)
            if not waiter.done():
                failure = copy.copy(exc)  # each waiter raises its own
                failure.__cause__ = exc.__cause__
                waiter.set_exception(failure)

    def _wake_up(self) -> None:
        """News from the fleet (a release, spare permits, a withdrawal): try again now, unless
        only time can end the current wait (a full window, a closed gate)."""
        if self._waiting_on is not Wait.TIME:
            self._resolve_wake()

    def _kick(self) -> None:
        """Try again now, whatever the wait: this replica's demand changed, or the hint came."""
        self._kicked = True
        self._resolve_wake()

    def _resolve_wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _release(self, grant: Grant, record_start: bool) -> None:
        """``record_start``: never sent, or not recorded; it may have gone out until now (or
        until its edge, if that is later)."""
        ahead = grant.not_before - self._clock.monotonic()
        call = self._scripts.release(grant.lease, record_start=record_start, not_before_s=ahead)
        try:
            await self._redis("release", call)
        except BackendUnavailable as exc:
            log.log(self._level, "limiter release failed, the lease will lapse: %s", exc.__cause__)
        else:
            self._wake_up()  # the local head may retry now, before the message comes round

    async def _withdraw(self, callers: set[str]) -> None:
        with contextlib.suppress(BackendUnavailable):  # a dead replica's demand lapses
            await self._redis("withdraw", self._scripts.withdraw(sorted(callers)))

    async def _listen(self) -> None:
        """One subscription per limiter: any release in the fleet wakes the dispatcher."""

        def lost(exc: BackendUnavailable) -> None:
            if self._on_failure is not None:
                self._on_failure(exc)
            log.log(self._level, "limiter wake-ups lost, waiting on hints: %s", exc.__cause__)

        # The scripts PUBLISH (not SPUBLISH), which reaches every node of a cluster too.
        bus = RedisBus(self._client, clock=self._clock)
        await bus.listen(self.keys.released, lambda _: self._wake_up(), on_lost=lost, sharded=False)

    def _spawn(self, work: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _failure(self, action: str, cause: BaseException) -> BackendUnavailable:
        """A ``BackendUnavailable`` for ``action``, reported to ``on_failure``."""
        failure = BackendUnavailable(f"Shared limiter unavailable ({action}).")
        failure.__cause__ = cause
        if self._on_failure is not None:
            self._on_failure(failure)
        return failure

    async def _redis(self, action: str, call: Awaitable[T]) -> T:
        """A Redis call, bounded; its failure reported to ``on_failure`` and raised."""
        try:
            with redis_errors(f"limiter {action}"):
                async with asyncio.timeout(_OP_BOUND_S):
                    return await call
        except BackendUnavailable as exc:
            if self._on_failure is not None:
                self._on_failure(exc)
            raise


def _one_more(rule: CallerPolicy) -> CallerPolicy:
    if rule.max_queue is None:
        return rule
    return CallerPolicy(rule.weight, rule.max_in_flight, rule.max_queue + 1)


class RedisPermit:
    """A permit of ``RedisLimiter``: ``sent()`` records its start at Redis's time (once).

    Granted ahead of the window's edge, ``sent()`` first waits for it and checks the permit
    again (``PermitLost`` if it lapsed meanwhile). The start is recorded in the background: the
    request goes out without waiting for Redis, and until the record lands the start stays
    pending (counted as in the window), the safe side. A permit released before it landed
    records its start at release, later still.
    """

    def __init__(self, limiter: RedisLimiter, grant: Grant) -> None:
        self.lease = grant.lease
        self.grant = grant
        self.recorded = False
        self.went_out = False
        self.renewed_at = grant.asked_at  # its lease runs from no earlier than this (monotonic)
        self._limiter = limiter

    @property
    def not_before(self) -> float:
        return self.grant.not_before

    def check(self) -> None:
        self._limiter.check(self.grant)

    async def sent(self) -> None:
        if self.went_out:
            return
        if await hold_until(self._limiter._clock, self.grant.not_before):
            self.check()  # held: a freeze or a lost epoch meanwhile means it may not go out
            if self.went_out:
                return  # another ``sent()`` ended its hold first
        self.went_out = True
        self._limiter._spawn(self._record(self._limiter._clock.monotonic()))

    async def _record(self, sent_at: float) -> None:
        self.recorded = await self._limiter.record_sent(self.lease, sent_at, self.grant)
