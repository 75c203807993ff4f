"""Start-up as an operator meets it: a port in use, a configuration with several mistakes."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from gateway.auth import key_digest, load_callers
from gateway.settings import load_settings
from tests.support.processes import free_port


def run_gateway(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_in_use_is_one_json_log_line_exit_status_1_and_no_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gateway(
            "serve",
            GATEWAY_SERVER__HOST="127.0.0.1",
            GATEWAY_SERVER__PORT=str(port),
            GATEWAY_UPSTREAM__URL="https://vendor.example",
            GATEWAY_UPSTREAM__AK="ak",
            GATEWAY_UPSTREAM__SK="sk",
            GATEWAY_AUTH__ENABLED="false",
            GATEWAY_LOG__FORMAT="json",
        )

    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    errors = [json.loads(line) for line in result.stderr.splitlines() if '"ERROR"' in line]
    assert len(errors) == 1, result.stderr
    (error,) = errors
    assert error["event"] == "startup_failed"
    assert error["port"] == port
    assert "address already in use" in error["msg"]
    for line in result.stderr.splitlines():
        json.loads(line)  # every line JSON, as configured


def test_the_demo_says_clearly_when_its_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_gateway("demo", "--port", str(port), "--sim-port", str(free_port()))

    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr
    assert "--port" in result.stderr


def test_check_config_reports_every_problem_at_once(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nport = 0\nbogus = 1\n\n[limit]\nmax_concurrent = "ten"\n\n'
        '[log]\nlevel = "LOUD"\n'
    )
    result = run_gateway("check-config", "--config", str(config))

    assert result.returncode == 2
    problems = result.stderr.splitlines()
    for key in ("server.port", "server.bogus", "limit.max_concurrent", "log.level", "upstream.url"):
        assert any(key in line for line in problems), (key, result.stderr)
    assert all(line.startswith("isales-gateway: configuration error: ") for line in problems)


ROOT = Path(__file__).resolve().parents[1]


def test_the_readmes_real_run_passes_check_config_with_the_keys_it_names() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quick start") : readme.index("## The request path")]
    (export,) = [line.strip() for line in quick.splitlines() if line.strip().startswith("export ")]
    env = dict(word.split("=", 1) for word in shlex.split(export.removeprefix("export ")))
    (config,) = set(re.findall(r"check-config --config (\S+)", quick))
    caller_key = re.search(r"X-API-Key: ([\w-]+)", quick)
    admin_key = re.search(r"admin key `([\w-]+)`", quick)

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", config],
        env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")} | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    settings = load_settings(ROOT / config, env)
    callers = load_callers(str(ROOT / settings.auth.callers_file))
    assert caller_key is not None
    assert admin_key is not None
    assert callers.authenticate(caller_key[1]).may_read(11)
    assert settings.admin.key_sha256 == key_digest(admin_key[1])
