"""The Lua scripts of ``RedisLimiter``, each beside the typed method that calls it.

As redis-py's ``Lock`` does it: ``LimiterScripts`` holds each script's source next to the
method that builds its ``KEYS`` and ``ARGV`` (the one place their order is written) and
parses its reply. The methods return the awaitable of the call; ``RedisLimiter`` bounds it
and translates its errors.

Times are Redis ``TIME`` in ms; every key shares one hash tag (Redis Cluster). No key carries a
TTL: under a ``volatile-*`` eviction policy Redis never evicts them (``allkeys-*`` is refused
at start-up), and the scripts remove what has lapsed themselves.

Every script that can grant or claim runs ``generation`` first: the shared state's epoch lives
in ``meta``; when it is missing, Redis lost its data (restarted empty, flushed, evicted), so a
new epoch starts with a gate that opens only after every lease nobody can see any more has
surely lapsed (``hold``: the longest lease plus a window). So does one kept by another lineage
(``meta`` also holds the primary's replication id and replica count): a promoted replica or a
primary that lost a replica (a failover) may lack, or be alone in holding, recent grants. A
caller naming another epoch gets ``{-1, 0, epoch}`` and nothing else happens.

Redis counts every command a script runs (``INFO commandstats``), so the scripts are written
to run few: a try that finds nothing free costs about 15, whatever the queue's depth.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

from redis.commands.core import AsyncScript

from gateway.redis_client import AnyRedis

_CLOCK = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

# The shared state's epoch; a missing one is made anew, its gate ``hold`` ms from now. So is
# one kept by another lineage of the data (README "Redis shapes", Sentinel): a server
# whose replication id changed (a promoted replica, a restart) may lack the last writes of the
# one before, and one that lost a replica may have been replaced by it in a failover while it
# still takes the writes of gateways that have not followed yet.
_GENERATION = """
local function lineage()
  local info = redis.pcall('INFO', 'replication')
  if type(info) ~= 'string' then return '', 0 end  -- INFO denied (ACL): the epoch alone
  local replicas = tonumber(string.match(info, 'connected_slaves:(%d+)') or '0')
  return string.match(info, 'master_replid:(%w+)') or '', replicas
end
local function generation(meta, now, hold)
  local state = redis.call('HMGET', meta, 'epoch', 'replid', 'replicas')
  local epoch, seen, had = state[1], state[2], tonumber(state[3]) or 0
  local replid, replicas = lineage()
  if epoch and (not seen or (seen == replid and replicas >= had)) then
    if seen ~= replid or replicas ~= had then  -- adopted (set before lineages), or a new replica
      redis.call('HSET', meta, 'replid', replid, 'replicas', replicas)
    end
    return epoch
  end
  epoch = string.format('%.3f', now)
  redis.call('HSET', meta, 'epoch', epoch, 'gate', now + hold)
  redis.call('HSET', meta, 'replid', replid, 'replicas', replicas)
  return epoch
end
"""


@dataclass(frozen=True, slots=True)
class LimiterKeys:
    """The limiter's keys under one hash tag, ``{namespace:limit}:name``."""

    meta: str
    leases: str
    starts: str
    members: str
    demand: str
    wants: str
    finish: str
    policy: str
    since: str
    probe: str
    released: str  # the pub/sub channel

    @classmethod
    def for_namespace(cls, namespace: str) -> LimiterKeys:
        tag = f"{{{namespace}:limit}}"
        names = (
            "meta",
            "leases",
            "starts",
            "members",
            "demand",
            "wants",
            "finish",
            "policy",
            "since",
            "probe",
        )
        return cls(*(f"{tag}:{name}" for name in (*names, "released")))


class Wait(enum.Enum):
    """What can end a replica's wait for permits sooner than the hint."""

    TIME = "time"  # the window or the gate: only time frees a start, never a release
    RELEASE = "release"  # every permit is held: a release frees one
    TURN = "turn"  # permits are free but fell to callers waiting elsewhere (or to a cap)


@dataclass(frozen=True, slots=True)
class CallerDemand:
    """One caller's demand on this replica, as ``acquire`` tells Redis."""

    caller: str
    waiters: int  # all of them (Redis counts at most max); 0: its demand here is removed
    weight: float
    cap: int  # permits it may hold fleet-wide at once; 0: no cap


@dataclass(frozen=True, slots=True)
class Limits:
    """What every ``acquire`` says about the limit and this replica (fixed per limiter)."""

    max_concurrent: int
    window_ms: float
    lease_ms: float
    hold_ms: float
    share: int  # what a replica not heard from may use on its own
    replicas: int
    demand_ttl_ms: int  # a replica's demand lapses this long after its latest try
    blocked_hint_ms: int  # every permit held: retry after this at the latest
    behind_hint_ms: int  # others' turns: retry after this at the latest
    ahead_ms: float = 0.0  # a start leaving the window this soon counts as gone (edge awaited)


@dataclass(frozen=True, slots=True)
class AcquireResult:
    """An ``acquire``'s outcome: the epoch it ran in (``stale`` when it was not the one asked
    for: nothing was done), the permits granted here per caller, and when to try again
    (``hint_s`` at the latest, sooner on what ``wait`` names) if waiters are left;
    ``not_before_s``: how long after Redis ran the script the window's edge comes that the
    grants were made ahead of (0: they may be sent at once); ``redis_ms``: Redis's time as the
    script ran (with grants only)."""

    epoch: str
    stale: bool
    grants: tuple[tuple[str, int], ...]
    hint_s: float
    wait: Wait
    not_before_s: float = 0.0
    redis_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class BeatResult:
    """A heartbeat's reply (``late``: it reached Redis after its "not after", nothing done)."""

    late: bool
    members: int = 0
    epoch: str = ""
    in_flight: int = 0
    starts: int = 0
    lost: tuple[str, ...] = ()  # leases asked to renew that were gone


class LimiterScripts:
    """The limiter's scripts, registered once on ``client`` (``EVALSHA``, loaded on demand)."""

    # KEYS meta leases starts members demand wants finish policy since
    # ARGV see ``acquire``
    # -> {granted, hint us, epoch, wait, not before us, now ms, caller, n, caller, n...};
    #    {-1, 0, epoch, 'time', 0} when the epoch asked for is not the current one (nothing done)
    ACQUIRE = (
        _CLOCK
        + _GENERATION
        + r"""
local now = clock()
local epoch = generation(KEYS[1], now, tonumber(ARGV[6]))
if epoch ~= ARGV[1] then return {-1, 0, epoch, 'time', 0} end
local max, window, lease_ms = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local ttl, replica, bg, ticket = tonumber(ARGV[9]), ARGV[5], ARGV[13], ARGV[14]
local function us(ms) return math.max(1, math.ceil(ms * 1000)) end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 100)
if #dead > 0 then
  redis.call('ZREM', KEYS[5], unpack(dead))
  redis.call('HDEL', KEYS[6], unpack(dead))
  redis.call('ZREM', KEYS[9], unpack(dead))
end
-- this replica's demand per caller (demand "replica\ncaller" -> waiters, at most max, kept
-- alive); ``asked``: all its waiters here, so a grant that serves them all ends the demand
local mine, asked = {}, {}
for i = 17, 16 + 4 * tonumber(ARGV[15]), 4 do
  local caller = ARGV[i]
  local want = math.min(tonumber(ARGV[i + 1]), tonumber(ARGV[2]))
  local d = replica .. '\n' .. caller
  redis.call('HSET', KEYS[8], caller, ARGV[i + 2] .. ' ' .. ARGV[i + 3])
  if want > 0 then
    mine[caller], asked[caller] = want, tonumber(ARGV[i + 1])
    redis.call('ZADD', KEYS[5], now + ttl, d)
    redis.call('HSET', KEYS[6], d, want)
    redis.call('ZADD', KEYS[9], 'NX', now, d)
  else
    redis.call('ZREM', KEYS[5], d)
    redis.call('HDEL', KEYS[6], d)
    redis.call('ZREM', KEYS[9], d)
  end
end
local gate = tonumber(redis.call('HGET', KEYS[1], 'gate') or '0')
if gate > now then return {0, us(math.min(gate - now, window)), epoch, 'time', 0} end
-- every replica not heard from may be on its fallback share: that much is not the fleet's
local missing = math.max(0, tonumber(ARGV[8]) - redis.call('ZCARD', KEYS[4]))
max = max - tonumber(ARGV[7]) * missing
local leases, starts = redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])
-- a start leaving the window within ``ahead`` counts as gone: a permit granted in its place
-- waits for its exit (the reply says when), so no start comes before the window allows it
local ahead, soon = tonumber(ARGV[16]), 0
if ahead > 0 and starts >= max then
  soon = redis.call('ZCOUNT', KEYS[3], '-inf', now - window + ahead)
end
local live = starts - soon
-- what a replica with waiters left waits on next. Every permit held: a release (its message)
-- or the nearest lease expiry. A full window: only time frees a start (a release records one,
-- it never removes one), so the replica sleeps until the oldest start leaves, deaf to releases.
local function blocked(leases, starts)
  if leases >= max then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    local hint = tonumber(ARGV[10])
    if first[2] then hint = math.min(tonumber(first[2]) - now, hint) end
    return us(hint), 'release'
  end
  if starts >= max then
    -- a pending start (scored in the future) leaves a window after it is sent: not before now
    local oldest = redis.call('ZRANGE', KEYS[3], soon, soon, 'WITHSCORES')
    return us(math.min(tonumber(oldest[2]), now) + window - ahead - now), 'time'
  end
  return us(tonumber(ARGV[11])), 'turn'
end
if leases >= max or live >= max then
  local hint, wait = blocked(leases, live)
  return {0, hint, epoch, wait, 0}
end
local free = math.min(max - leases, max - live)
-- the fleet's demand and holdings per caller (a lease is named "caller\nticket:i")
local total, held, policy, before = {}, {}, {}, {}
local ds = redis.call('ZRANGE', KEYS[9], 0, -1)  -- oldest demand first
if #ds > 0 then
  local ws = redis.call('HMGET', KEYS[6], unpack(ds))
  for i, d in ipairs(ds) do
    local r, caller = string.match(d, '^(.-)\n(.*)$')
    if r == replica then before[caller] = total[caller] or 0 end  -- older demand of it
    total[caller] = (total[caller] or 0) + (tonumber(ws[i]) or 0)
  end
end
for _, lease in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local caller = string.match(lease, '^(.-)\n')
  if caller then held[caller] = (held[caller] or 0) + 1 end
end
local function rule(caller)
  if not policy[caller] then
    local text = redis.call('HGET', KEYS[8], caller) or '1 0'
    local w, c = string.match(text, '^(%S+) (%S+)$')
    policy[caller] = {tonumber(w) or 1, tonumber(c) or 0}
  end
  return policy[caller]
end
-- start-time fair queuing between callers, fleet-wide (as gateway.limiter.scheduler): each permit
-- goes to the smallest start tag max(v, finish); a grant moves its finish by 1 / weight
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local finish, first, alloc = {}, {}, {}
local callers = false
for i = 1, free do
  local best, best_start = nil, nil
  for caller, want in pairs(total) do
    if caller ~= bg and want > 0 then
      callers = true
      local cap = rule(caller)[2]
      if cap <= 0 or (held[caller] or 0) + (alloc[caller] or 0) < cap then
        if finish[caller] == nil then
          finish[caller] = tonumber(redis.call('HGET', KEYS[7], caller) or '0')
        end
        local start = math.max(v, finish[caller])
        if best == nil or start < best_start or (start == best_start and caller < best) then
          best, best_start = caller, start
        end
      end
    end
  end
  if best == nil then break end
  total[best] = total[best] - 1
  alloc[best] = (alloc[best] or 0) + 1
  first[best] = first[best] or best_start
  finish[best] = best_start + 1 / rule(best)[1]
  v = best_start
end
-- background work only takes permits no caller anywhere waits for, within its cap
if not callers and mine[bg] then
  local cap = rule(bg)[2]
  alloc[bg] = math.max(0, math.min(free, cap - (held[bg] or 0)))
  first[bg] = v
end
-- this replica takes what fell to its callers, after the older demand of the same caller on
-- other replicas; the rest waits for the replicas it fell to (then this demand goes last)
-- ``now`` as text: a Lua number would reach the caller truncated to whole ms
local reply, granted, top = {0, 0, epoch, 'turn', 0, string.format('%.3f', now)}, 0, nil
for caller, n in pairs(alloc) do
  local g = math.min(n - (before[caller] or 0), mine[caller] or 0)
  if g > 0 then
    local d = replica .. '\n' .. caller
    if g >= asked[caller] then  -- every waiter of it here served: its demand here ends
      redis.call('ZREM', KEYS[5], d)
      redis.call('HDEL', KEYS[6], d)
      redis.call('ZREM', KEYS[9], d)
    else
      redis.call('ZADD', KEYS[9], 'XX', now, d)
    end
    for i = 1, g do
      local lease = caller .. '\n' .. ticket .. ':' .. i
      redis.call('ZADD', KEYS[2], now + lease_ms, lease)
      redis.call('ZADD', KEYS[3], now + lease_ms, lease)  -- pending until sent
    end
    if caller ~= bg then
      redis.call('HSET', KEYS[7], caller, first[caller] + g / rule(caller)[1])
      top = math.max(top or first[caller], first[caller])
    end
    granted = granted + g
    reply[#reply + 1] = caller
    reply[#reply + 1] = g
  end
end
if top then redis.call('HSET', KEYS[1], 'v', top) end
reply[1] = granted
-- granted in place of starts still in the window: sent once the latest of those has left
local over = starts + granted - max
if granted > 0 and over > 0 then
  local edge = redis.call('ZRANGE', KEYS[3], over - 1, over - 1, 'WITHSCORES')
  reply[5] = us(tonumber(edge[2]) + window - now)
end
-- when to try again if waiters are left here: the caller need not ask only to hear it
reply[2], reply[4] = blocked(leases + granted, live + granted)
if free > granted and #ds > 0 then redis.call('PUBLISH', ARGV[12], 'spare') end
return reply
"""
    )

    # KEYS meta leases starts members
    # ARGV epoch ('' to join any), replica, member ttl ms, not after (unix ms), lease ms,
    #      hold ms, window ms, leases to renew...
    # -> {live members, epoch, leases in flight, starts in window, lost leases...};
    #    {-2} if it arrived after "not after"
    HEARTBEAT = (
        _CLOCK
        + _GENERATION
        + """
local now = clock()
-- a claim that waited in a paused or cut-off Redis must not revive a replica on its fallback
if now > tonumber(ARGV[4]) then return {-2} end
local lease_ms = tonumber(ARGV[5])
local epoch = generation(KEYS[1], now, tonumber(ARGV[6]))
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[2])
local in_flight = redis.call('ZCOUNT', KEYS[2], '(' .. now, '+inf')
local starts = redis.call('ZCOUNT', KEYS[3], '(' .. (now - tonumber(ARGV[7])), '+inf')
local reply = {redis.call('ZCARD', KEYS[4]), epoch, in_flight, starts}
if epoch ~= ARGV[1] then return reply end  -- held leases belong to a lost epoch: nothing to renew
for i = 8, #ARGV do
  if redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[i])
  else
    reply[#reply + 1] = ARGV[i]
  end
  if tonumber(redis.call('ZSCORE', KEYS[3], ARGV[i]) or '0') > now then
    redis.call('ZADD', KEYS[3], now + lease_ms, ARGV[i])  -- still pending: keeps its place
  end
end
return reply
"""
    )

    # KEYS starts; ARGV lease, ms since it was sent, a time (ms) Redis's clock had surely not
    # passed when it was sent ('' if none). Records its start then, as Redis's clock has it: no
    # earlier than it was, since the ms were counted before this ran; or at the time given if
    # that is sooner (XX: a lapsed lease is not revived).
    SENT = (
        _CLOCK
        + """
local at, bound = clock() - tonumber(ARGV[2]), tonumber(ARGV[3])
if bound and bound < at then at = bound end
redis.call('ZADD', KEYS[1], 'XX', at, ARGV[1])
"""
    )

    # KEYS leases starts; ARGV channel, lease, 1 to record its start now (never sent), ms until
    # the window's edge it was granted ahead of (not counted before it).
    RELEASE = (
        _CLOCK
        + """
if ARGV[3] == '1' then
  redis.call('ZADD', KEYS[2], 'XX', clock() + tonumber(ARGV[4]), ARGV[2])
end
if redis.call('ZREM', KEYS[1], ARGV[2]) > 0 then redis.call('PUBLISH', ARGV[1], 'freed') end
"""
    )

    # KEYS demand wants since; ARGV channel, replica, callers... This replica's demand for
    # those callers is gone (nobody waits any more); publishes if there was any.
    WITHDRAW = r"""
local gone = 0
for i = 3, #ARGV do
  local d = ARGV[2] .. '\n' .. ARGV[i]
  gone = gone + redis.call('ZREM', KEYS[1], d)
  redis.call('HDEL', KEYS[2], d)
  redis.call('ZREM', KEYS[3], d)
end
if gone > 0 then redis.call('PUBLISH', ARGV[1], 'freed') end
return gone
"""

    # KEYS probe; ARGV replica. A write: Redis takes writes again.
    PROBE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', 1000)
"""

    def __init__(self, client: AnyRedis, keys: LimiterKeys, replica: str) -> None:
        self.keys = keys
        self.replica = replica
        self._acquire: AsyncScript = client.register_script(self.ACQUIRE)
        self._heartbeat: AsyncScript = client.register_script(self.HEARTBEAT)
        self._sent: AsyncScript = client.register_script(self.SENT)
        self._release: AsyncScript = client.register_script(self.RELEASE)
        self._withdraw: AsyncScript = client.register_script(self.WITHDRAW)
        self._probe: AsyncScript = client.register_script(self.PROBE)

    async def acquire(
        self,
        limits: Limits,
        *,
        epoch: str,
        ticket: str,
        background: str,
        callers: Sequence[CallerDemand],
    ) -> AcquireResult:
        """Tell Redis this replica's demand per caller and take the permits that fall to it
        (leases named ``caller\\nticket:i``, their starts pending until sent). A caller
        granted as many as its ``waiters`` has no demand here any more (no withdraw needed)."""
        k = self.keys
        keys = [k.meta, k.leases, k.starts, k.members, k.demand, k.wants, k.finish, k.policy]
        keys.append(k.since)
        args: list[str | float] = [epoch, limits.max_concurrent, limits.window_ms]  # 1-3
        args += [limits.lease_ms, self.replica, limits.hold_ms, limits.share]  # 4-7
        args += [limits.replicas, limits.demand_ttl_ms]  # 8-9
        args += [limits.blocked_hint_ms, limits.behind_hint_ms]  # 10-11
        args += [k.released, background, ticket, len(callers), limits.ahead_ms]  # 12-16
        for d in callers:  # 17..: 4 per caller
            args += [d.caller, d.waiters, d.weight, d.cap]
        reply = await self._acquire(keys, args)
        pairs = reply[6:]
        grants = tuple((_text(pairs[i]), int(pairs[i + 1])) for i in range(0, len(pairs), 2))
        granted = int(reply[0])
        return AcquireResult(
            epoch=_text(reply[2]),
            stale=granted < 0,
            grants=grants,
            hint_s=int(reply[1]) / 1e6,
            wait=Wait(_text(reply[3])),
            not_before_s=int(reply[4]) / 1e6,
            redis_ms=float(_text(reply[5])) if granted > 0 else 0.0,
        )

    async def heartbeat(
        self,
        *,
        epoch: str,
        member_ttl_ms: int,
        not_after_ms: int,
        lease_ms: int,
        hold_ms: int,
        window_ms: int,
        renew: Sequence[str],
    ) -> BeatResult:
        """Claim membership until ``member_ttl_ms`` from now (unless it is past
        ``not_after_ms``, unix ms) and renew the leases in ``renew`` for ``lease_ms``."""
        k = self.keys
        args: list[str | int] = [epoch, self.replica, member_ttl_ms, not_after_ms, lease_ms]
        args += [hold_ms, window_ms, *renew]
        reply = await self._heartbeat([k.meta, k.leases, k.starts, k.members], args)
        if int(reply[0]) < 0:
            return BeatResult(late=True)
        return BeatResult(
            late=False,
            members=int(reply[0]),
            epoch=_text(reply[1]),
            in_flight=int(reply[2]),
            starts=int(reply[3]),
            lost=tuple(map(_text, reply[4:])),
        )

    def sent(
        self, lease: str, *, ago_s: float, not_after_ms: float | None = None
    ) -> Awaitable[object]:
        """Record ``lease``'s start ``ago_s`` before Redis's time now (a lapsed lease is not
        revived); ``ago_s`` must be counted before the call, so the record is never early.
        ``not_after_ms``: a Redis time its clock had surely not passed when the request went
        out; the record is the sooner of the two."""
        bound = "" if not_after_ms is None else f"{not_after_ms:.3f}"
        return self._sent([self.keys.starts], [lease, max(0.0, ago_s * 1000), bound])

    def release(
        self, lease: str, *, record_start: bool, not_before_s: float = 0.0
    ) -> Awaitable[object]:
        """End ``lease`` (publishing "freed" if it was held); ``record_start``: its start was
        never recorded, so it is recorded now, or ``not_before_s`` from now (the edge it was
        granted ahead of) if that is later."""
        k = self.keys
        args: list[str | float] = [
            k.released,
            lease,
            int(record_start),
            max(0.0, not_before_s * 1000),
        ]
        return self._release([k.leases, k.starts], args)

    def withdraw(self, callers: Sequence[str]) -> Awaitable[object]:
        """This replica's demand for ``callers`` is gone (publishes if there was any)."""
        k = self.keys
        return self._withdraw(
            [k.demand, k.wants, k.since], [k.released, self.replica, *sorted(callers)]
        )

    def probe(self) -> Awaitable[object]:
        """A write, so a Redis that refuses writes fails it."""
        return self._probe([self.keys.probe], [self.replica])


def _text(value: bytes | str | int) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
