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
    proc = subprocess.Popen(  # noqa: S603 - py-spy with arguments built here
        [*cmd, "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return proc, out


def finish(started: tuple[subprocess.Popen[bytes], str]) -> dict[str, object]:
    """Wait for the sampler; the share of samples per part, and the top functions."""
    proc, out = started
    proc.wait(timeout=120)
    parts: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    for line in Path(out).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        n = int(count)
        total += n
        parts[next((name for name, mark in PARTS if mark in leaf), "other")] += n
        leaves[leaf.split(" (")[0] + " (" + leaf.rsplit("/", 1)[-1]] += n
    Path(out).unlink(missing_ok=True)
    if not total:
        return {"samples": 0}
    return {
        "samples": total,
        "parts": {k: round(v / total, 3) for k, v in parts.most_common()},
        "top": [(k, round(v / total, 3)) for k, v in leaves.most_common(12)],
    }
