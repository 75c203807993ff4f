"""The gateway's benchmark: ``python -m bench.run [--quick] [--save]`` (``make bench``).

Starts its own redis-server, stand-in upstream (``bench.sim``: the simulator, recording
arrivals), gateway replicas (Redis mode, default logging: one access line per request) and the
peers found on PATH, a bare aiohttp handler (``bench.bare``, always) and NGINX
(``bench.nginx``, skipped when absent), all on localhost. Phases:

- hit: ``wrk -t1 -c50`` against the bare handler, NGINX ``proxy_cache``, the gateway on a small
  hot set and the gateway on a large one (beyond any entry-count tier), in interleaved rounds
  (the order rotates each round); servers on CPU 0, wrk, Redis and the upstream on CPU 1;
- miss storm: N distinct queries at once (upstream 200 ms): upstream starts per second from
  the upstream's own arrival times against the budget, violations, how late each batch
  started, Redis commands per miss; NGINX ``limit_req`` + ``limit_conn`` the same way;
- burst: 10 distinct misses at once on an idle limiter (first to last upstream arrival), one
  miss alone (time added before and after the upstream), Redis commands per miss; NGINX too;
- identical storm: N identical queries over 3 replicas (NGINX: one, ``proxy_cache_lock``):
  upstream calls, followers' latency past the leader's;
- memory: a replica's peak RSS at N open connections; Redis memory per cached answer.

Prints the table of issue 13 (every figure a ratio or a count within this run) and writes the
JSON to a temporary file, or with ``--save`` to ``bench/results.json`` and the README's
Performance table (the committed figures change only when asked).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import client, instructions, procs, profile, report, wrk
from bench.client import Pool, Result, post_bytes
from bench.nginx import Nginx
from bench.nginx import available as nginx_binary
from bench.phases import (
    arrivals,
    batch_lateness,
    calls_per_miss,
    command_calls,
    commands,
    fetch_answers,
    ms,
    path,
    pct,
    prime,
    redis_gets,
    reset,
    single_miss,
    spread,
    store_answers,
    used_memory,
)

MAX_CONCURRENT = 10
WINDOW_S = 1.1  # window 1000 ms + margin 100 ms: the gateway's defaults
VENDOR_WINDOW_S = 1.0  # the vendor's own rule, which the upstream enforces
BUDGET = MAX_CONCURRENT / WINDOW_S  # upstream starts per second
LATENCY_S = 0.2
SERVER_CPU = {0}
TOOLS_CPU = {1}
BODY = b'{"pageSize":10,"pageNum":1}'
LARGE_BODY = b'{"pageSize":500,"pageNum":1}'
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    hit_rounds: int
    hit_seconds: float
    warmup_seconds: float
    hit_keys: int
    hot_keys: int
    storm: int
    burst_rounds: int
    identical: int
    identical_rounds: int
    connections: int
    memory_small: int
    memory_large: int
    instruction_hits: int  # hits counted under callgrind (0: the phase is skipped)

    @classmethod
    def full(cls) -> Plan:
        return cls(3, 8.0, 2.0, 32, 10000, 500, 5, 1000, 4, 1000, 400, 40, 1000)

    @classmethod
    def quick(cls) -> Plan:
        return cls(1, 2.0, 1.0, 8, 2000, 40, 2, 300, 1, 500, 40, 4, 0)


_use_nginx = True  # --no-nginx


def nginx_available() -> bool:
    return _use_nginx and nginx_binary() is not None


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    return 0.0


def bare_serving(answers: Sequence[Result]) -> procs.Proc:
    """The bare handler answering campaign 1, 2, ... with ``answers``' bytes, on the servers'
    CPU."""
    spec = {
        "content_type": answers[0].content_type,
        "bodies": {str(c): r.body.decode() for c, r in enumerate(answers, start=1)},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
    try:
        return procs.bare(f.name, cpus=SERVER_CPU)
    finally:
        os.unlink(f.name)


async def hit_phase(
    plan: Plan, redis: procs.RedisServer, peers: bool, profiling: bool = False
) -> dict[str, Any]:
    sim = procs.simulator(cpus=TOOLS_CPU)
    gw = procs.gateway(sim, redis.url, cpus=SERVER_CPU, cache__ttl_open_s="3600")
    floor: procs.Proc | None = None
    ngx: Nginx | None = None
    scripts: list[str] = []
    profiled: dict[str, object] | None = None
    try:
        small = [(path(c), BODY) for c in range(1, plan.hit_keys + 1)]
        raws = [post_bytes(p, b) for p, b in small]
        first = await prime(gw.port, raws)
        again = await prime(gw.port, raws)
        assert all(r.status == 200 for r in first), [r.status for r in first]
        assert all(r.cache == "HIT" for r in again), [r.cache for r in again]
        assert all(a.body == b.body for a, b in zip(first, again, strict=True))
        # The large hot set: real answers stored as misses would have stored them (the
        # limiter would take hot_keys / 9.09 seconds to fill it), then read once.
        hot = [(path(1 + c % 1000), b'{"pageSize":10,"pageNum":%d}' % (1 + c // 1000))
               for c in range(plan.hot_keys)]  # fmt: skip
        bodies = [first[i % len(first)].body for i in range(len(hot))]
        await store_answers(redis.url, hot, bodies)
        warm = await prime(gw.port, [post_bytes(p, b) for p, b in hot], 50)
        assert all(r.cache == "HIT" for r in warm), Counter(r.cache for r in warm)
        floor = bare_serving(first)
        bare_answer = (await prime(floor.port, raws[:1]))[0]
        assert bare_answer.body == first[0].body
        targets: list[tuple[str, str, str]] = []
        small_lua, hot_lua = wrk.script(small), wrk.script(hot)
        scripts += [small_lua, hot_lua]
        targets += [("bare", floor.url, small_lua)]
        if peers and nginx_available():
            ngx = Nginx(sim.port, cpus=SERVER_CPU)
            nginx_url = f"http://127.0.0.1:{ngx.cache_port}"
            primed = await prime(ngx.cache_port, raws)
            assert all(r.status == 200 for r in primed), [r.status for r in primed]
            assert (await prime(ngx.cache_port, raws[:1]))[0].cache == "HIT"
            targets.append(("nginx", nginx_url, small_lua))
        targets += [("gateway", gw.url, small_lua), ("gateway_hot", gw.url, hot_lua)]
        hits_before = await _hits(gw.port)
        runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in targets}
        hot_gets = 0
        for r in range(plan.hit_rounds):
            turn = r % len(targets)
            for name, url, lua in targets[turn:] + targets[:turn]:
                gets = redis_gets(redis.url)
                runs[name].append(_wrk_round(url, lua, plan))
                if name == "gateway_hot":
                    hot_gets += redis_gets(redis.url) - gets
        hits_after = await _hits(gw.port)
        load = os.getloadavg()
        if profiling:
            spy = profile.start(gw.pid, plan.hit_seconds)
            if spy is not None:
                small_profile = _wrk_round(gw.url, small_lua, plan)
                runs.setdefault("gateway_profiled", []).append(small_profile)
                profiled = profile.finish(spy)
    finally:
        for lua in scripts:
            wrk.remove(lua)
        if ngx is not None:
            ngx.stop()
        for proc in (floor, gw, sim):
            if proc is not None:
                proc.stop()
    summary = {name: _summary(found) for name, found in runs.items() if name != "gateway_profiled"}
    bare, gateway, hot_set = summary["bare"], summary["gateway"], summary["gateway_hot"]
    result: dict[str, Any] = {
        "connections": 50,
        "keys": plan.hit_keys,
        "hot_keys": plan.hot_keys,
        "answer_bytes": len(first[0].body),
        "seconds_per_round": plan.hit_seconds,
        "rounds": plan.hit_rounds,
        **summary,
        "throughput_ratio": round(gateway["rps"] / bare["rps"], 3),
        "p50_ratio": round(gateway["p50_ms"] / bare["p50_ms"], 2),
        "p99_ratio": round(gateway["p99_ms"] / bare["p99_ms"], 2),
        "hot_set_ratio": round(hot_set["rps"] / gateway["rps"], 3),
        "hot_set_p99_ms": hot_set["p99_ms"],
        # Redis GETs per request in the hot-set rounds (warm-ups included)
        "hot_set_redis_gets_per_hit": round(
            hot_gets / max(1, sum(r["requests"] for r in runs["gateway_hot"])), 4
        ),
        # measured runs plus warm-ups: every one of them was a cache hit
        "gateway_hits_counted": int(hits_after - hits_before),
        "gateway_requests_measured": int(sum(r["requests"] for r in runs["gateway"])),
        "loadavg_after": [round(x, 2) for x in load],
        "runs": runs,
    }
    if profiled is not None:
        result["profile"] = profiled
    if "nginx" in summary:
        result["nginx_ratio"] = round(gateway["rps"] / summary["nginx"]["rps"], 3)
    return result


async def _hits(port: int) -> float:
    text = await _metrics(port)
    return metric(text, 'isales_gateway_cache_lookups_total{result="hit"}')


async def _metrics(port: int) -> str:
    return await client.get_text(port, "/metrics")


def _wrk_round(url: str, lua: str, plan: Plan) -> dict[str, float]:
    wrk.run(url, lua, seconds=plan.warmup_seconds, connections=50, cpus=TOOLS_CPU)
    result = wrk.run(url, lua, seconds=plan.hit_seconds, connections=50, cpus=TOOLS_CPU)
    if result["non2xx"] or result["socket_errors"]:
        raise RuntimeError(f"wrk saw errors against {url}: {result}")
    return result


def _summary(runs: list[dict[str, float]]) -> dict[str, Any]:
    rps = spread([r["rps"] for r in runs])
    return {
        "rps": round(rps["median"], 1),
        "rps_spread": rps["spread"],
        "p50_ms": round(spread([r["p50_us"] for r in runs])["median"] / 1000, 3),
        "p99_ms": round(spread([r["p99_us"] for r in runs])["median"] / 1000, 3),
    }


async def storm_through(
    port: int, sim_port: int, n: int, redis_url: str | None, peer: bool, page: int = 7
) -> dict[str, Any]:
    """N distinct queries at once through ``port`` (``pageNum`` ``page``: another page for
    another storm on the same cache); the upstream's view of them."""
    pool = Pool()
    try:
        await pool.open(port, n)
        await asyncio.sleep(WINDOW_S + 0.2)
        await reset(sim_port)
        before = commands(redis_url) if redis_url else 0
        calls = command_calls(redis_url) if redis_url else {}
        body = b'{"pageSize":10,"pageNum":%d}' % page
        requests = [post_bytes(path(c), body) for c in range(1, n + 1)]
        results = await pool.fire(requests, within=n / BUDGET + 180)
        spent = commands(redis_url) - before if redis_url else 0
        calls_after = command_calls(redis_url) if redis_url else {}
        stats = await client.get_json(sim_port, "/__sim/stats")
        seen = await arrivals(sim_port)
    finally:
        await pool.close()
    span = seen[-1] - seen[0] if len(seen) > 1 else 0.0
    rate = (len(seen) - MAX_CONCURRENT) / span if span > 0 else float("nan")
    late = batch_lateness(seen, MAX_CONCURRENT, WINDOW_S if not peer else VENDOR_WINDOW_S)
    latencies = [r.latency for r in results]
    misses = sum(1 for r in results if r.status == 200)
    return {
        "queries": n,
        "starts_per_s": round(rate, 3),
        "budget_used": round(rate / BUDGET, 4),
        "upstream_requests": stats["requests_total"],
        "violations": stats["violations"],
        "max_in_flight": stats["max_in_flight"],
        "max_starts_in_window": stats["max_starts_in_window"],
        "statuses": dict(Counter(str(r.status) for r in results)),
        "x_cache": dict(Counter(r.cache for r in results)),
        "caller_p50_s": round(pct(latencies, 50), 3),
        "caller_p99_s": round(pct(latencies, 99), 3),
        "batch_late_ms_median": ms(pct(late, 50)) if late else None,
        "batch_late_ms_p90": ms(pct(late, 90)) if late else None,
        "redis_commands_per_miss": round(spent / misses, 1) if redis_url and misses else None,
        **({"redis_calls": calls_per_miss(calls, calls_after, misses)} if calls and misses else {}),
    }


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
    try:
        # A fifth of the storm first: commands per miss with a queue beyond a window's worth,
        # to set against the storm's (a burst on an idle limiter is granted in one try).
        fifth = await storm_through(gw.port, sim.port, n // 5, redis.url, peer=False, page=6)
        result = await storm_through(gw.port, sim.port, n, redis.url, peer=False)
        result["replica_memory"] = procs.proc_memory(gw.pid)
        result["fifth"] = {
            k: fifth.get(k)
            for k in ("queries", "redis_commands_per_miss", "redis_calls", "violations")
        }
    finally:
        gw.stop()
    result["upstream_latency_ms"] = LATENCY_S * 1000
    result["budget_starts_per_s"] = round(BUDGET, 3)
    if nginx_available():
        ngx = Nginx(sim.port)
        try:
            result["nginx"] = await storm_through(ngx.limit_port, sim.port, n, None, peer=True)
        finally:
            ngx.stop()
    return result


async def burst(plan: Plan, redis: procs.RedisServer, sim: procs.Proc) -> dict[str, Any]:
    redis.flush()
    gw = procs.gateway(sim, redis.url)
    ngx = Nginx(sim.port) if nginx_available() else None
    found: dict[str, dict[str, list[Any]]] = {
        name: {"spreads": [], "alone": [], "per_miss": [], "calls": []}
        for name in ("gateway", "nginx")
        if name == "gateway" or ngx is not None
    }
    try:
        # one miss so every lazy start-up (Redis scripts, subscriptions, upstream pool) is done
        await prime(gw.port, [post_bytes(path(999), BODY)])
        for r in range(plan.burst_rounds):
            for name in found:
                port = gw.port if name == "gateway" else (ngx.limit_port if ngx else 0)
                await asyncio.sleep(WINDOW_S + 0.3)  # an idle limiter: the window holds no start
                alone = post_bytes(path(900 + r), b'{"pageSize":10,"pageNum":%d}' % (r + 2))
                found[name]["alone"].append(await single_miss(port, sim.port, alone, LATENCY_S))
                await asyncio.sleep(WINDOW_S + 0.3)
                await reset(sim.port)
                body = b'{"pageSize":10,"pageNum":%d}' % (r + 2)
                requests = [post_bytes(path(c), body) for c in range(1, MAX_CONCURRENT + 1)]
                before = commands(redis.url)
                calls = command_calls(redis.url)
                results = await prime(port, requests, MAX_CONCURRENT)
                spent = commands(redis.url) - before
                calls_after = command_calls(redis.url)
                assert all(x.status == 200 for x in results), [x.status for x in results]
                seen = await arrivals(sim.port)
                assert len(seen) == MAX_CONCURRENT, seen
                found[name]["spreads"].append(seen[-1] - seen[0])
                if name == "gateway":
                    found[name]["per_miss"].append(spent / MAX_CONCURRENT)
                    found[name]["calls"].append(calls_per_miss(calls, calls_after, MAX_CONCURRENT))
    finally:
        gw.stop()
        if ngx is not None:
            ngx.stop()
    out: dict[str, Any] = {"rounds": plan.burst_rounds}
    for name, f in found.items():
        out[name] = {
            "first_to_last_ms": [ms(s) for s in f["spreads"]],
            "first_to_last_ms_max": ms(max(f["spreads"])),
            "first_to_last_ms_median": ms(pct(f["spreads"], 50)),
            "alone": f["alone"],
            "after_upstream_ms_median": pct([a["after_upstream_ms"] for a in f["alone"]], 50),
            "before_upstream_ms_median": pct([a["before_upstream_ms"] for a in f["alone"]], 50),
            "after_answer_ms_median": pct([a["after_answer_ms"] for a in f["alone"]], 50),
        }
        if f["per_miss"]:
            out[name]["redis_commands_per_miss"] = round(pct(f["per_miss"], 50), 1)
            out[name]["redis_calls_last_round"] = f["calls"][-1]
    return out


async def identical_storm(plan: Plan, redis: procs.RedisServer, sim: procs.Proc) -> dict[str, Any]:
    n = plan.identical
    redis.flush()
    replicas = [procs.gateway(sim, redis.url) for _ in range(3)]
    ngx = Nginx(sim.port) if nginx_available() else None
    rounds: dict[str, list[dict[str, Any]]] = {"gateway": [], "nginx": []}
    pools: dict[str, tuple[Pool, list[int]]] = {}
    try:
        pools["gateway"] = await _fleet_pool([r.port for r in replicas], n)
        if ngx is not None:
            pools["nginx"] = await _fleet_pool([ngx.cache_port], n)
        for pool, _ in pools.values():  # lazy start-up (scripts, pub/sub, upstream pool)
            await pool.fire([post_bytes(path(998), BODY)] * 3, within=30)
        for r in range(plan.identical_rounds):
            for name, (pool, owners) in pools.items():
                await asyncio.sleep(0.5)
                await reset(sim.port)
                request = post_bytes(path(500 + r), BODY)
                results = await pool.fire([request] * n, within=120)
                stats = await client.get_json(sim.port, "/__sim/stats")
                rounds[name].append(_identical_round(results, owners, stats))
    finally:
        for pool, _ in pools.values():
            await pool.close()
        for replica in replicas:
            replica.stop()
        if ngx is not None:
            ngx.stop()
    out: dict[str, Any] = {"queries": n, "replicas": 3, "upstream_latency_ms": LATENCY_S * 1000}
    for name, found in rounds.items():
        if not found:
            continue
        p99s = [x["follower_extra_ms_p99"] for x in found]
        out[name] = {
            "rounds": found,
            "upstream_calls_max": max(x["upstream_calls"] for x in found),
            "follower_extra_ms_p99_worst": max(p99s),
            "follower_extra_ms_p99_median": pct(p99s, 50),
        }
    return out


async def _fleet_pool(ports: Sequence[int], n: int) -> tuple[Pool, list[int]]:
    """``n`` connections spread round robin over ``ports``; also each one's index."""
    pools = []
    for i, port in enumerate(ports):
        pool = Pool()
        await pool.open(port, len(range(i, n, len(ports))))
        pools.append(pool)
    merged = Pool()
    owners = []
    for k in range(n):
        merged.conns.append(pools[k % len(ports)].conns[k // len(ports)])
        owners.append(k % len(ports))
    return merged, owners


def _identical_round(
    results: list[Result], owners: list[int], stats: dict[str, object]
) -> dict[str, Any]:
    leaders = [i for i, x in enumerate(results) if x.cache == "MISS"]
    assert len(leaders) == 1, Counter(x.cache for x in results)
    lead = leaders[0]
    base = results[lead].latency
    extra = [x.latency - base for i, x in enumerate(results) if i != lead]
    same = [
        x.latency - base for i, x in enumerate(results) if i != lead and owners[i] == owners[lead]
    ]
    return {
        "upstream_calls": stats["requests_total"],
        "statuses": dict(Counter(str(x.status) for x in results)),
        "x_cache": dict(Counter(x.cache for x in results)),
        "leader_latency_ms": ms(base),
        "follower_extra_ms_p50": ms(pct(extra, 50)),
        "follower_extra_ms_p99": ms(pct(extra, 99)),
        "follower_extra_ms_max": ms(max(extra)),
        "same_replica_extra_ms_p99": ms(pct(same, 99)),
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
    out: dict[str, Any] = {
        "connections": n,
        "idle_rss_mib": idle["rss_mib"],
        "rss_mib_holding": held["rss_mib"],
        "peak_rss_mib": held["peak_rss_mib"],
    }
    for name, count, body in (
        ("small", plan.memory_small, BODY),
        ("large", plan.memory_large, LARGE_BODY),
    ):
        redis.flush()
        queries = [(path(c), body) for c in range(1, count + 1)]
        answers = await fetch_answers(sim.port, queries)
        before = used_memory(redis.url)
        await store_answers(redis.url, queries, answers)
        per_answer = (used_memory(redis.url) - before) / count
        raw = sum(len(a) for a in answers) / count
        out[f"redis_{name}"] = {
            "answers": count,
            "raw_bytes": round(raw),
            "redis_bytes_per_answer": round(per_answer),
            "ratio": round(per_answer / raw, 3),
        }
    return out


PHASES = ("hit", "instructions", "miss_storm", "burst", "identical_storm", "memory")


async def main_async(
    plan: Plan, phases: Sequence[str], peers: bool, profiling: bool
) -> dict[str, Any]:
    redis = procs.RedisServer().start()
    assert redis.proc is not None
    os.sched_setaffinity(redis.proc.pid, TOOLS_CPU)
    results: dict[str, Any] = {}
    sim: procs.Proc | None = None
    try:
        if "hit" in phases:
            _say("hit path (wrk) ...")
            results["hit"] = await hit_phase(plan, redis, peers, profiling)
        if "instructions" in phases and plan.instruction_hits and shutil.which("valgrind"):
            _say("instructions per hit (callgrind, about 4 minutes) ...")
            results["instructions"] = await instructions.measure(plan.instruction_hits, None, {})
        sim = procs.simulator(latency_ms=LATENCY_S * 1000)
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
    parser.add_argument(
        "--save",
        action="store_true",
        help="write bench/results.json and the README's Performance table (default: neither);"
        " with --only, those phases replace theirs and the rest are kept",
    )
    parser.add_argument("--json", help="where to write the JSON (default: a temporary file)")
    parser.add_argument(
        "--only", action="append", choices=PHASES, help="run only this phase (repeatable)"
    )
    parser.add_argument("--no-nginx", action="store_true", help="skip the NGINX peer")
    parser.add_argument(
        "--profile", action="store_true", help="py-spy a replica during one more hit round"
    )
    args = parser.parse_args(argv)
    wrk.require()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20000)), hard))
    global _use_nginx
    _use_nginx = not args.no_nginx
    plan = Plan.quick() if args.quick else Plan.full()
    started = time.monotonic()
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = asyncio.run(main_async(plan, args.only or PHASES, not args.no_nginx, args.profile))
    doc = {
        "command": " ".join(
            ["python -m bench.run"]
            + ["--quick"] * args.quick
            + [f"--only {name}" for name in args.only or ()]
            + ["--profile"] * args.profile
        ),
        "quick": args.quick,
        "machine": report.machine(load_before),
        "plan": plan.__dict__,
        "seconds": round(time.monotonic() - started, 1),
        **results,
    }
    target = args.json or (
        ROOT / "bench" / "results.json"
        if args.save
        else Path(tempfile.gettempdir()) / "isales-gateway-bench.json"
    )
    stamp = {"command": doc["command"], "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    doc["phases_from"] = dict.fromkeys(results, stamp)
    if args.save and args.only and Path(target).exists():
        # Some phases again: keep the others' figures, and say which run each phase is from
        # (every ratio is within one phase, so within one run).
        kept = json.loads(Path(target).read_text())
        kept.setdefault("phases_from", {k: {"command": kept["command"]} for k in PHASES})
        doc = {**kept, **{k: v for k, v in doc.items() if k not in ("command", "seconds")}}
        doc["phases_from"] = {**kept["phases_from"], **dict.fromkeys(results, stamp)}
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    Path(target).write_text(json.dumps(doc, indent=2) + "\n")
    m = doc["machine"]
    print(f"{m['nproc']} CPUs, {m['cpu_model']}; Python {m['python']}, aiohttp {m['aiohttp']}")
    table = report.table(doc)
    print(table)
    if args.save:
        report.write_readme(ROOT / "README.md", doc, table)
    print(f"\n{doc['command']}: {doc['seconds']} s; JSON in {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
