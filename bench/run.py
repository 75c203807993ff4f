"""The gateway's benchmark: ``python -m bench.run [--quick] [--json PATH]`` (``make bench``).

Starts its own redis-server, simulator, bare aiohttp floor and gateway replicas (Redis mode)
on localhost, runs five phases and prints a Markdown table (targets from issue 6) and writes
JSON:

- hit: cache hits at 50 connections with ``wrk``, gateway vs a bare aiohttp handler serving
  the same bytes at the same route, alternating rounds; each server pinned to CPU 0, wrk,
  Redis and the simulator to CPU 1 (a 2-core machine: the server gets one whole core);
- miss storm: N distinct queries at once, upstream latency 200 ms: upstream starts per second
  (from the simulator's arrival times) against the budget, violations, caller p50/p99;
- burst: 10 distinct misses at once on an idle limiter: first to last upstream arrival;
- identical storm: N identical queries over 3 replicas: upstream calls, followers' latency
  minus the leader's (p99);
- memory: peak RSS (VmHWM) of a replica after serving N open client connections at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import client, procs, wrk
from bench.client import Pool, Result, post_bytes

MAX_CONCURRENT = 10
WINDOW_S = 1.1  # window 1000 ms + margin 100 ms: the gateway's defaults
BUDGET = MAX_CONCURRENT / WINDOW_S  # upstream starts per second
SERVER_CPU = {0}
TOOLS_CPU = {1}
BODY = b'{"pageSize":10,"pageNum":1}'


def path(campaign: int, vdn: int = 11) -> str:
    return f"/rest/isales/v1/openapi/campaigns/{vdn}/callresult/{campaign}"


@dataclass(frozen=True)
class Plan:
    hit_rounds: int
    hit_seconds: float
    warmup_seconds: float
    hit_keys: int
    storm: int
    burst_rounds: int
    identical: int
    identical_rounds: int
    connections: int

    @classmethod
    def full(cls) -> Plan:
        return cls(3, 8.0, 2.0, 32, 1000, 5, 1000, 5, 1000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(1, 2.0, 1.0, 8, 60, 2, 300, 1, 1000)


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def prime(port: int, requests: list[bytes]) -> list[Result]:
    """Ask each query once, one after another (misses that fill the cache)."""
    pool = Pool()
    await pool.open(port, 1)
    try:
        results = [(await pool.fire([raw], within=30))[0] for raw in requests]
    finally:
        await pool.close()
    return results


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    return 0.0


async def hit_phase(plan: Plan, redis: procs.RedisServer) -> dict[str, Any]:
    sim = procs.simulator(cpus=TOOLS_CPU)
    gw = procs.gateway(sim, redis.url, cpus=SERVER_CPU, cache__ttl_open_s="3600")
    floor: procs.Proc | None = None
    lua = ""
    try:
        queries = [(path(c), BODY) for c in range(1, plan.hit_keys + 1)]
        raws = [post_bytes(p, b) for p, b in queries]
        first = await prime(gw.port, raws)
        again = await prime(gw.port, raws)
        assert all(r.status == 200 for r in first), [r.status for r in first]
        assert all(r.cache == "HIT" for r in again), [r.cache for r in again]
        assert all(a.body == b.body for a, b in zip(first, again, strict=True))
        spec = {
            "content_type": first[0].content_type,
            "bodies": {str(c): r.body.decode() for c, r in enumerate(first, start=1)},
        }
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(spec, f)
        floor = procs.bare(f.name, cpus=SERVER_CPU)
        os.unlink(f.name)
        bare_answer = (await prime(floor.port, raws[:1]))[0]
        assert bare_answer.body == first[0].body
        lua = wrk.script(queries)
        hits_before = metric(
            await client.get_text(gw.port, "/metrics"),
            'isales_gateway_cache_lookups_total{result="hit"}',
        )
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "gateway": []}
        for _ in range(plan.hit_rounds):
            for name, server in (("bare", floor), ("gateway", gw)):
                run = _wrk_round(server, lua, plan)
                runs[name].append(run)
        hits_after = metric(
            await client.get_text(gw.port, "/metrics"),
            'isales_gateway_cache_lookups_total{result="hit"}',
        )
    finally:
        wrk.remove(lua)
        for proc in (floor, gw, sim):
            if proc is not None:
                proc.stop()
    bare, gateway = _summary(runs["bare"]), _summary(runs["gateway"])
    counted = sum(r["requests"] for r in runs["gateway"])
    return {
        "connections": 50,
        "keys": plan.hit_keys,
        "seconds_per_round": plan.hit_seconds,
        "rounds": plan.hit_rounds,
        "bare": bare,
        "gateway": gateway,
        "throughput_ratio": round(gateway["rps"] / bare["rps"], 3),
        "p50_ratio": round(gateway["p50_ms"] / bare["p50_ms"], 2),
        "p99_ratio": round(gateway["p99_ms"] / bare["p99_ms"], 2),
        # measured runs plus warm-ups: every one of them was a cache hit
        "gateway_hits_counted": int(hits_after - hits_before),
        "gateway_requests_measured": int(counted),
        "runs": runs,
    }


def _wrk_round(server: procs.Proc, lua: str, plan: Plan) -> dict[str, float]:
    url = server.url
    wrk.run(url, lua, seconds=plan.warmup_seconds, connections=50, cpus=TOOLS_CPU)
    result = wrk.run(url, lua, seconds=plan.hit_seconds, connections=50, cpus=TOOLS_CPU)
    if result["non2xx"] or result["socket_errors"]:
        raise RuntimeError(f"wrk saw errors against {url}: {result}")
    return result


def _summary(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "rps": round(statistics.median(r["rps"] for r in runs), 1),
        "p50_ms": round(statistics.median(r["p50_us"] for r in runs) / 1000, 3),
        "p99_ms": round(statistics.median(r["p99_us"] for r in runs) / 1000, 3),
    }


async def fleet_pool(replicas: Sequence[procs.Proc], n: int) -> tuple[Pool, list[int]]:
    """``n`` connections spread round robin over ``replicas``; also each one's replica index."""
    pools = []
    for i, replica in enumerate(replicas):
        pool = Pool()
        await pool.open(replica.port, len(range(i, n, len(replicas))))
        pools.append(pool)
    merged = Pool()
    owners = []
    for k in range(n):
        merged.conns.append(pools[k % len(replicas)].conns[k // len(replicas)])
        owners.append(k % len(replicas))
    return merged, owners


async def arrivals(sim: procs.Proc) -> list[float]:
    got = await client.get_json(sim.port, "/__bench/arrivals")
    values = got["arrivals"]
    assert isinstance(values, list)
    return sorted(float(v) for v in values)


async def reset(sim: procs.Proc) -> None:
    await client.get_text(sim.port, "/__sim/reset", method="POST")


async def miss_storm(plan: Plan, redis: procs.RedisServer, sim: procs.Proc) -> dict[str, Any]:
    n = plan.storm
    redis.flush()
    gw = procs.gateway(
        sim,
        redis.url,
        limit__max_queue=str(n + 100),
        limit__max_wait_ms=str(int((n / BUDGET + 60) * 1000)),
        upstream__deadline_ms=str(int((n / BUDGET + 90) * 1000)),
    )
    pool = Pool()
    try:
        await pool.open(gw.port, n)
        await asyncio.sleep(WINDOW_S + 0.2)
        await reset(sim)
        requests = [post_bytes(path(c), BODY) for c in range(1, n + 1)]
        results = await pool.fire(requests, within=n / BUDGET + 120)
        stats = await client.get_json(sim.port, "/__sim/stats")
        seen = await arrivals(sim)
        memory = procs.proc_memory(gw.pid)
    finally:
        await pool.close()
        gw.stop()
    span = seen[-1] - seen[0] if len(seen) > 1 else 0.0
    rate = (len(seen) - MAX_CONCURRENT) / span if span > 0 else float("nan")
    latencies = [r.latency for r in results]
    return {
        "queries": n,
        "upstream_latency_ms": 200,
        "budget_starts_per_s": round(BUDGET, 3),
        # steady-state rate: the first batch of 10 starts at once, then 10 per window
        "starts_per_s": round(rate, 3),
        "budget_used": round(rate / BUDGET, 3),
        "upstream_requests": stats["requests_total"],
        "violations": stats["violations"],
        "max_in_flight": stats["max_in_flight"],
        "max_starts_in_window": stats["max_starts_in_window"],
        "statuses": dict(Counter(str(r.status) for r in results)),
        "x_cache": dict(Counter(r.cache for r in results)),
        "caller_p50_s": round(pct(latencies, 50), 3),
        "caller_p99_s": round(pct(latencies, 99), 3),
        "first_to_last_start_s": round(span, 3),
        "replica_memory": memory,
    }


async def burst(plan: Plan, redis: procs.RedisServer, sim: procs.Proc) -> dict[str, Any]:
    redis.flush()
    gw = procs.gateway(sim, redis.url)
    spreads, first_delays = [], []
    pool = Pool()
    try:
        await pool.open(gw.port, MAX_CONCURRENT)
        # one miss so every lazy start-up (Redis scripts, subscriptions, upstream pool) is done
        await pool.fire([post_bytes(path(999), BODY)], within=30)
        for r in range(plan.burst_rounds):
            await asyncio.sleep(WINDOW_S + 0.3)  # an idle limiter: the window holds no start
            await reset(sim)
            body = b'{"pageSize":10,"pageNum":%d}' % (r + 2)
            requests = [post_bytes(path(c), body) for c in range(1, MAX_CONCURRENT + 1)]
            sent = time.monotonic()
            results = await pool.fire(requests, within=30)
            assert all(x.status == 200 for x in results), [x.status for x in results]
            seen = await arrivals(sim)
            assert len(seen) == MAX_CONCURRENT, seen
            spreads.append(seen[-1] - seen[0])
            first_delays.append(seen[0] - sent)
    finally:
        await pool.close()
        gw.stop()
    return {
        "rounds": plan.burst_rounds,
        "first_to_last_ms": [ms(s) for s in spreads],
        "first_to_last_ms_max": ms(max(spreads)),
        "first_to_last_ms_median": ms(statistics.median(spreads)),
        "send_to_first_arrival_ms_median": ms(statistics.median(first_delays)),
    }


async def identical_storm(plan: Plan, redis: procs.RedisServer, sim: procs.Proc) -> dict[str, Any]:
    n = plan.identical
    redis.flush()
    replicas = [procs.gateway(sim, redis.url) for _ in range(3)]
    rounds = []
    pool = Pool()
    try:
        pool, owners = await fleet_pool(replicas, n)
        # warm every replica's lazy start-up (scripts, pub/sub, upstream pool) on another key
        await pool.fire([post_bytes(path(998), BODY)] * 3, within=30)
        for r in range(plan.identical_rounds):
            await asyncio.sleep(0.5)
            await reset(sim)
            request = post_bytes(path(500 + r), BODY)
            results = await pool.fire([request] * n, within=60)
            stats = await client.get_json(sim.port, "/__sim/stats")
            rounds.append(_identical_round(results, owners, stats))
    finally:
        await pool.close()
        for replica in replicas:
            replica.stop()
    p99s = [x["follower_extra_ms_p99"] for x in rounds]
    return {
        "queries": n,
        "replicas": 3,
        "upstream_latency_ms": 200,
        "rounds": rounds,
        "upstream_calls_max": max(x["upstream_calls"] for x in rounds),
        "follower_extra_ms_p99_worst": max(p99s),
        "follower_extra_ms_p99_median": statistics.median(p99s),
    }


def _identical_round(
    results: list[Result], owners: list[int], stats: dict[str, object]
) -> dict[str, Any]:
    leaders = [i for i, x in enumerate(results) if x.cache == "MISS"]
    assert len(leaders) == 1, Counter(x.cache for x in results)
    lead = leaders[0]
    base = results[lead].latency
    extra_same: list[float] = []
    extra_other: list[float] = []
    for i, x in enumerate(results):
        if i != lead:
            (extra_same if owners[i] == owners[lead] else extra_other).append(x.latency - base)
    extra = extra_same + extra_other
    return {
        "upstream_calls": stats["requests_total"],
        "statuses": dict(Counter(str(x.status) for x in results)),
        "x_cache": dict(Counter(x.cache for x in results)),
        "leader_latency_ms": ms(base),
        "follower_extra_ms_p50": ms(pct(extra, 50)),
        "follower_extra_ms_p99": ms(pct(extra, 99)),
        "follower_extra_ms_max": ms(max(extra)),
        "same_replica_extra_ms_p99": ms(pct(extra_same, 99)),
        "other_replica_extra_ms_p99": ms(pct(extra_other, 99)),
    }


async def memory(plan: Plan, redis: procs.RedisServer, sim: procs.Proc) -> dict[str, Any]:
    n = plan.connections
    gw = procs.gateway(sim, redis.url)
    pool = Pool()
    try:
        await prime(gw.port, [post_bytes(path(997), BODY)])
        idle = procs.proc_memory(gw.pid)
        await pool.open(gw.port, n)
        # all n in flight at once (one upstream call, 200 ms), then all n again as hits
        first = await pool.fire([post_bytes(path(996), BODY)] * n, within=60)
        second = await pool.fire([post_bytes(path(996), BODY)] * n, within=60)
        await asyncio.sleep(0.5)
        held = procs.proc_memory(gw.pid)
    finally:
        await pool.close()
        gw.stop()
    assert all(x.status == 200 for x in first + second)
    return {
        "connections": n,
        "idle_rss_mib": idle["rss_mib"],
        "rss_mib_holding": held["rss_mib"],
        "peak_rss_mib": held["peak_rss_mib"],
    }


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(
        ["redis-server", "--version"],  # noqa: S607 - the one on PATH is the one benchmarked
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    wrk_version = subprocess.run(  # noqa: S603 - wrk from PATH, fixed arguments
        [wrk.require(), "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "redis_py": version("redis"),
        "redis_server": redis_version.split(" v=")[-1].split()[0] if " v=" in redis_version else "",
        "wrk": " ".join(wrk_version[:2]),
        "pinning": "server under test on CPU 0; wrk, redis-server, simulator on CPU 1 "
        "(hit phase only; the other phases share both CPUs among all processes)",
    }


TARGETS = {
    "hit_throughput": 0.70,
    "hit_p99": 2.0,
    "storm_budget": 0.95,
    "burst_ms": 50.0,
    "follower_ms": 20.0,
    "peak_rss_mib": 150.0,
}


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str, bool | None]] = []
    if "hit" in r:
        h = r["hit"]
        b, g = h["bare"], h["gateway"]
        rows += [
            (
                "hit throughput, 50 conns (gateway / bare)",
                f"{g['rps']:,.0f} / {b['rps']:,.0f} req/s = {h['throughput_ratio']:.0%}",
                ">= 70 % of bare",
                h["throughput_ratio"] >= TARGETS["hit_throughput"],
            ),
            (
                "hit p50 (gateway / bare)",
                f"{g['p50_ms']:.2f} / {b['p50_ms']:.2f} ms = {h['p50_ratio']:.2f}x",
                "",
                None,
            ),
            (
                "hit p99 (gateway / bare)",
                f"{g['p99_ms']:.2f} / {b['p99_ms']:.2f} ms = {h['p99_ratio']:.2f}x",
                "<= 2x bare",
                h["p99_ratio"] <= TARGETS["hit_p99"],
            ),
        ]
    if "miss_storm" in r:
        m = r["miss_storm"]
        rows += [
            (
                f"miss storm, {m['queries']:,} distinct: upstream starts/s",
                f"{m['starts_per_s']:.2f} of {m['budget_starts_per_s']:.2f} "
                f"= {m['budget_used']:.1%}",
                ">= 95 % of budget",
                m["budget_used"] >= TARGETS["storm_budget"],
            ),
            (
                "miss storm: violations (simulator)",
                str(m["violations"]),
                "0",
                m["violations"] == 0,
            ),
            (
                "miss storm: caller p50 / p99",
                f"{m['caller_p50_s']:.1f} / {m['caller_p99_s']:.1f} s",
                "",
                None,
            ),
        ]
    if "burst" in r:
        u = r["burst"]
        rows.append(
            (
                "burst of 10 misses: first to last upstream arrival",
                f"max {u['first_to_last_ms_max']:.1f} ms "
                f"(median {u['first_to_last_ms_median']:.1f}, {u['rounds']} rounds)",
                "<= 50 ms",
                u["first_to_last_ms_max"] <= TARGETS["burst_ms"],
            )
        )
    if "identical_storm" in r:
        i = r["identical_storm"]
        rows += [
            (
                f"identical storm, {i['queries']:,} over 3 replicas: upstream calls",
                str(i["upstream_calls_max"]),
                "1",
                i["upstream_calls_max"] == 1,
            ),
            (
                "identical storm: follower extra latency p99",
                f"median {i['follower_extra_ms_p99_median']:.1f} ms "
                f"(worst {i['follower_extra_ms_p99_worst']:.1f}, {len(i['rounds'])} rounds)",
                "<= 20 ms",
                i["follower_extra_ms_p99_median"] <= TARGETS["follower_ms"],
            ),
        ]
    if "memory" in r:
        mem = r["memory"]
        rows.append(
            (
                f"peak RSS, {mem['connections']:,} open connections",
                f"{mem['peak_rss_mib']:.0f} MiB (idle {mem['idle_rss_mib']:.0f})",
                "<= 150 MB",
                mem["peak_rss_mib"] <= TARGETS["peak_rss_mib"],
            )
        )
    lines = ["| measure | result | target | met |", "|---|---|---|---|"]
    for name, value, target, met in rows:
        mark = "" if met is None else ("yes" if met else "**no**")
        lines.append(f"| {name} | {value} | {target} | {mark} |")
    return "\n".join(lines)


PHASES = ("hit", "miss_storm", "burst", "identical_storm", "memory")


async def main_async(plan: Plan, phases: Sequence[str]) -> dict[str, Any]:
    redis = procs.RedisServer().start()
    assert redis.proc is not None
    os.sched_setaffinity(redis.proc.pid, TOOLS_CPU)
    results: dict[str, Any] = {}
    sim: procs.Proc | None = None
    try:
        if "hit" in phases:
            _say("hit path (wrk) ...")
            results["hit"] = await hit_phase(plan, redis)
        sim = procs.simulator(latency_ms=200)
        others: list[tuple[str, Callable[..., Awaitable[dict[str, Any]]]]] = [
            ("miss_storm", miss_storm),
            ("burst", burst),
            ("identical_storm", identical_storm),
            ("memory", memory),
        ]
        for name, phase in others:
            if name in phases:
                _say(f"{name} ...")
                results[name] = await phase(plan, redis, sim)
    finally:
        if sim is not None:
            sim.stop()
        redis.close()
    return results


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    parser.add_argument("--json", default="bench/results.json", help="where to write the JSON")
    parser.add_argument(
        "--only", action="append", choices=PHASES, help="run only this phase (repeatable)"
    )
    args = parser.parse_args(argv)
    wrk.require()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    plan = Plan.quick() if args.quick else Plan.full()
    started = time.monotonic()
    results = asyncio.run(main_async(plan, args.only or PHASES))
    doc = {
        "command": "python -m bench.run" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "machine": machine(),
        "plan": plan.__dict__,
        "seconds": round(time.monotonic() - started, 1),
        **results,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["machine"]
    print(f"{m['nproc']} CPUs, {m['cpu_model']}; Python {m['python']}, aiohttp {m['aiohttp']}")
    print(table(doc))
    print(f"\n{doc['command']}: {doc['seconds']} s; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
