"""Sharing the upstream budget: ``python -m bench.fairness [--phase share|refresh] [--json PATH]``.

Starts its own simulator (200 ms) and one embedded gateway (in-memory limiter) per run on
localhost, with caller auth off and ``limit.caller_header = X-Caller`` naming the callers:

- share: caller A fires 300 distinct misses at once; a second later caller B sends 5
  distinct misses one after another. B's answers and slowest latency, the upstream's starts
  per second (simulator arrival times) against the budget, and A's outcomes;
- share-fleet: the same against 3 replicas on one Redis (a private redis-server), A's flood
  spread over all three, B on one of them;
- refresh: one replayed Zipf workload (seeded) over open-ended queries, against a gateway
  with refresh-ahead on and one with it off: hit ratio, caller latency, refreshes made.

"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, TCPConnector

from bench import client, procs
from gateway.auth import key_digest

MAX_CONCURRENT = 10
WINDOW_S = 1.1
BUDGET = MAX_CONCURRENT / WINDOW_S  # upstream starts per second
JSON = {"Content-Type": "application/json; charset=UTF-8"}


def route(campaign: int) -> str:
    return f"/rest/isales/v1/openapi/campaigns/11/callresult/{campaign}"


def callers_file(names: Sequence[str]) -> str:
    text = "\n".join(
        f'[[callers]]\nname = "{n}"\nkey_sha256 = "{key_digest(n)}"\nvdn_ids = ["*"]\n'
        for n in names
    )
    file = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)  # noqa: SIM115
    file.write(text)
    file.close()
    return file.name


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))] if ordered else 0.0


async def post(
    session: ClientSession, url: str, body: dict[str, Any], caller: str
) -> tuple[int, str, float]:
    """Status, X-Cache and latency (s) of one request."""
    began = time.monotonic()
    async with session.post(url, json=body, headers={**JSON, "X-Caller": caller}) as response:
        await response.read()
        return response.status, response.headers.get("X-Cache", ""), time.monotonic() - began


def gateway(sim: procs.Proc, **settings: str) -> procs.Proc:
    return procs.gateway(
        sim, "", log__level="WARNING", limit__caller_header="X-Caller", **settings
    )  # redis url "": embedded mode


async def share(names: str, flood: int = 300, late: int = 5, replicas: int = 1) -> dict[str, Any]:
    """``names``: a callers file naming a and b. ``replicas`` > 1: that many on one Redis."""
    sim = procs.simulator(latency_ms=200)
    redis = procs.RedisServer().start() if replicas > 1 else None
    if redis is not None:
        redis.flush()
    url = "" if redis is None else redis.url
    gws = [
        procs.gateway(
            sim,
            url,
            log__level="WARNING",
            limit__caller_header="X-Caller",
            limit__replicas=str(replicas),
            auth__callers_file=names,
        )
        for _ in range(replicas)
    ]
    try:
        async with ClientSession(connector=TCPConnector(limit=0)) as session:
            await client.get_text(sim.port, "/__sim/reset", method="POST")
            a_tasks = [
                asyncio.create_task(
                    post(session, gws[c % replicas].url + route(c), {"pageSize": 10}, "a")
                )
                for c in range(1, flood + 1)
            ]
            await asyncio.sleep(1.0)
            b_results = []
            for c in range(1, late + 1):
                b_results.append(await post(session, gws[0].url + route(10_000 + c), {}, "b"))
            a_results = await asyncio.gather(*a_tasks)
            got = await client.get_json(sim.port, "/__bench/arrivals")
            stats = await client.get_json(sim.port, "/__sim/stats")
    finally:
        for gw in gws:
            gw.stop()
        sim.stop()
        if redis is not None:
            redis.close()
    seen = sorted(float(v) for v in got["arrivals"])  # type: ignore[union-attr]
    span = seen[-1] - seen[0] if len(seen) > 1 else 0.0
    rate = (len(seen) - MAX_CONCURRENT) / span if span > 0 else float("nan")
    a_ok = [lat for status, _, lat in a_results if status == 200]
    return {
        "replicas": replicas,
        "a_flood": flood,
        "b_sequential": late,
        "b_statuses": [status for status, _, _ in b_results],
        "b_latencies_s": [round(lat, 3) for _, _, lat in b_results],
        "b_slowest_s": round(max(lat for _, _, lat in b_results), 3),
        "a_statuses": dict(Counter(str(status) for status, _, _ in a_results)),
        "a_served_p50_s": round(pct(a_ok, 50), 3),
        "a_served_max_s": round(max(a_ok), 3) if a_ok else None,
        "upstream_requests": stats["requests_total"],
        "violations": stats["violations"],
        "budget_starts_per_s": round(BUDGET, 3),
        "starts_per_s": round(rate, 3),
        "budget_used": round(rate / BUDGET, 3),
    }


def zipf_workload(
    keys: int, rate: float, seconds: float, s: float, seed: int
) -> list[tuple[float, int]]:
    """(send time, key) pairs: Poisson arrivals at ``rate``, keys drawn by Zipf(``s``)."""
    rng = random.Random(seed)  # noqa: S311 - a replayable workload, not security
    weights = [1 / (k**s) for k in range(1, keys + 1)]
    at, plan = 0.0, []
    while at < seconds:
        at += rng.expovariate(rate)
        plan.append((at, rng.choices(range(1, keys + 1), weights)[0]))
    return plan


async def replay(gw: procs.Proc, plan: list[tuple[float, int]]) -> list[tuple[int, str, float]]:
    async with ClientSession(connector=TCPConnector(limit=0)) as session:
        began = time.monotonic()

        async def one(at: float, key: int) -> tuple[int, str, float]:
            await asyncio.sleep(max(0.0, began + at - time.monotonic()))
            return await post(session, gw.url + route(key), {"pageSize": 10}, "a")

        return await asyncio.gather(*(one(at, key) for at, key in plan))


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.split(" ")[0] == name:
            return float(line.split()[-1])
    return 0.0


async def refresh(names: str, seconds: float = 60.0) -> dict[str, Any]:
    """``names``: a callers file naming a."""
    plan = zipf_workload(keys=150, rate=25.0, seconds=seconds, s=1.1, seed=7)
    sim = procs.simulator(latency_ms=200)
    runs: dict[str, Any] = {
        "requests": len(plan),
        "keys": 150,
        "zipf_s": 1.1,
        "rate_per_s": 25.0,
        "seconds": seconds,
        "ttl_open_s": 10,
        "refresh_ahead_s": 2,
        "refresh_min_hits": 3,
    }
    try:
        for mode, lead in (("off", "0"), ("on", "2")):
            gw = gateway(
                sim,
                auth__callers_file=names,
                cache__ttl_open_s="10",
                cache__swr_s="0",
                cache__refresh_ahead_s=lead,
                cache__refresh_min_hits="3",
            )
            try:
                await client.get_text(sim.port, "/__sim/reset", method="POST")
                results = await replay(gw, plan)
                text = await client.get_text(gw.port, "/metrics")
                stats = await client.get_json(sim.port, "/__sim/stats")
            finally:
                gw.stop()
            latencies = [lat for _, _, lat in results]
            hits = sum(1 for _, cache, _ in results if cache == "HIT")
            runs[mode] = {
                "statuses": dict(Counter(str(status) for status, _, _ in results)),
                "x_cache": dict(Counter(cache for _, cache, _ in results)),
                "hit_ratio": round(hits / len(results), 3),
                "caller_mean_ms": round(statistics.fmean(latencies) * 1000, 1),
                "caller_p50_ms": round(pct(latencies, 50) * 1000, 1),
                "caller_p95_ms": round(pct(latencies, 95) * 1000, 1),
                "caller_p99_ms": round(pct(latencies, 99) * 1000, 1),
                "upstream_requests": stats["requests_total"],
                "refreshes": metric(text, 'isales_gateway_refresh_ahead_total{result="ok"}'),
                "refreshes_skipped": metric(
                    text, 'isales_gateway_refresh_ahead_total{result="skipped"}'
                ),
            }
    finally:
        sim.stop()
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.fairness", description=__doc__)
    parser.add_argument("--phase", choices=["share", "share-fleet", "refresh"], action="append")
    parser.add_argument("--seconds", type=float, default=60.0, help="refresh workload length")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    phases = args.phase or ["share", "share-fleet", "refresh"]
    results: dict[str, Any] = {}
    names = callers_file(["a", "b"])
    try:
        if "share" in phases:
            results["share"] = asyncio.run(share(names))
            print(json.dumps({"share": results["share"]}, indent=2), file=sys.stderr)
        if "share-fleet" in phases:
            results["share_fleet"] = asyncio.run(share(names, replicas=3))
            print(json.dumps({"share_fleet": results["share_fleet"]}, indent=2), file=sys.stderr)
        if "refresh" in phases:
            results["refresh"] = asyncio.run(refresh(names, args.seconds))
    finally:
        Path(names).unlink(missing_ok=True)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
