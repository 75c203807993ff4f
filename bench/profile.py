"""Where a cache hit's CPU goes: ``py-spy`` samples a replica while ``wrk`` keeps it busy.

Optional (``pip install -e '.[bench]'``); ``python -m bench.run --profile`` adds the share of
samples per part of the stack (by the sampled frame's file) to the hit phase's results.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# (part, what a sampled file path contains); the first match names the part.
PARTS = (
    ("access log", "gateway/access_log.py"),
    ("gateway", "gateway/"),
    ("stdlib logging", "logging/"),
    ("prometheus_client", "prometheus_client/"),
    ("redis-py", "redis/"),
    ("aiohttp", "aiohttp/"),
    ("asyncio and socket I/O", "asyncio/"),
)


def binary() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float) -> tuple[subprocess.Popen[bytes], str] | None:
    """Start sampling ``pid`` for ``seconds``; None when py-spy is not installed."""
    spy = binary()
    if spy is None:
        return None
    out = tempfile.NamedTemporaryFile(prefix="gw-bench-", suffix=".txt", delete=False).name  # noqa: SIM115
    cmd = [spy, "record", "-p", str(pid), "-d", str(round(seconds)), "-r", "250", "-f", "raw"]
    cmd.append("--threads")  # the access-log writer's samples (mostly GIL waits) kept apart
    proc = subprocess.Popen(  # noqa: S603 - py-spy with arguments built here
        [*cmd, "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, out


def finish(started: tuple[subprocess.Popen[bytes], str]) -> dict[str, object]:
    """Wait for the sampler; the main thread's share of samples per part and its top
    functions, and each thread's share of all samples."""
    proc, out = started
    proc.wait(timeout=120)
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in Path(out).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        name = thread.rpartition(": ")[2]
        threads[name] += int(count)
        if name != "MainThread" or not frames:
            continue
        leaf = frames[-1]
        parts[next((part for part, mark in PARTS if mark in leaf), "other")] += int(count)
        leaves[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1]] += int(count)
    Path(out).unlink(missing_ok=True)
    total = sum(parts.values())
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "thread": "MainThread",
        "parts": {k: round(v / total, 3) for k, v in parts.most_common()},
        "top": [(k, round(v / total, 3)) for k, v in leaves.most_common(12)],
        "threads": {k: round(v / sum(threads.values()), 3) for k, v in threads.most_common()},
    }
