"""The processes a benchmark run starts: simulator, bare floor, gateway replicas, Redis.

Each is a child of the bench on a free localhost port, optionally pinned to CPUs, and
stopped (SIGTERM, then SIGKILL) by the bench itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.fleet import SIM, replica_environ
from tests.support.processes import RedisServer, free_port, wait_for_port

__all__ = ["Proc", "RedisServer", "bare", "gateway", "proc_memory", "simulator"]

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    """``python -m <module> ...`` in its own process on ``port``; output goes to a temp file."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        port: int,
        env: Mapping[str, str] | None = None,
        cpus: set[int] | None = None,
    ) -> None:
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix="gw-bench-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        full_env.update(env or {})
        self.proc = subprocess.Popen(  # noqa: S603 - our own modules, by the bench
            [sys.executable, "-m", module, *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
        )
        if cpus:
            os.sched_setaffinity(self.proc.pid, cpus)
        try:
            wait_for_port(port, timeout=20, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise RuntimeError(f"{module} {' '.join(args)} did not start") from exc

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def simulator(latency_ms: float = 0.0, cpus: set[int] | None = None) -> Proc:
    port = free_port()
    args = ["--port", str(port), "--ak", SIM.ak, "--sk", SIM.sk, "--latency-ms", str(latency_ms)]
    return Proc("bench.sim", args, port, cpus=cpus)


def bare(bodies_file: str, cpus: set[int] | None = None) -> Proc:
    port = free_port()
    return Proc("bench.bare", ["--port", str(port), "--bodies", bodies_file], port, cpus=cpus)


def gateway(
    upstream: Proc,
    redis_url: str,
    cpus: set[int] | None = None,
    module: str = "gateway",
    **settings: str,
) -> Proc:
    """A replica in Redis mode, caller auth off (no callers file), default logging (INFO)."""
    port = free_port()
    env = replica_environ(port, upstream.url, redis_url, **settings)
    return Proc(module, ["serve"], port, env=env, cpus=cpus)


def proc_memory(pid: int) -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak RSS) of ``pid`` in MiB, from /proc."""
    wanted = {"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib"}
    found: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            found[wanted[name]] = round(int(value.split()[0]) / 1024, 1)
    return found
