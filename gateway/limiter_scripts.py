"""The Lua scripts of ``RedisLimiter`` and the names of its keys (see ``limiter_redis``).

Times are Redis ``TIME`` in ms; every key shares one hash tag (Redis Cluster). Scripts:

    ACQUIRE  KEYS leases starts queue alive wants gate; ARGV max, window ms, lease ms, ticket,
             want, ticket ttl ms, blocked hint ms, behind hint ms, channel. Drops lapsed leases,
             starts and dead tickets, queues the ticket; grants ``ticket:1..n`` (leases, with
             pending starts) out of what older tickets do not want. Returns {n, 0} or {0, ms}.
    RENEW    KEYS leases starts; ARGV lease ms, window ms, leases... Extends those still held
             and their still-pending starts; returns those gone.
    ADOPT    KEYS leases starts gate; ARGV lease ms, window ms, hold ms, n, n leases, then
             (name, age ms) pairs (negative: not sent yet). Registers permits granted without
             Redis, sets the gate (NX); returns ms until it opens.
    SENT     KEYS starts; ARGV lease. Records its start now (XX: a lapsed one is not revived).
    RELEASE  KEYS leases starts; ARGV channel, lease, 1 to record its start now (never sent).
             Publishes on the channel if the lease was held.
    FORGET   KEYS sorted sets; ARGV channel, member. Removes it from each; publishes if any.
"""

from __future__ import annotations

from dataclasses import dataclass

# KEYS leases starts queue alive wants gate; ARGV max, window ms, lease ms, ticket, want, ticket ttl
# ms, blocked hint ms, behind hint ms, channel. Grants ticket:1..n; returns {n, 0} or {0, ms}.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local max, window, lease_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ticket, want, ttl = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now, 'LIMIT', 0, 100)
for i = 3, 5 do
  if #dead > 0 then redis.call('ZREM', KEYS[i], unpack(dead)) end
  redis.call('PEXPIRE', KEYS[i], 2 * ttl)
end
redis.call('ZADD', KEYS[3], 'NX', now, ticket)
redis.call('ZADD', KEYS[4], now + ttl, ticket)
redis.call('ZADD', KEYS[5], want, ticket)
local gate = tonumber(redis.call('GET', KEYS[6]) or '0')
if gate > now then return {0, math.max(1, math.ceil(math.min(gate - now, window)))} end
local leases, starts = redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2])
if leases >= max then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.max(1, math.ceil(math.min(tonumber(first[2]) - now, tonumber(ARGV[7]))))}
end
if starts >= max then
  -- a pending start (scored in the future) leaves a window after it is sent: not before now
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {0, math.max(1, math.ceil(math.min(tonumber(oldest[2]), now) + window - now))}
end
local free = math.min(max - leases, max - starts)
local spare = free
-- older tickets' demand is theirs to take first
local rank = redis.call('ZRANK', KEYS[3], ticket)
for _, older in ipairs(rank > 0 and redis.call('ZRANGE', KEYS[3], 0, rank - 1) or {}) do
  spare = spare - (tonumber(redis.call('ZSCORE', KEYS[5], older)) or 1)
end
local n = math.min(want, spare)
if n <= 0 then return {0, tonumber(ARGV[8])} end
for i = 1, n do
  redis.call('ZADD', KEYS[1], now + lease_ms, ticket .. ':' .. i)
  redis.call('ZADD', KEYS[2], now + lease_ms, ticket .. ':' .. i)  -- pending until sent
end
for i = 3, 5 do redis.call('ZREM', KEYS[i], ticket) end
redis.call('PEXPIRE', KEYS[1], 2 * lease_ms)
redis.call('PEXPIRE', KEYS[2], lease_ms + 2 * window)
if free > n and redis.call('ZCARD', KEYS[3]) > 0 then redis.call('PUBLISH', ARGV[9], 'spare') end
return {n, 0}
"""
# KEYS leases starts; ARGV lease ms, window ms, leases... Extends those still held, and their
# starts still pending; returns those gone.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease_ms = tonumber(ARGV[1])
local lost = {}
for i = 3, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
  if tonumber(redis.call('ZSCORE', KEYS[2], ARGV[i]) or '0') > now then
    redis.call('ZADD', KEYS[2], now + lease_ms, ARGV[i])
  end
end
redis.call('PEXPIRE', KEYS[1], 2 * lease_ms)
redis.call('PEXPIRE', KEYS[2], lease_ms + 2 * tonumber(ARGV[2]))
return lost
"""
# KEYS leases starts gate; ARGV lease ms, window ms, hold ms, n, n leases, then (name, age ms)
# pairs, a negative age for a start not sent yet. Registers permits granted without Redis;
# returns ms until the (first) gate opens.
ADOPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease_ms, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local hold, n = math.max(1, tonumber(ARGV[3])), tonumber(ARGV[4])
redis.call('SET', KEYS[3], now + hold, 'NX', 'PX', hold)
for i = 5, 4 + n do redis.call('ZADD', KEYS[1], now + lease_ms, ARGV[i]) end
for i = 5 + n, #ARGV, 2 do
  local age = tonumber(ARGV[i + 1])
  redis.call('ZADD', KEYS[2], age < 0 and now + lease_ms or now - age, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], 2 * lease_ms)
redis.call('PEXPIRE', KEYS[2], lease_ms + 2 * window)
return (tonumber(redis.call('GET', KEYS[3])) or now) - now
"""
# KEYS starts; ARGV member. Its start went out now (XX: a lapsed start is not brought back).
SENT = """
local t = redis.call('TIME')
redis.call('ZADD', KEYS[1], 'XX', tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000, ARGV[1])
"""
# KEYS leases starts; ARGV channel, lease, 1 to record its start now (it was never sent).
RELEASE = """
if ARGV[3] == '1' then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], 'XX', tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000, ARGV[2])
end
if redis.call('ZREM', KEYS[1], ARGV[2]) > 0 then redis.call('PUBLISH', ARGV[1], 'freed') end
"""
# KEYS sorted sets; ARGV channel, member. A lease released or a ticket withdrawn: tell waiters.
FORGET = """
local gone = 0
for _, key in ipairs(KEYS) do gone = gone + redis.call('ZREM', key, ARGV[2]) end
if gone > 0 then redis.call('PUBLISH', ARGV[1], 'freed') end
return gone
"""


@dataclass(frozen=True, slots=True)
class LimiterKeys:
    """The limiter's keys under one hash tag, ``{namespace:limit}:name``."""

    leases: str
    starts: str
    queue: str
    alive: str
    wants: str
    released: str  # the pub/sub channel
    gate: str

    @classmethod
    def for_namespace(cls, namespace: str) -> LimiterKeys:
        tag = f"{{{namespace}:limit}}"
        names = ("leases", "starts", "queue", "alive", "wants", "released", "gate")
        return cls(*(f"{tag}:{name}" for name in names))
