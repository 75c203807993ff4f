"""The Lua scripts of ``RedisLimiter`` and the names of its keys (see ``limiter_redis``).

Times are Redis ``TIME`` in ms; every key shares one hash tag (Redis Cluster). No key carries a
TTL: under a ``volatile-*`` eviction policy Redis never evicts them (``allkeys-*`` is refused
at start-up), and the scripts remove what has lapsed themselves.

Every script that can grant or claim runs ``GENERATION`` first: the shared state's epoch lives
in ``meta``; when it is missing, Redis lost its data (restarted empty, flushed, evicted), so a
new epoch starts with a gate that opens only after every lease nobody can see any more has
surely lapsed (``hold``: the longest lease plus a window). A caller naming another epoch gets
``{-1, 0, epoch}`` and nothing else happens.

    ACQUIRE    KEYS meta leases starts queue alive wants members
               ARGV epoch, max, window ms, lease ms, ticket, want, ticket ttl ms, blocked hint
                    ms, behind hint ms, channel, hold ms, share, replicas
               -> {n granted (ticket:1..n), 0, epoch} or {0, hint ms, epoch}
    HEARTBEAT  KEYS meta leases starts members
               ARGV epoch ('' to join any), replica, member ttl ms, not after (unix ms), lease
                    ms, hold ms, leases...
               -> {live members, epoch, lost leases...}; {-2} if it arrived after ``not after``
    SENT       KEYS starts; ARGV lease. Records its start now (XX: a lapsed one is not revived).
    RELEASE    KEYS leases starts; ARGV channel, lease, 1 to record its start now (never sent).
    FORGET     KEYS sorted sets; ARGV channel, member. Removes it from each; publishes if any.
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

# The shared state's epoch; a missing one is made anew, its gate ``hold`` ms from now.
_GENERATION = """
local function generation(meta, now, hold)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then return epoch end
  epoch = string.format('%.3f', now)
  redis.call('HSET', meta, 'epoch', epoch, 'gate', now + hold)
  return epoch
end
"""

ACQUIRE = (
    _CLOCK
    + _GENERATION
    + """
local now = clock()
local epoch = generation(KEYS[1], now, tonumber(ARGV[11]))
if epoch ~= ARGV[1] then return {-1, 0, epoch} end
local window, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local ticket, want, ttl = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', now)
local dead = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', now, 'LIMIT', 0, 100)
if #dead > 0 then
  for i = 4, 6 do redis.call('ZREM', KEYS[i], unpack(dead)) end
end
redis.call('ZADD', KEYS[4], 'NX', now, ticket)
redis.call('ZADD', KEYS[5], now + ttl, ticket)
redis.call('ZADD', KEYS[6], want, ticket)
local gate = tonumber(redis.call('HGET', KEYS[1], 'gate') or '0')
if gate > now then return {0, math.max(1, math.ceil(math.min(gate - now, window))), epoch} end
-- every replica not heard from may be on its fallback share: that much is not the fleet's
local missing = math.max(0, tonumber(ARGV[13]) - redis.call('ZCARD', KEYS[7]))
local max = tonumber(ARGV[2]) - tonumber(ARGV[12]) * missing
local leases, starts = redis.call('ZCARD', KEYS[2]), redis.call('ZCARD', KEYS[3])
if leases >= max then
  local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  local hint = tonumber(ARGV[8])
  if first[2] then hint = math.min(tonumber(first[2]) - now, hint) end
  return {0, math.max(1, math.ceil(hint)), epoch}
end
if starts >= max then
  -- a pending start (scored in the future) leaves a window after it is sent: not before now
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  return {0, math.max(1, math.ceil(math.min(tonumber(oldest[2]), now) + window - now)), epoch}
end
local free = math.min(max - leases, max - starts)
local spare = free
-- older tickets' demand is theirs to take first
local rank = redis.call('ZRANK', KEYS[4], ticket)
for _, older in ipairs(rank > 0 and redis.call('ZRANGE', KEYS[4], 0, rank - 1) or {}) do
  spare = spare - (tonumber(redis.call('ZSCORE', KEYS[6], older)) or 1)
end
local n = math.min(want, spare)
if n <= 0 then return {0, tonumber(ARGV[9]), epoch} end
for i = 1, n do
  redis.call('ZADD', KEYS[2], now + lease_ms, ticket .. ':' .. i)
  redis.call('ZADD', KEYS[3], now + lease_ms, ticket .. ':' .. i)  -- pending until sent
end
for i = 4, 6 do redis.call('ZREM', KEYS[i], ticket) end
if free > n and redis.call('ZCARD', KEYS[4]) > 0 then redis.call('PUBLISH', ARGV[10], 'spare') end
return {n, 0, epoch}
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
local reply = {redis.call('ZCARD', KEYS[4]), epoch}
if epoch ~= ARGV[1] then return reply end  -- held leases belong to a lost epoch: nothing to renew
for i = 7, #ARGV do
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

FORGET = """
local gone = 0
for _, key in ipairs(KEYS) do gone = gone + redis.call('ZREM', key, ARGV[2]) end
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
    queue: str
    alive: str
    wants: str
    members: str
    probe: str
    released: str  # the pub/sub channel

    @classmethod
    def for_namespace(cls, namespace: str) -> LimiterKeys:
        tag = f"{{{namespace}:limit}}"
        names = ("meta", "leases", "starts", "queue", "alive", "wants", "members", "probe")
        return cls(*(f"{tag}:{name}" for name in (*names, "released")))
