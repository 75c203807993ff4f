"""The Lua scripts of ``RedisLimiter`` and the names of its keys (see ``redis_limiter``).

Times are Redis ``TIME`` in ms; every key shares one hash tag (Redis Cluster). No key carries a
TTL: under a ``volatile-*`` eviction policy Redis never evicts them (``allkeys-*`` is refused
at start-up), and the scripts remove what has lapsed themselves.

Every script that can grant or claim runs ``GENERATION`` first: the shared state's epoch lives
in ``meta``; when it is missing, Redis lost its data (restarted empty, flushed, evicted), so a
new epoch starts with a gate that opens only after every lease nobody can see any more has
surely lapsed (``hold``: the longest lease plus a window). So does one kept by another lineage
(``meta`` also holds the primary's replication id and replica count): a promoted replica or a
primary that lost a replica (a failover) may lack, or be alone in holding, recent grants. A
caller naming another epoch gets ``{-1, 0, epoch}`` and nothing else happens.

    ACQUIRE    KEYS meta leases starts members demand wants finish policy since
               ARGV epoch, max, window ms, lease ms, replica, hold ms, share, replicas, demand
                    ttl ms, blocked hint ms, behind hint ms, channel, background caller, ticket,
                    n, then n x (caller, waiters, weight, cap: 0 for none)
               -> {granted, 0, epoch, caller, n, caller, n...} or {0, hint ms, epoch}
    HEARTBEAT  KEYS meta leases starts members
               ARGV epoch ('' to join any), replica, member ttl ms, not after (unix ms), lease
                    ms, hold ms, window ms, leases...
               -> {live members, epoch, leases in flight, starts in window, lost leases...};
                  {-2} if it arrived after ``not after``
    SENT       KEYS starts; ARGV lease. Records its start now (XX: a lapsed one is not revived).
    RELEASE    KEYS leases starts; ARGV channel, lease, 1 to record its start now (never sent).
    WITHDRAW   KEYS demand wants since; ARGV channel, replica, callers... This replica's demand for
               those callers is gone (nobody waits any more); publishes if there was any.
    PROBE      KEYS probe; ARGV replica. A write: Redis takes writes again.
"""

from __future__ import annotations

from dataclasses import dataclass

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

ACQUIRE = (
    _CLOCK
    + _GENERATION
    + r"""
local now = clock()
local epoch = generation(KEYS[1], now, tonumber(ARGV[6]))
if epoch ~= ARGV[1] then return {-1, 0, epoch} end
local window, lease_ms, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[9])
local replica, bg, ticket = ARGV[5], ARGV[13], ARGV[14]
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 100)
if #dead > 0 then
  redis.call('ZREM', KEYS[5], unpack(dead))
  redis.call('HDEL', KEYS[6], unpack(dead))
  redis.call('ZREM', KEYS[9], unpack(dead))
end
-- this replica's demand per caller (demand "replica\ncaller" -> waiters, kept alive)
local mine = {}
for i = 16, 15 + 4 * tonumber(ARGV[15]), 4 do
  local caller, want = ARGV[i], tonumber(ARGV[i + 1])
  local d = replica .. '\n' .. caller
  redis.call('HSET', KEYS[8], caller, ARGV[i + 2] .. ' ' .. ARGV[i + 3])
  if want > 0 then
    mine[caller] = want
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
if gate > now then return {0, math.max(1, math.ceil(math.min(gate - now, window))), epoch} end
-- every replica not heard from may be on its fallback share: that much is not the fleet's
local missing = math.max(0, tonumber(ARGV[8]) - redis.call('ZCARD', KEYS[4]))
local max = tonumber(ARGV[2]) - tonumber(ARGV[7]) * missing
local leases, starts = redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])
if leases >= max then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local hint = tonumber(ARGV[10])
  if first[2] then hint = math.min(tonumber(first[2]) - now, hint) end
  return {0, math.max(1, math.ceil(hint)), epoch}
end
if starts >= max then
  -- a pending start (scored in the future) leaves a window after it is sent: not before now
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  return {0, math.max(1, math.ceil(math.min(tonumber(oldest[2]), now) + window - now)), epoch}
end
local free = math.min(max - leases, max - starts)
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
local reply, granted, top = {0, 0, epoch}, 0, nil
for caller, n in pairs(alloc) do
  local g = math.min(n - (before[caller] or 0), mine[caller] or 0)
  if g > 0 then
    redis.call('ZADD', KEYS[9], 'XX', now, replica .. '\n' .. caller)
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
if granted == 0 then reply[2] = tonumber(ARGV[11]) end
if free > granted and #ds > 0 then redis.call('PUBLISH', ARGV[12], 'spare') end
return reply
"""
)

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

SENT = (
    _CLOCK
    + """
redis.call('ZADD', KEYS[1], 'XX', clock(), ARGV[1])
"""
)

RELEASE = (
    _CLOCK
    + """
if ARGV[3] == '1' then redis.call('ZADD', KEYS[2], 'XX', clock(), ARGV[2]) end
if redis.call('ZREM', KEYS[1], ARGV[2]) > 0 then redis.call('PUBLISH', ARGV[1], 'freed') end
"""
)

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

PROBE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', 1000)
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
