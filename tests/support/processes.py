"""Real servers the tests start on ports of their own: redis-server, gateway and simulator."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Self

import redis

from gateway.limiter.redis_scripts import LimiterKeys

LIMITER_KEYS = LimiterKeys.for_namespace("isales:v1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float = 10.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {port} after {timeout}s")


class RedisServer:
    """A private redis-server (never one someone else started), stoppable and restartable.

    It never persists anything: a restart comes back empty. ``maxmemory`` and ``policy``
    (``maxmemory-policy``) are Redis's own option values.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        maxmemory: str = "256mb",
        policy: str = "volatile-lru",
    ) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not on PATH; .ci/run installs it")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.policy = policy
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        """The redis-server command line: a kind of server extends it."""
        return [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", self.policy,
        ]  # fmt: skip

    def start(self) -> Self:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, proc=self.proc)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 5
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.BusyLoadingError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)  # a frozen server must see its signal too
            self.proc.wait(timeout=10)
        self.proc = None

    def flush(self) -> None:
        """Empty it as a planned reset with no gateway running: the limiter's state is known
        to be empty, so its epoch starts open (after a real loss it waits out old leases).
        """
        client = redis.Redis(port=self.port)
        client.flushall()
        client.hset(LIMITER_KEYS.meta, mapping={"epoch": "planned-reset", "gate": 0})
        client.close()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart_empty(self) -> None:
        """Killed and started again on the same port, with no data (nothing is persisted)."""
        self.stop(signal.SIGKILL)
        self.start()

    def freeze(self) -> None:
        """SIGSTOP: connections stay open, nothing is answered until ``thaw``."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self) -> redis.Redis:
        """A plain client of this server, for a test's own commands; close it after use."""
        return redis.Redis(port=self.port)


class Process:
    """A command of ours (``python -m gateway ...``) in its own process, killable.

    Every process started is tracked until stopped: ``stop_all`` (run after each test by
    conftest) ends any a test left behind, e.g. when it failed between two starts.
    """

    running: ClassVar[set[Process]] = set()

    def __init__(
        self,
        args: Sequence[str],
        port: int,
        env: Mapping[str, str] | None = None,
        *,
        niceness: int = 0,
    ) -> None:
        """``niceness``: run under ``nice -n`` (a negative one needs the privilege; without
        it ``nice`` says so on the log and runs the command as it is)."""
        self.port = port
        self.log = tempfile.NamedTemporaryFile(prefix="gw-proc-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        full_env.update(env or {})
        nice = ["nice", "-n", str(niceness)] if niceness else []  # exec's: the pid is ours
        self.proc = subprocess.Popen(
            [*nice, sys.executable, "-m", "gateway", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )
        self.stopped = False
        Process.running.add(self)
        try:
            wait_for_port(port, timeout=20, proc=self.proc)
        except (RuntimeError, TimeoutError) as exc:
            output = self.output()[-2000:]
            self.stop()
            raise RuntimeError(f"{' '.join(args)} did not start: {output}") from exc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 20 s; the exit code. Safe to call twice."""
        if self.stopped:
            return self.proc.wait()
        self.signal(signal.SIGTERM)
        self.signal(signal.SIGCONT)  # a frozen (SIGSTOP) process must see its SIGTERM too
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.stopped = True
            Process.running.discard(self)
            self.log.close()
            os.unlink(self.log.name)

    @classmethod
    def stop_all(cls) -> None:
        for process in list(cls.running):
            process.stop()
