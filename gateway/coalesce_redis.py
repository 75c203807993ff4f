"""Cross-replica coalescing: identical misses cost the upstream one call fleet-wide.

Within a replica, callers of one key share one local round (``InProcessCoalescer``). Across
replicas, a round's leader takes ``<key>:lock``, whose value names the leader's replica and
the round (``<replica>.<token>``), and, when it is done, one script stores the outcome under
``<key>:outcome:<value>`` for a lease, PUBLISHes it and deletes the lock. The other replicas'
rounds follow: they were listening before they tried the lock (one ``redis_bus`` subscription
per coalescer to the namespace's one outcome channel, confirmed before the first round; each
message names its key and the receiver routes it), so the message wakes them within
milliseconds. On Redis Cluster the script cannot publish on that channel (another slot): the
leader publishes right after it, and a message lost between the two costs latency, as any lost
message does.

Liveness is per replica, not per lock, so a round's Redis commands do not grow with how long
its leader waits for a permit: each coalescer renews one membership key,
``<ns>:coalesce:replica:<id>``, every lease/3 (PX a lease); a lock's own expiry is only a
backstop (the longest a round can run, ``max_wait_s``, plus a lease). At every half lease a
follower re-runs the acquire script, which returns the outcome of a round it knows of (a
message lost to a reconnect costs latency, not a call), or takes the lock if it vanished, or if
the holder it saw last still holds it but that holder's membership key is gone (its replica
crashed or froze): exactly one waiter wins and leads, the others learn its value and keep
waiting, so a dead leader is replaced within about 1.5 leases. On a cluster the membership key
lives in another slot: the follower reads it (``EXISTS``) just before the script instead of
inside it; a holder that came back in between loses its round as if it had stayed frozen.

A leader whose round was taken over (it froze, or was cut off from Redis for a lease) finishes
without storing or publishing anything: its outcome goes to its own callers only, never over
the new leader's round. A leader whose local callers all went away (its fetch is cancelled)
releases the lock and says so on the channel: one follower leads now. The finish runs after the
leader's callers have their answer (a task that ``close`` waits for); ``fetch`` has stored the
answer in the cache by then, so a replica that finds the lock gone finds the cache filled.

Names and the outcome format (never pickle) are in ``coalesce_wire``.

Fail open: when Redis fails (``BackendUnavailable``, translated in ``_redis_errors`` only),
the round runs ``fetch`` itself, so callers still get answers, coalesced per replica only;
Redis is then left alone for a second. Keys get a ``{hash tag}`` unless they carry one, and
every key and channel starts with the namespace.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections import deque
from collections.abc import Awaitable, Callable

from gateway.clock import Clock
from gateway.coalesce import InProcessCoalescer
from gateway.coalesce_wire import (
    RELEASED,
    Outcome,
    decode_outcome,
    encode_outcome,
    holder_replica,
    lock_key,
    member_key,
    outcome_channel,
    outcome_message,
    round_key,
    tagged,
)
from gateway.errors import BackendUnavailable, QueueTimeout
from gateway.redis_bus import RedisBus, Subscription
from gateway.redis_client import AnyRedis, redis_errors
from gateway.settings import DEFAULT_NAMESPACE
from gateway.upstream import UpstreamResponse

log = logging.getLogger("gateway.coalesce")

_REDIS_PAUSE_S = 1.0  # after a Redis failure, rounds fail open at once for this long

# KEYS[1] lock, KEYS[2] the membership key of the holder seen last when n = ARGV[3] is 1 (0:
# none, or a cluster), then the outcomes of the rounds this caller waits on. ARGV: value,
# backstop ms, n, the holder seen last ('' none), '1' when the caller found that holder's
# membership gone (a cluster: read before the script). The lock taken as it was (SET NX)
# costs what it did before membership keys: no more commands per round.
_ACQUIRE = """
local n = tonumber(ARGV[3])
for i = 2 + n, #KEYS do
  local outcome = redis.call('GET', KEYS[i])
  if outcome then return {'done', outcome} end
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'won'} end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[4] and ((n == 1 and redis.call('EXISTS', KEYS[2]) == 0) or ARGV[5] == '1') then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'won'}
end
return {'held', holder}
"""
# KEYS[1] lock; ARGV value, backstop ms.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS[1] lock, KEYS[2] this round's outcome; ARGV value, outcome, keep ms (0: a release, the
# outcome is RELEASED and not kept), channel ("": the caller publishes), message. Returns 0
# (nothing done) when another round holds the lock: this one was taken over.
_FINISH = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if ARGV[3] ~= '0' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
if holder then redis.call('DEL', KEYS[1]) end
return 1
"""


class _Inbox:
    """Outcome messages for one local round, buffered so none is lost between waits."""

    def __init__(self) -> None:
        self.items: deque[bytes] = deque()
        self._wake: asyncio.Future[None] | None = None

    def put(self, data: bytes) -> None:
        self.items.append(data)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def get(self, within: float, clock: Clock) -> bytes | None:
        """The next message, or None after ``within`` seconds of ``clock``."""
        if not self.items:
            wake = self._wake = asyncio.get_running_loop().create_future()

            def expire() -> None:
                if not wake.done():
                    wake.set_result(None)

            timer = clock.call_later(within, expire)
            try:
                await wake
            finally:
                timer.cancel()
                self._wake = None
        return self.items.popleft() if self.items else None


class RedisCoalescer:
    """``Coalescer[UpstreamResponse]`` for a fleet sharing one Redis (see the module doc).

    ``lease_s``: the life of this replica's membership without renewal, so a crashed or frozen
    leader is replaced within about 1.5 leases. ``max_wait_s``: the longest a follower waits
    for another replica's answer, after which it gets ``QueueTimeout``; it is also the longest
    a round is expected to run (a lock lives that long plus a lease unless renewed). ``client``
    must return bytes (no decode_responses).
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        lease_s: float,
        max_wait_s: float,
        clock: Clock,
        namespace: str = DEFAULT_NAMESPACE,
    ) -> None:
        if client.get_encoder().decode_responses:
            raise ValueError("RedisCoalescer needs a client that returns bytes")
        self._client = client
        self._lease_ms = max(1, round(lease_s * 1000))
        self._lease_s = lease_s
        self._max_wait_s = max_wait_s
        # A live leader's lock expires by itself only past the longest round; a longer one is
        # renewed a lease before that (never, when fetch keeps to max_wait_s).
        self._renew_s = max(max_wait_s, lease_s)
        self._backstop_s = self._renew_s + lease_s
        self._backstop_ms = max(1, round(self._backstop_s * 1000))
        self._clock = clock
        self._namespace = namespace
        self._replica = secrets.token_hex(8)
        self._member = member_key(self._replica, namespace)
        self._acquire = client.register_script(_ACQUIRE)
        self._extend = client.register_script(_EXTEND)
        self._finish = client.register_script(_FINISH)
        self._closing = False
        self._local = InProcessCoalescer[tuple[UpstreamResponse, bool]]()
        self._inboxes: dict[str, list[_Inbox]] = {}
        self._rounds: set[asyncio.Task[object]] = set()
        self._finishing: set[asyncio.Task[None]] = set()
        self._bus = RedisBus(client, clock=clock)
        self._listener: Subscription | None = None
        self._membership: asyncio.Task[None] | None = None
        self._redis_paused_until = -math.inf

    def waiting(self) -> int:
        return self._local.waiting()

    async def run(
        self, key: str, fetch: Callable[[], Awaitable[UpstreamResponse]]
    ) -> tuple[UpstreamResponse, bool]:
        (response, fetched), local_leader = await self._local.run(
            key, lambda: self._round(key, fetch)
        )
        return response, fetched and local_leader

    async def close(self) -> None:
        """Stop listening and abandon rounds in flight (their locks are left as in a crash);
        finishes already under way complete first. This replica's membership key is deleted,
        so followers elsewhere take its abandoned rounds over at their next re-check."""
        self._closing = True
        for task in self._rounds:
            task.cancel()
        await asyncio.gather(*self._rounds, return_exceptions=True)
        await asyncio.gather(*self._finishing, return_exceptions=True)
        membership, self._membership = self._membership, None
        if membership is not None:
            membership.cancel()
            await asyncio.gather(membership, return_exceptions=True)
            try:
                with redis_errors("coalescing leave"):
                    await self._client.delete(self._member)
            except BackendUnavailable:  # it lapses within a lease by itself
                log.warning("coalescer: deleting the membership key failed", exc_info=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()

    async def _round(
        self, key: str, fetch: Callable[[], Awaitable[UpstreamResponse]]
    ) -> tuple[UpstreamResponse, bool]:
        task = asyncio.current_task()
        assert task is not None
        self._rounds.add(task)
        route = tagged(key)
        inbox = _Inbox()
        self._inboxes.setdefault(route, []).append(inbox)  # before the lock: no lost wake-up
        try:
            if self._clock.monotonic() < self._redis_paused_until:
                outcome, led = await _capture(fetch), True
            else:
                try:
                    outcome, led = await self._coordinate(key, fetch, inbox)
                except BackendUnavailable:
                    log.warning("coalescer: Redis failed; coalescing in-process", exc_info=True)
                    self._redis_paused_until = self._clock.monotonic() + _REDIS_PAUSE_S
                    outcome, led = await _capture(fetch), True
        finally:
            self._rounds.discard(task)
            waiting = self._inboxes.get(route, [])
            waiting.remove(inbox)
            if not waiting:
                self._inboxes.pop(route, None)
        return outcome.unwrap(), led

    async def _coordinate(
        self, key: str, fetch: Callable[[], Awaitable[UpstreamResponse]], inbox: _Inbox
    ) -> tuple[Outcome, bool]:
        """Lead (True) or follow this round; raises BackendUnavailable before any fetch."""
        await self._listen()
        await self._join()
        base = round_key(key, self._namespace)
        lock = base + ":lock"
        value = f"{self._replica}.{secrets.token_hex(16)}"
        rounds: list[str] = []  # outcome keys of the leaders seen holding the lock
        holder = b""  # the lock's value when it was last seen held
        deadline = self._clock.monotonic() + self._max_wait_s
        while True:
            while inbox.items:  # a message that came while we looked elsewhere
                if (outcome := decode_outcome(inbox.items.popleft())) is not None:
                    return outcome, False
            with redis_errors("coalescing acquire"):
                members, gone = await self._holder_liveness(holder)
                reply = await self._acquire(
                    keys=[lock, *members, *rounds],
                    args=[value, self._backstop_ms, len(members), holder, gone],
                )
            state, seen = (*reply, None, None)[:2] if isinstance(reply, list) else (None, None)
            if state == b"won":
                return await self._lead(key, value, fetch), True
            if state == b"done" and (outcome := decode_outcome(seen)) is not None:
                return outcome, False
            if state == b"held" and isinstance(seen, bytes):
                holder = seen
                held = base + ":outcome:" + seen.decode("ascii", "replace")
                if held not in rounds:
                    rounds.append(held)
            check_at = min(deadline, self._clock.monotonic() + self._lease_s / 2)
            while (left := check_at - self._clock.monotonic()) > 0:
                data = await inbox.get(left, self._clock)
                if data == RELEASED:
                    break
                if data is not None and (outcome := decode_outcome(data)) is not None:
                    return outcome, False
            if self._clock.monotonic() >= deadline:
                return Outcome(error=QueueTimeout(1.0, "Waited too long for a shared call.")), False

    async def _holder_liveness(self, holder: bytes) -> tuple[list[str], str]:
        """The acquire script's membership key (standalone: the holder's, if its lock names
        one) and, on a cluster, "1" when that key is gone (read here: another slot). Our own
        membership needs no refresh there: it is renewed every lease/3, sooner than any
        follower's first re-check (lease/2) after it saw our lock."""
        replica = holder_replica(holder) if holder else None
        if replica is None:
            return [], ""
        theirs = member_key(replica, self._namespace)
        if self._bus.in_scripts:
            return [theirs], ""
        return [], "" if await self._client.exists(theirs) else "1"

    async def _lead(
        self, key: str, value: str, fetch: Callable[[], Awaitable[UpstreamResponse]]
    ) -> Outcome:
        renewal = asyncio.create_task(self._renew(lock_key(key, self._namespace), value))
        try:
            outcome = await _capture(fetch)
        except asyncio.CancelledError:
            if not self._closing:  # our callers left; on close the lock is left as in a crash
                await self._end(key, value, RELEASED, 0)
            raise
        finally:
            renewal.cancel()
        # Off the answer path: our callers have the outcome now, followers a round trip later.
        # fetch stored the answer in the cache before returning, so the lock goes after it.
        finish = asyncio.ensure_future(
            self._end(key, value, encode_outcome(outcome), self._lease_ms)
        )
        self._finishing.add(finish)
        finish.add_done_callback(self._finishing.discard)
        return outcome

    async def _end(self, key: str, value: str, outcome: bytes, keep_ms: int) -> None:
        base = round_key(key, self._namespace)
        channel = outcome_channel(self._namespace)
        message = outcome_message(key, outcome)
        in_scripts = self._bus.in_scripts
        try:
            with redis_errors("coalescing finish"):
                ours = await self._finish(
                    keys=[base + ":lock", base + ":outcome:" + value],
                    args=[value, outcome, keep_ms, channel if in_scripts else "", message],
                )
            if not ours:
                log.warning("coalescer: a round was taken over; its outcome stays local")
            elif not in_scripts:
                await self._bus.publish(channel, message)
        except BackendUnavailable:  # followers take over when the lock expires
            log.warning("coalescer: ending a round in Redis failed", exc_info=True)

    async def _renew(self, lock: str, value: str) -> None:
        """The backstop's renewal, for a round longer than ``max_wait_s`` (none in the app)."""
        while True:
            await self._clock.sleep(self._renew_s)
            try:
                with redis_errors("coalescing renew"):
                    if not await self._extend(keys=[lock], args=[value, self._backstop_ms]):
                        log.warning("coalescer: lock lost while fetching; another may lead")
                        return
            except BackendUnavailable:
                log.warning("coalescer: renewing a lock failed", exc_info=True)

    async def _join(self) -> None:
        """Claim this replica's membership before its first coordinated round (a round whose
        claim fails fails open, as every Redis failure), then renew it every lease/3 until
        ``close``. Rounds that start together before the first claim each send one."""
        if self._membership is not None:
            return
        with redis_errors("coalescing membership"):
            await self._client.set(self._member, b"1", px=self._lease_ms)
        if self._membership is None and not self._closing:
            self._membership = asyncio.create_task(self._keep_membership())

    async def _keep_membership(self) -> None:
        while True:
            await self._clock.sleep(self._lease_s / 3)
            try:
                with redis_errors("coalescing membership"):
                    await self._client.set(self._member, b"1", px=self._lease_ms)
            except BackendUnavailable:  # followers may take our rounds over: a call, not a limit
                log.warning("coalescer: renewing this replica's membership failed", exc_info=True)

    async def _listen(self) -> None:
        """Subscribe to the outcome channel, confirmed before the first coordinated round
        (BackendUnavailable if Redis does not confirm it within a lease: that round fails
        open). Later losses do not hold rounds up: the subscription comes back by itself, and
        a message lost meanwhile costs a half-lease re-check, not a call.
        """
        if self._listener is None:
            self._listener = self._bus.subscribe(
                outcome_channel(self._namespace), self._heard, on_lost=self._lost
            )
            await self._listener.ready(self._lease_s)

    def _heard(self, data: bytes) -> None:
        route, sep, outcome = data.partition(b"\n")
        if sep:
            for inbox in self._inboxes.get(route.decode("utf-8", "replace"), ()):
                inbox.put(outcome)

    def _lost(self, exc: BackendUnavailable) -> None:
        log.warning("coalescer: outcome subscription lost (%s); re-checks go on", exc)


async def _capture(fetch: Callable[[], Awaitable[UpstreamResponse]]) -> Outcome:
    try:
        return Outcome(response=await fetch())
    except Exception as exc:  # handed to the round's waiters; CancelledError propagates
        return Outcome(error=exc)
