"""CPU time per cache hit, user and kernel apart: the bare handler and the gateway under wrk.

    python -m bench.cpu [--rounds N] [--seconds S] [--env NAME=VALUE ...]

The hit phase's req/s ratio folds two things together: the work each server does per hit
(``bench.instructions`` counts it) and what the kernel charges it. This runs the hit phase's
set-up (the bare handler and one gateway replica in Redis mode, each pinned to CPU 0; wrk,
Redis and the stand-in on CPU 1; 32 cached queries, 50 connections), takes each server in
turn for ``--rounds`` rounds (2 s warm-up, ``--seconds`` measured) and reads the server's
user and system CPU time from ``/proc/<pid>/stat`` around each measured run: microseconds
per request, each round. ``--env`` sets a gateway setting (e.g. ``GATEWAY_LOG__LEVEL=WARNING``:
no access line). Needs ``wrk`` and ``redis-server``, like ``make bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench import procs, wrk
from bench.client import post_bytes
from bench.phases import path, prime
from bench.run import BODY, SERVER_CPU, TOOLS_CPU, bare_serving

KEYS = 32


def cpu_ticks(pid: int) -> tuple[int, int]:
    """``utime`` and ``stime`` of ``pid`` (every thread), in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)


def per_request(pid: int, url: str, lua: str, seconds: float) -> dict[str, float]:
    wrk.run(url, lua, seconds=2, connections=50, cpus=TOOLS_CPU)
    user0, sys0 = cpu_ticks(pid)
    result = wrk.run(url, lua, seconds=seconds, connections=50, cpus=TOOLS_CPU)
    user1, sys1 = cpu_ticks(pid)
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    n = result["requests"]
    return {
        "rps": round(result["rps"]),
        "user_us": round((user1 - user0) * tick_us / n, 1),
        "kernel_us": round((sys1 - sys0) * tick_us / n, 1),
    }


async def measure(rounds: int, seconds: float, env: Mapping[str, str]) -> dict[str, object]:
    redis = procs.RedisServer().start()
    assert redis.proc is not None
    os.sched_setaffinity(redis.proc.pid, TOOLS_CPU)
    sim = procs.simulator(cpus=TOOLS_CPU)
    gw = procs.gateway(sim, redis.url, cpus=SERVER_CPU, cache__ttl_open_s="3600", **env)
    floor: procs.Proc | None = None
    requests = [(path(c), BODY) for c in range(1, KEYS + 1)]
    lua = wrk.script(requests)
    try:
        raws = [post_bytes(p, b) for p, b in requests]
        await prime(gw.port, raws)
        answers = await prime(gw.port, raws)
        if any(a.cache != "HIT" for a in answers):
            raise RuntimeError("the primed queries are not hits")
        floor = bare_serving(answers)
        found: dict[str, list[dict[str, float]]] = {"bare": [], "gateway": []}
        for _ in range(rounds):
            found["bare"].append(per_request(floor.pid, floor.url, lua, seconds))
            found["gateway"].append(per_request(gw.pid, gw.url, lua, seconds))
    finally:
        wrk.remove(lua)
        for proc in (floor, gw, sim):
            if proc is not None:
                proc.stop()
        redis.close()
    return {"settings": dict(env), "seconds": seconds, **found}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--env", action="append", default=[], help="a gateway setting, NAME=VALUE (repeatable)"
    )
    args = parser.parse_args(argv)
    wrk.require()
    env = dict(item.split("=", 1) for item in args.env)
    settings = {k.removeprefix("GATEWAY_").lower(): v for k, v in env.items()}
    result = asyncio.run(measure(args.rounds, args.seconds, settings))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
