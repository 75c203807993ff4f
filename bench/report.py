"""The bench's report: the machine, the table of issue 13 (goals beside figures), the README.

Every figure is a ratio or a count within one run; the machine and the noise (load average,
the spread of repeated rounds) are recorded beside them.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import nginx, wrk

BEGIN = "<!-- bench:table:begin -->"
END = "<!-- bench:table:end -->"


def machine(load_before: list[float]) -> dict[str, Any]:
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
        "nginx": nginx.version(),
        "loadavg_before": load_before,
        "pinning": "hit phase: the server under test on CPU 0; wrk, redis-server and the "
        "upstream on CPU 1; the other phases share both CPUs among all processes",
    }


def _mark(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "**no**")


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(measure, this run, goal, met) for each row the run has figures for."""
    out: list[tuple[str, str, str, bool | None]] = []
    h = r.get("hit")
    if h:
        b, g, hot = h["bare"], h["gateway"], h["gateway_hot"]
        out.append(
            (
                "hit throughput vs a bare aiohttp handler, same bytes, access log on",
                f"{h['throughput_ratio']:.2f}x ({g['rps']:,.0f} vs {b['rps']:,.0f} req/s); "
                f"p99 {g['p99_ms']:.1f} vs {b['p99_ms']:.1f} ms = {h['p99_ratio']:.1f}x",
                ">= 0.70x, p99 <= 2x",
                h["throughput_ratio"] >= 0.70 and h["p99_ratio"] <= 2.0,
            )
        )
        if "nginx" in h:
            n = h["nginx"]
            out.append(
                (
                    "hit throughput vs NGINX `proxy_cache` (peer)",
                    f"{h['nginx_ratio']:.2f}x ({g['rps']:,.0f} vs {n['rps']:,.0f} req/s); "
                    f"p99 {n['p99_ms']:.1f} ms",
                    "",
                    None,
                )
            )
    i = r.get("instructions")
    if i:
        out.append(
            (
                "hit work vs a bare aiohttp handler: instructions per hit (callgrind; the load"
                " does not move it)",
                f"{i['gateway_vs_bare']:.2f}x ({i['gateway'] / 1000:,.0f}k vs "
                f"{i['bare'] / 1000:,.0f}k instructions; Redis GETs meanwhile "
                f"{i['gateway_redis_gets']})",
                ">= 0.70x",
                i["gateway_vs_bare"] >= 0.70,
            )
        )
    if h:
        out.append(
            (
                f"hits on a hot set of {h['hot_keys']:,} keys vs {h['keys']} keys",
                f"{h['hot_set_ratio']:.2f}x ({hot['rps']:,.0f} vs {g['rps']:,.0f} req/s); "
                f"p99 {hot['p99_ms']:.1f} ms; Redis GETs per hit "
                f"{h.get('hot_set_redis_gets_per_hit', float('nan')):.3f}",
                ">= 0.8x",
                h["hot_set_ratio"] >= 0.8,
            )
        )
    u = r.get("burst")
    m = r.get("miss_storm")
    if u:
        gw = u["gateway"]
        nx = u.get("nginx", {})
        peer = f"; NGINX {nx['after_upstream_ms_median']:.1f} ms" if nx else ""
        added = gw.get("after_answer_ms_median")
        if added is not None:  # measured from the upstream's written answer (newer runs)
            peer_added = f"; NGINX {nx['after_answer_ms_median']:.1f} ms" if nx else ""
            out.append(
                (
                    "time added to a miss after the upstream wrote its answer",
                    f"{added:.1f} ms{peer_added}",
                    "<= 2 ms",
                    added <= 2.0,
                )
            )
        out.append(
            (
                "time from the upstream's arrival + its 200 ms to the caller's answer"
                + ("" if added is not None else " (limiter work)"),
                f"{gw['after_upstream_ms_median']:.1f} ms (before it: "
                f"{gw['before_upstream_ms_median']:.1f} ms){peer}",
                "" if added is not None else "<= 2 ms",
                None if added is not None else gw["after_upstream_ms_median"] <= 2.0,
            )
        )
    if m:
        out.append(
            (
                f"miss storm, {m['queries']} distinct: budget used; batch start past the window",
                f"{m['budget_used']:.1%} ({m['starts_per_s']:.2f} of "
                f"{m['budget_starts_per_s']:.2f}/s); late by {m['batch_late_ms_median']:.1f} ms "
                f"median, {m['batch_late_ms_p90']:.1f} p90",
                ">= 99.5 %",
                m["budget_used"] >= 0.995,
            )
        )
        n = m.get("nginx")
        peer = (
            f"; NGINX `limit_req`+`limit_conn`: {n['violations']} ({n['starts_per_s']:.2f}/s, "
            f"statuses {n['statuses']})"
            if n
            else ""
        )
        out.append(
            (
                "miss storm: violations of the vendor's limit (upstream's count)",
                f"{m['violations']}{peer}",
                "0",
                m["violations"] == 0,
            )
        )
    if u and m:
        burst = u["gateway"].get("redis_commands_per_miss")
        deep = m.get("redis_commands_per_miss")
        fifth = m.get("fifth") or {}
        # Independent of depth: a queue of a fifth of the storm against the storm, both beyond
        # a window's worth (older runs: the burst of 10, granted in one try, against the storm).
        shallow, shallow_depth = fifth.get("redis_commands_per_miss"), fifth.get("queries")
        if shallow is None:
            shallow, shallow_depth = burst, 10
        out.append(
            (
                "Redis commands per miss",
                f"{shallow} with {shallow_depth} queued, {deep} with {m['queries']} queued"
                + (f"; a burst of 10 on an idle limiter: {burst}" if fifth else ""),
                "bounded, independent of queue depth",
                None if shallow is None or deep is None else deep <= shallow * 1.2,
            )
        )
        split_shallow = fifth.get("redis_calls") or u["gateway"].get("redis_calls_last_round")
        split_deep = m.get("redis_calls")
        if split_shallow and split_deep:
            out.append(
                (
                    "Redis commands per miss without the coalescer's lock renewals",
                    f"{split_shallow['rest']} with {shallow_depth} queued, "
                    f"{split_deep['rest']} with {m['queries']} queued (renewals: "
                    f"{split_shallow['coalescer_renewals']}, {split_deep['coalescer_renewals']})",
                    "bounded, independent of queue depth",
                    split_deep["rest"] <= split_shallow["rest"] * 1.2,
                )
            )
    if u:
        peer = ""
        if "nginx" in u:
            peer = f"; NGINX {u['nginx']['first_to_last_ms_max']:.0f} ms"
        out.append(
            (
                "burst of 10 misses: first to last upstream arrival",
                f"max {u['gateway']['first_to_last_ms_max']:.1f} ms{peer}",
                "",
                None,
            )
        )
    i = r.get("identical_storm")
    if i:
        g = i["gateway"]
        peer = ""
        if "nginx" in i:
            n = i["nginx"]
            peer = (
                "; NGINX `proxy_cache_lock` (one instance): "
                f"{n['follower_extra_ms_p99_median']:.0f} ms, {n['upstream_calls_max']} call(s)"
            )
        out.append(
            (
                f"followers' p99 past the upstream, {i['queries']:,} identical callers over "
                f"3 replicas",
                f"{g['follower_extra_ms_p99_median']:.1f} ms median of {len(g['rounds'])} rounds "
                f"(worst {g['follower_extra_ms_p99_worst']:.1f}), "
                f"{g['upstream_calls_max']} upstream call(s){peer}",
                "<= 20 ms, 1 call",
                g["follower_extra_ms_p99_median"] <= 20.0 and g["upstream_calls_max"] == 1,
            )
        )
    mem = r.get("memory")
    if mem:
        small, large = mem["redis_small"], mem["redis_large"]
        out.append(
            (
                "Redis memory per cached answer",
                f"{large['ratio']:.2f}x for a {large['raw_bytes']:,}-byte answer "
                f"({large['redis_bytes_per_answer']:,} bytes); {small['ratio']:.2f}x for "
                f"{small['raw_bytes']:,} bytes ({small['redis_bytes_per_answer']:,})",
                "<= 0.3x the raw body for large answers",
                large["ratio"] <= 0.3,
            )
        )
        out.append(
            (
                f"peak RSS of a replica, {mem['connections']:,} open connections",
                f"{mem['peak_rss_mib']:.0f} MiB (idle {mem['idle_rss_mib']:.0f})",
                "<= 150 MB",
                mem["peak_rss_mib"] <= 150,
            )
        )
    return out


def noise(r: dict[str, Any]) -> str:
    m = r["machine"]
    parts = [
        f"{m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, aiohttp {m['aiohttp']}, "
        f"redis-server {m['redis_server']}, {m['wrk']}"
        + (f", nginx {m['nginx']}" if m.get("nginx") else ""),
        f"load average before the run {m['loadavg_before'][0]:.2f}",
    ]
    h = r.get("hit")
    if h:
        spreads = ", ".join(
            f"{name} {h[name]['rps_spread']:.0%}"
            for name in ("bare", "nginx", "gateway", "gateway_hot")
            if name in h
        )
        parts.append(f"hit rounds: {h['rounds']} interleaved, throughput spread {spreads}")
        parts.append(f"load average after the hit phase {h['loadavg_after'][0]:.2f}")
    return "; ".join(parts)


def profile(r: dict[str, Any]) -> str:
    """The hit profile's shares per part of the stack (the event loop's thread), or ""."""
    found = r.get("hit", {}).get("profile") or {}
    if not found.get("samples"):
        return ""
    parts: dict[str, float] = dict(found["parts"])
    note = ""
    if "thread" not in found:
        # Sampled without --threads: the access-log writer's samples (its write, mostly
        # waiting for the GIL) are mixed in; take them out.
        writer = sum(share for name, share in found["top"] if name.startswith("AccessLog._run"))
        parts["access log"] = max(0.0, parts.get("access log", 0.0) - writer)
        rest = 1.0 - writer
        parts = {k: v / rest for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}
        note = f"; the writer thread's {writer:.0%} of samples, mostly GIL waits, left out"
    else:
        others = {k: v for k, v in found["threads"].items() if k != found["thread"]}
        if others:
            note = "; other threads: " + ", ".join(f"{k} {v:.0%}" for k, v in others.items())
    shares = ", ".join(f"{name} {share:.0%}" for name, share in parts.items())
    return (
        f"\n\nProfile of a hit (py-spy, {found['samples']:,} samples, the event loop's "
        f"thread): {shares}{note}."
    )


def table(r: dict[str, Any]) -> str:
    lines = ["| measure | this run | goal | met |", "|---|---|---|---|"]
    for name, value, goal, met in rows(r):
        lines.append(f"| {name} | {value} | {goal} | {_mark(met)} |")
    return "\n".join(lines) + f"\n\nMachine and noise: {noise(r)}." + profile(r)


def write_readme(readme: Path, r: dict[str, Any], rendered: str) -> None:
    """Replace the README's table between the bench markers with ``rendered``."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"bench: {readme} has no {BEGIN} ... {END} block to write")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    head_line = f"`{r['command']}`, {r['seconds']:.0f} s"
    again: dict[str, list[str]] = {}
    for phase, source in r.get("phases_from", {}).items():
        if source["command"] != r["command"]:
            again.setdefault(source["command"], []).append(phase)
    for command, phases in again.items():
        head_line += f"; {', '.join(phases)} from `{command}`"
    block = f"{BEGIN}\n{head_line}:\n\n{rendered}\n{END}"
    readme.write_text(head + block + tail)
