"""A real Redis Cluster for tests: redis-server nodes with ``--cluster-enabled yes`` on ports of
their own, joined by ``redis-cli --cluster create`` (primaries only)."""

from __future__ import annotations

import socket
import subprocess
import time

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.support.processes import LIMITER_KEYS, RedisServer, free_port

NODE_TIMEOUT_MS = 5000  # a primary restarted within this is never marked failed


def node_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class ClusterNodeServer(RedisServer):
    """One node; its cluster identity (``nodes.conf``) survives ``restart_empty``, its data not."""

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
        ]  # fmt: skip

    def cluster_ok(self) -> bool:
        client = redis.Redis(port=self.port)
        try:
            info = client.execute_command("CLUSTER", "INFO")
        except redis.exceptions.RedisError:
            return False
        finally:
            client.close()
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text


class RedisClusterServers:
    """``primaries`` nodes holding every slot between them, each with ``replicas`` replicas."""

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        count = primaries * (1 + replicas)
        self.nodes = [ClusterNodeServer(node_port()) for _ in range(count)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        create = ["redis-cli", "--cluster", "create", *addresses]
        subprocess.run(
            [*create, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        self.wait_ok()
        return self

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says the cluster is ok (every slot served)."""
        deadline = time.monotonic() + timeout
        while not all(node.cluster_ok() for node in self.nodes if node.proc is not None):
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not reach cluster_state:ok")
            time.sleep(0.1)

    def client(self) -> RedisCluster:
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", n.port) for n in self.nodes])

    def owner(self, key: str) -> ClusterNodeServer:
        """The node serving ``key``'s slot."""
        client = self.client()
        try:
            node = client.get_node_from_key(key)
        finally:
            client.close()
        return next(n for n in self.nodes if n.port == int(node.port))

    def replica_of(self, primary: ClusterNodeServer, timeout: float = 30.0) -> ClusterNodeServer:
        """A replica of ``primary``, waited for until it has synced (``ROLE``: connected)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.proc is None or node is primary:
                    continue
                plain = redis.Redis(port=node.port)
                try:
                    role = plain.execute_command("ROLE")
                except redis.exceptions.RedisError:
                    continue
                finally:
                    plain.close()
                if role[0] == b"slave" and int(role[2]) == primary.port and role[3] == b"connected":
                    return node
            if time.monotonic() > deadline:
                raise LookupError(f"no synced replica of {primary.port}")
            time.sleep(0.1)

    def wait_primary(self, node: ClusterNodeServer, timeout: float = 30.0) -> None:
        """Until ``node`` is a primary (a replica promoted) and every slot is served."""
        deadline = time.monotonic() + timeout
        while True:
            plain = redis.Redis(port=node.port)
            try:
                if plain.execute_command("ROLE")[0] == b"master":
                    break
            finally:
                plain.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.port} was not promoted")
            time.sleep(0.1)
        self.wait_ok(max(1.0, deadline - time.monotonic()))

    def flush(self) -> None:
        """Empty every node as a planned reset (see ``RedisServer.flush``)."""
        for node in self.nodes:
            plain = redis.Redis(port=node.port)
            if plain.execute_command("ROLE")[0] == b"master":
                plain.flushall()
            plain.close()
        client = self.client()
        client.hset(LIMITER_KEYS.meta, mapping={"epoch": "planned-reset", "gate": 0})
        client.close()

    def keys_per_node(self) -> dict[int, list[bytes]]:
        """Every key, by the port of the node holding it."""
        found = {}
        for node in self.nodes:
            plain = redis.Redis(port=node.port)
            found[node.port] = list(plain.scan_iter(count=1000))
            plain.close()
        return found

    def close(self) -> None:
        for node in self.nodes:
            node.close()
