"""A Sentinel-managed Redis of the test's own: one primary, one replica, sentinels, all on free
ports, started and stopped here, nothing left behind.

Sentinels run as ``redis-server <conf> --sentinel`` (``redis-sentinel`` is not always on PATH)
from a conf written to a temp dir of their own (sentinels rewrite it). The timers are short, so
a ``SENTINEL FAILOVER`` completes within a couple of seconds; the old primary is turned into a
replica of the new one by the sentinels some seconds later (Sentinel waits before it
reconfigures an instance that still says it is a primary).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.processes import RedisServer, free_port, wait_for_port

MASTER = "mymaster"


def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        time.sleep(0.05)


def _replication(port: int) -> dict[str, object]:
    with redis.Redis(port=port, socket_timeout=2) as client:
        info: dict[str, object] = client.info("replication")
        return info


class SentinelServer:
    """One sentinel process watching ``MASTER`` (quorum ``quorum``)."""

    def __init__(self, primary_port: int, quorum: int) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gw-sentinel-")
        self.conf = Path(self.dir) / "sentinel.conf"
        self.conf.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} {quorum}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 4000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            ["redis-server", str(self.conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def master_port(self) -> int:
        with self.client() as client:
            host_port = client.sentinel_get_master_addr_by_name(MASTER)
            return int(host_port[1])

    def knows_a_replica(self) -> bool:
        with self.client() as client:
            replicas = client.sentinel_slaves(MASTER)
            # Sentinel promotes only a replica it has had INFO from recently, with its link up.
            return any(
                not r["is_sdown"]
                and not r["is_odown"]
                and r.get("master-link-status") == "ok"
                and int(r.get("info-refresh", 10**9)) < 5000
                for r in replicas
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


class SentinelSetup:
    """A primary, a replica of it and ``sentinels`` sentinels; ``url`` is the gateway's
    ``redis+sentinel://`` URL for them. Use as a context manager or call ``close``.
    """

    def __init__(self, sentinels: int = 1) -> None:
        self.servers = [RedisServer().start(), RedisServer().start()]
        self.sentinels: list[SentinelServer] = []
        try:
            primary, replica = self.servers
            with replica.client() as client:
                client.replicaof("127.0.0.1", primary.port)
            _until(lambda: self.link_up(replica.port), "the replica never synced")
            quorum = sentinels // 2 + 1
            self.sentinels = [SentinelServer(primary.port, quorum) for _ in range(sentinels)]
            for sentinel in self.sentinels:
                _until(sentinel.knows_a_replica, "a sentinel never saw the replica")
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}"

    @staticmethod
    def link_up(port: int) -> bool:
        return _replication(port).get("master_link_status") == "up"

    def primary(self) -> RedisServer:
        """The server the sentinels name as primary now."""
        port = self.sentinels[0].master_port()
        return next(s for s in self.servers if s.port == port)

    def replica(self) -> RedisServer:
        primary = self.primary()
        return next(s for s in self.servers if s is not primary)

    def failover(self) -> RedisServer:
        """``SENTINEL FAILOVER``; returns once every sentinel names the new primary, which
        already takes writes (the old one still does until the sentinels demote it)."""
        old = self.primary()
        with self.sentinels[0].client() as client:
            client.sentinel_failover(MASTER)
        new = next(s for s in self.servers if s is not old)
        _until(
            lambda: all(s.master_port() == new.port for s in self.sentinels),
            "the sentinels never named the new primary",
        )
        _until(lambda: _replication(new.port)["role"] == "master", "no promotion")
        return new

    def crash_primary(self) -> RedisServer:
        """SIGKILL the primary; returns once every sentinel names its replica (promoted after
        ``down-after-milliseconds``, no coordination with the dead one)."""
        old = self.primary()
        old.stop(signal.SIGKILL)
        new = next(s for s in self.servers if s is not old)
        _until(
            lambda: all(s.master_port() == new.port for s in self.sentinels),
            "the sentinels never named the replica",
        )
        _until(lambda: _replication(new.port)["role"] == "master", "no promotion")
        return new

    def settled(self) -> bool:
        """Both servers agree on one primary, and its replica is in sync."""
        primary, replica = self.primary(), self.replica()
        return _replication(primary.port)["role"] == "master" and self.link_up(replica.port)

    def wait_settled(self, timeout: float = 30.0) -> None:
        _until(self.settled, "the old primary never became a synced replica", timeout)

    def close(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.close()

    def __enter__(self) -> SentinelSetup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
