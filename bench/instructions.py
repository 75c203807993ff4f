"""CPU instructions per cache hit, counted by valgrind (callgrind): an A/B that the machine's
load does not move.

    python -m bench.instructions [--requests N] [--against REV] [--env NAME=VALUE ...]

On a shared 2-core machine the hit phase's req/s ratio moves with other workloads (0.3x-0.7x
for one code); the number of instructions a replica executes per hit does not (within about
2 % between runs). Each server runs under callgrind in turn, alone: the bare handler
(``bench/bare.py``), the gateway of this tree and, with ``--against``, the gateway of another
git revision (exported to a temporary directory). Counting starts after a warm-up (the
counters are zeroed with ``callgrind_control -z``) and covers ``--requests`` hits on 32
cached queries, 50 at a time, with access log and metrics as configured (default: INFO, text).
A run counts the Redis GETs made meanwhile: it must be 0 (every hit from the in-process tier).
Needs ``valgrind`` (``apt-get install valgrind``); a run takes about two minutes per server.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench import procs
from bench.client import Pool, post_bytes
from bench.phases import path, prime, redis_gets
from tests.support.fleet import replica_environ
from tests.support.processes import RedisServer, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"pageSize":10,"pageNum":1}'
CONNECTIONS = 50


class Counted:
    """A server under callgrind; ``count`` runs hits and returns instructions per hit."""

    def __init__(self, args: Sequence[str], cwd: Path, env: Mapping[str, str], port: int) -> None:
        self.out = Path(tempfile.mkdtemp(prefix="gw-callgrind-"))
        full = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        full.update(env)
        cmd = [
            shutil.which("valgrind") or "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={self.out}/cg.%p",
        ]
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(  # noqa: S603 - valgrind and our own modules
            [*cmd, sys.executable, *args], cwd=cwd, env=full, stdout=self.log, stderr=self.log
        )
        self.port = port
        wait_for_port(port, timeout=300, proc=self.proc)

    async def count(self, raws: list[bytes], n: int) -> float:
        pool = Pool()
        await pool.open(self.port, CONNECTIONS)
        try:
            asks = [raws[i % len(raws)] for i in range(n)]
            for start in range(0, 300, CONNECTIONS):  # warm-up, not counted
                await pool.fire(asks[start : start + CONNECTIONS], within=120)
            self._control("-z")
            for start in range(0, n, CONNECTIONS):
                answers = await pool.fire(asks[start : start + CONNECTIONS], within=120)
                if any(a.status != 200 for a in answers):
                    raise RuntimeError(f"not every answer was 200: {[a.status for a in answers]}")
            self._control("-d")
        finally:
            await pool.close()
        await asyncio.sleep(1)  # the dump is written by the target
        dumps = sorted(self.out.glob(f"cg.{self.proc.pid}.*"), key=os.path.getmtime)
        for line in dumps[-1].read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1]) / n
        raise RuntimeError("callgrind wrote no totals")

    def _control(self, flag: str) -> None:
        control = shutil.which("callgrind_control") or "callgrind_control"
        subprocess.run(  # noqa: S603 - callgrind_control with arguments built here
            [control, flag, str(self.proc.pid)], check=True, capture_output=True
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.out, ignore_errors=True)


def export(revision: str) -> Path:
    """The ``gateway`` package of ``revision``, in a temporary directory."""
    target = Path(tempfile.mkdtemp(prefix="gw-rev-"))
    git = shutil.which("git") or "git"
    archive = subprocess.run(  # noqa: S603 - git with arguments built here
        [git, "archive", revision, "gateway"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


async def measure(n: int, against: str | None, env: Mapping[str, str]) -> dict[str, object]:
    redis = RedisServer().start()
    sim = procs.simulator()
    raws = [post_bytes(path(c), BODY) for c in range(1, 33)]
    trees = {"gateway": ROOT, **({f"gateway@{against}": export(against)} if against else {})}
    result: dict[str, object] = {"requests": n, "settings": dict(env)}
    bodies: dict[str, str] = {}
    content_type = ""
    try:
        for name, tree in trees.items():
            port = free_port()
            settings = replica_environ(port, sim.url, redis.url, cache__ttl_open_s="3600")
            server = Counted(["-m", "gateway", "serve"], tree, {**settings, **env}, port)
            try:
                await prime(port, raws)
                again = await prime(port, raws)
                if any(a.cache != "HIT" for a in again):
                    raise RuntimeError(f"{name}: the primed queries are not hits")
                bodies = {str(c): a.body.decode() for c, a in enumerate(again, start=1)}
                content_type = again[0].content_type
                gets = redis_gets(redis.url)
                result[name] = round(await server.count(raws, n))
                result[f"{name}_redis_gets"] = redis_gets(redis.url) - gets
            finally:
                server.stop()
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"content_type": content_type, "bodies": bodies}, f)
        port = free_port()
        bare = Counted(
            ["-m", "bench.bare", "--port", str(port), "--bodies", f.name], ROOT, {}, port
        )
        try:
            await prime(port, raws[:1])
            result["bare"] = round(await bare.count(raws, n))
        finally:
            bare.stop()
            os.unlink(f.name)
    finally:
        sim.stop()
        redis.stop()
        for tree in trees.values():
            if tree != ROOT:
                shutil.rmtree(tree, ignore_errors=True)
    bare_count = float(result["bare"])  # type: ignore[arg-type]
    for name in trees:
        result[f"{name}_vs_bare"] = round(bare_count / float(result[name]), 3)  # type: ignore[arg-type]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.instructions", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000, help="hits counted per server")
    parser.add_argument("--against", help="also count the gateway of this git revision")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="a gateway setting, e.g. GATEWAY_LOG__LEVEL=WARNING",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.instructions: valgrind is not on PATH (apt-get install valgrind)")
    env = dict(item.split("=", 1) for item in args.env)
    result = asyncio.run(measure(args.requests, args.against, env))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
