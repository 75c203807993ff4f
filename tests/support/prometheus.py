"""A private Prometheus server (Debian's ``prometheus`` package) and ``promtool``, for tests.

The shipped ``config/prometheus`` files are the input: the test configuration keeps their
job and rule files and only points the scrape at the test's gateway, every second.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp import ClientError, ClientSession, ClientTimeout

from tests.support.processes import free_port
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "config" / "prometheus"
JOB = "isales-gateway"
MISSING = "{} is not installed; .ci/run installs it (apt-get install prometheus)"


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; a missing one is an error, never a skip."""
    path = shutil.which(name) or shutil.which(name, path="/usr/bin")
    if path is None:
        raise RuntimeError(MISSING.format(name))
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def shipped_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    return config


def scraping(targets: list[str], interval: str = "1s") -> dict[str, Any]:
    """The shipped configuration scraping ``targets`` every ``interval``, rules by absolute path."""
    config = copy.deepcopy(shipped_config())
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    job["static_configs"] = [{"targets": targets}]
    config["scrape_configs"] = [job]
    return config


class PrometheusServer:
    """``prometheus`` on a free port of 127.0.0.1 with a temporary data directory."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-prometheus-"))
        self.config_file = self.dir / "prometheus.yml"
        self.config_file.write_text(yaml.safe_dump(config))
        self.log = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> PrometheusServer:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary("prometheus"),
                    f"--config.file={self.config_file}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1h",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    async def ready(self, within_s: float = 20.0) -> PrometheusServer:
        """Wait until the server answers ``/-/ready``; an early exit shows its log."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + within_s
        async with ClientSession(timeout=ClientTimeout(total=1)) as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"prometheus exited early:\n{self.output()}")
                try:
                    async with session.get(self.url + "/-/ready") as response:
                        if response.status == 200:
                            return self
                except (OSError, ClientError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"prometheus not ready in {within_s}s:\n{self.output()}")
                await asyncio.sleep(0.1)

    async def api(self, path: str, method: str = "GET", **params: str) -> dict[str, Any]:
        """``/api/v1/<path>``'s JSON, whatever the HTTP status (errors say why in the body)."""
        url = f"{self.url}/api/v1/{path}"
        form, query = (params, None) if method == "POST" else (None, params)
        async with (
            ClientSession(timeout=ClientTimeout(total=10)) as session,
            session.request(method, url, data=form, params=query) as response,
        ):
            body: dict[str, Any] = await response.json()
            return body

    async def query(self, expr: str) -> dict[str, Any]:
        return await self.api("query", method="POST", query=expr)

    async def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None while it has no result."""
        body = await self.query(expr)
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    async def wait_until(self, expr: str, minimum: float, within_s: float = 20.0) -> None:
        """Poll until ``expr`` is at least ``minimum`` (e.g. scrapes seen, requests counted)."""
        last: list[float | None] = [None]

        async def reached() -> bool:
            last[0] = await self.value(expr)
            return last[0] is not None and last[0] >= minimum

        try:
            await until(reached, within=within_s, every=0.2)
        except AssertionError:
            raise AssertionError(
                f"{expr} = {last[0]}, not >= {minimum} after {within_s}s"
            ) from None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
