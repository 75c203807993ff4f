"""Run ``wrk`` (Debian's package) with a Lua script: POST bodies over a set of paths, and a
``done`` hook that prints requests, errors and latency percentiles as one JSON line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

_MARK = "BENCHJSON "
_SCRIPT = """
local paths = {%(paths)s}
local bodies = {%(bodies)s}
local reqs = {}
local n = 0
function init(args)
  for i = 1, #paths do
    reqs[i] = wrk.format("POST", paths[i], {
      ["Content-Type"] = "application/json; charset=UTF-8",
      ["Host"] = "127.0.0.1",
    }, bodies[i])
  end
end
function request()
  n = n %% #reqs + 1
  return reqs[n]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"non2xx":%%d,"socket_errors":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d,"mean_us":%%.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


def require() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("bench: wrk is not on PATH; install it: apt-get install -y wrk")
    return path


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here (ASCII)


def script(requests: Sequence[tuple[str, bytes]]) -> str:
    """A Lua script file cycling through ``requests`` (path, body); the caller deletes it."""
    text = _SCRIPT % {
        "paths": ", ".join(_lua_string(p) for p, _ in requests),
        "bodies": ", ".join(_lua_string(b.decode("ascii")) for _, b in requests),
        "mark": _MARK,
    }
    fd, name = tempfile.mkstemp(prefix="gw-bench-", suffix=".lua")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return name


def run(
    url: str,
    lua: str,
    *,
    seconds: float,
    connections: int,
    threads: int = 1,
    cpus: set[int] | None = None,
) -> dict[str, float]:
    """One wrk run; returns its JSON line with ``rps`` added. Raises if wrk fails."""
    cmd = [
        require(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "5s",
        "-s",
        lua,
        url,
    ]
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, sorted(cpus))), *cmd]
    out = subprocess.run(  # noqa: S603 - wrk with arguments built here
        cmd, capture_output=True, text=True, timeout=seconds + 30, check=True
    )
    for line in out.stdout.splitlines():
        if line.startswith(_MARK):
            result: dict[str, float] = json.loads(line[len(_MARK) :])
            result["rps"] = round(result["requests"] / (result["duration_us"] / 1e6), 1)
            return result
    raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def remove(lua: str) -> None:
    Path(lua).unlink(missing_ok=True)
