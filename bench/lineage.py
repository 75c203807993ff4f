"""What the limiter's lineage check costs (README "Redis shapes", Sentinel): ``python -m
bench.lineage``.

Every acquire and heartbeat script now reads ``INFO replication`` (the primary's replication id
and replica count) besides the epoch. Measured on a private redis-server with one replica, in
one run, against the same scripts without the check (the epoch alone, as before), interleaved
round by round so load on the machine hits both alike:

- server: the generation step alone, 2,000 times inside one script call (µs per step);
- client: a whole acquire (one permit, then released untimed), from the caller's side.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import redis

from gateway.limiter.redis_scripts import _GENERATION, ACQUIRE, RELEASE, LimiterKeys
from tests.support.processes import RedisServer

# The generation step before the lineage check: the epoch alone.
EPOCH_ONLY = """
local function generation(meta, now, hold)
  local epoch = redis.call('HGET', meta, 'epoch')
  if epoch then return epoch end
  epoch = string.format('%.3f', now)
  redis.call('HSET', meta, 'epoch', epoch, 'gate', now + hold)
  return epoch
end
"""
STEPS = 2000
LOOP = """
local t0 = redis.call('TIME')
for i = 1, {steps} do generation(KEYS[1], 0, 0) end
local t1 = redis.call('TIME')
return (tonumber(t1[1]) - tonumber(t0[1])) * 1000000 + tonumber(t1[2]) - tonumber(t0[2])
"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.lineage")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--acquires", type=int, default=200, help="per variant and round")
    args = parser.parse_args()
    primary, replica = RedisServer().start(), RedisServer().start()
    try:
        with replica.client() as client:
            client.replicaof("127.0.0.1", primary.port)
        client = primary.client()
        keys = LimiterKeys.for_namespace("bench:lineage")
        variants = {"epoch only": ACQUIRE.replace(_GENERATION, EPOCH_ONLY), "lineage": ACQUIRE}
        assert variants["epoch only"] != ACQUIRE
        acquire = {name: client.register_script(src) for name, src in variants.items()}
        loop = {
            name: client.register_script(
                src[: src.index("local now = clock()")] + LOOP.format(steps=STEPS)
            )
            for name, src in variants.items()
        }
        release = client.register_script(RELEASE)
        step_us: dict[str, list[float]] = {name: [] for name in variants}
        call_us: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name in variants:
                step_us[name].append(loop[name](keys=[keys.meta]) / STEPS)
                call_us[name].append(_acquires(client, acquire[name], release, keys, args.acquires))
        base = {n: statistics.median(v) for n, v in step_us.items()}
        calls = {n: statistics.median(v) for n, v in call_us.items()}
        print(f"redis-server {client.info('server')['redis_version']}, one replica attached")
        print(f"generation step (server, median of {args.rounds} rounds x {STEPS}):")
        for name in variants:
            print(f"  {name:10}  {base[name]:7.2f} µs")
        print(f"acquire + its round trip (client, median of {args.rounds} rounds):")
        for name in variants:
            print(f"  {name:10}  {calls[name]:7.1f} µs")
        ratio = calls["lineage"] / calls["epoch only"]
        print(f"  lineage / epoch only: {ratio:.3f}")
        client.close()
    finally:
        replica.close()
        primary.close()


def _acquires(
    client: redis.Redis,
    acquire: redis.commands.core.Script,
    release: redis.commands.core.Script,
    keys: LimiterKeys,
    count: int,
) -> float:
    """Median µs of ``count`` acquires of one permit each (each released, untimed)."""
    replica = uuid.uuid4().hex
    epoch = ""
    times = []
    for i in range(count):
        args: list[str | float] = [epoch, 10, 1, 25000, replica, 0, 0, 1, 2000, 250, 100]
        args += [keys.released, "~background", f"t{i}", 1, "anonymous", 1, 1, 0]
        all_keys = [keys.meta, keys.leases, keys.starts, keys.members, keys.demand]
        all_keys += [keys.wants, keys.finish, keys.policy, keys.since]
        start = time.perf_counter()
        reply = acquire(keys=all_keys, args=args)
        times.append((time.perf_counter() - start) * 1e6)
        epoch = reply[2].decode()
        for lease_no in range(1, int(reply[0]) + 1):
            release(
                keys=[keys.leases, keys.starts],
                args=[keys.released, f"anonymous\nt{i}:{lease_no}", 1],
            )
        client.delete(keys.starts)  # the window would fill: only the script's cost is measured
    return statistics.median(times)


if __name__ == "__main__":
    main()
