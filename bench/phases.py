"""Helpers the phases share: percentiles, the hot-set writer, Redis counters, a miss probe."""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from bench import client
from bench.client import Pool, Result, post_bytes
from gateway.cache_policy import CacheEntry, cache_key
from gateway.cache_redis import RedisCacheStore
from gateway.cache_tiered import CHANNEL
from gateway.clock import SystemClock
from gateway.validation import parse_request

UNSIGNED = b"X-Bench-Unsigned: 1\r\n"


def path(campaign: int, vdn: int = 11) -> str:
    return f"/rest/isales/v1/openapi/campaigns/{vdn}/callresult/{campaign}"


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(q / 100 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the relative spread ((max - min) / median) of repeated figures."""
    mid = statistics.median(values)
    return {
        "median": round(mid, 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "spread": round((max(values) - min(values)) / mid, 3) if mid else 0.0,
    }


async def prime(port: int, requests: list[bytes], connections: int = 1) -> list[Result]:
    """Ask each query once, ``connections`` at a time (in order with one)."""
    pool = Pool()
    await pool.open(port, connections)
    results: list[Result] = []
    try:
        for start in range(0, len(requests), connections):
            results += await pool.fire(requests[start : start + connections], within=60)
    finally:
        await pool.close()
    return results


def unsigned(raw: bytes) -> bytes:
    """A request the stand-in upstream signs itself (``bench.sim``), as NGINX sends them."""
    head, _, body = raw.partition(b"\r\n\r\n")
    return head + b"\r\n" + UNSIGNED[:-2] + b"\r\n\r\n" + body


async def fetch_answers(sim_port: int, queries: list[tuple[str, bytes]]) -> list[bytes]:
    """The stand-in upstream's answers to ``queries``, straight from it (no limiter)."""
    results = await prime(sim_port, [unsigned(post_bytes(p, b)) for p, b in queries], 20)
    assert all(r.status == 200 for r in results), {r.status for r in results}
    return [r.body for r in results]


async def store_answers(
    redis_url: str, queries: list[tuple[str, bytes]], bodies: list[bytes], ttl: float = 3600.0
) -> None:
    """Store ``bodies`` under the gateway's keys of ``queries`` through the gateway's own
    store (format, compression, campaign index), as if each had been a miss."""
    client_ = aioredis.Redis.from_url(redis_url)
    store = RedisCacheStore(client_, clock=SystemClock(), channel=CHANNEL)
    now = SystemClock().time()
    try:
        for (p, body), answer in zip(queries, bodies, strict=True):
            parts = p.rstrip("/").split("/")
            query = parse_request(parts[-3], parts[-1], body)
            entry = CacheEntry(answer, "application/json;charset=UTF-8", now, ttl, 60.0)
            await store.put(cache_key(query), entry)
    finally:
        await client_.aclose()


def redis_info(url: str) -> dict[str, Any]:
    conn = redis.Redis.from_url(url)
    try:
        info: dict[str, Any] = conn.info()
    finally:
        conn.close()
    return info


def commands(url: str) -> int:
    return int(redis_info(url)["total_commands_processed"])


def command_calls(url: str) -> dict[str, int]:
    """Calls per command name (``INFO commandstats``: a script's own commands included)."""
    conn = redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = conn.info("commandstats")
    finally:
        conn.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def calls_per_miss(before: dict[str, int], after: dict[str, int], misses: int) -> dict[str, Any]:
    """Commands per miss between two ``command_calls``, by name (largest first), and the part
    that is the coalescer's lock renewals (each an EVALSHA running GET and PEXPIRE; the cache's
    write script runs one PEXPIRE per stored answer)."""
    spent = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    per = {k: round(v / misses, 2) for k, v in sorted(spent.items(), key=lambda kv: -kv[1]) if v}
    renewals = max(0, spent.get("pexpire", 0) - misses)
    return {
        "by_command": per,
        "coalescer_renewals": round(3 * renewals / misses, 1),
        "rest": round((sum(spent.values()) - 3 * renewals) / misses, 1),
    }


def redis_gets(url: str) -> int:
    """GET commands Redis has served (the cache's lookups)."""
    conn = redis.Redis.from_url(url)
    try:
        stats: dict[str, Any] = conn.info("commandstats")
    finally:
        conn.close()
    return int(stats.get("cmdstat_get", {}).get("calls", 0))


def used_memory(url: str) -> int:
    return int(redis_info(url)["used_memory"])


async def arrivals(sim_port: int) -> list[float]:
    got = await client.get_json(sim_port, "/__bench/arrivals")
    values = got["arrivals"]
    assert isinstance(values, list)
    return sorted(float(v) for v in values)


async def reset(sim_port: int) -> None:
    await client.get_text(sim_port, "/__sim/reset", method="POST")


def batch_lateness(seen: list[float], limit: int, window_s: float) -> list[float]:
    """For each start i, how long after the earliest instant the rule allowed it did start
    ``i + limit`` begin (``seen[i + limit] - seen[i] - window``), in seconds."""
    return [seen[i + limit] - seen[i] - window_s for i in range(len(seen) - limit)]


async def single_miss(port: int, sim_port: int, raw: bytes, latency_s: float) -> dict[str, float]:
    """One miss on an idle limiter: time before the upstream saw it, time added after the
    upstream answered (completion - arrival - the upstream's fixed latency), and time added
    after the upstream had written its answer (completion - that), in ms."""
    await reset(sim_port)
    (result,) = await prime(port, [raw])
    assert result.status == 200, result.head
    got = await client.get_json(sim_port, "/__bench/arrivals")
    times = {name: got[name] for name in ("arrivals", "answered")}
    assert all(isinstance(v, list) and len(v) == 1 for v in times.values()), got
    arrived, answered = (float(v[0]) for v in times.values())  # type: ignore[index]
    return {
        "before_upstream_ms": ms(arrived - result.sent),
        "after_upstream_ms": ms(result.done - arrived - latency_s),
        "after_answer_ms": ms(result.done - answered),
        "total_ms": ms(result.latency),
    }


async def pause(seconds: float) -> None:
    await asyncio.sleep(seconds)
