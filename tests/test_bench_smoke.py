"""The benchmark runs end to end in quick mode and reports every section (no timing asserts:
the figures belong to the machine, the README says what they were), and it changes the
committed figures only when asked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.nginx import available as nginx_available

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "bench" / "results.json"


def bench(module: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>`` from the checkout; it must succeed."""
    run = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.timeout(330)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing: apt-get install wrk")
def test_the_quick_benchmark_reports_every_section_and_leaves_the_committed_figures(
    tmp_path: Path,
) -> None:
    committed = COMMITTED.read_bytes()
    readme = (ROOT / "README.md").read_bytes()
    out = tmp_path / "results.json"
    run = bench("bench.run", "--quick", "--json", str(out), timeout=320)
    assert COMMITTED.read_bytes() == committed, "a run without --save rewrote results.json"
    assert (ROOT / "README.md").read_bytes() == readme
    doc = json.loads(out.read_text())
    for section in ("machine", "hit", "miss_storm", "burst", "identical_storm", "memory"):
        assert section in doc, section
    hit = doc["hit"]
    for server in ("bare", "gateway", "gateway_hot"):
        assert hit[server]["rps"] > 0, server
    assert hit["gateway_hits_counted"] >= hit["gateway_requests_measured"] > 0
    assert doc["miss_storm"]["violations"] == 0
    assert doc["miss_storm"]["redis_commands_per_miss"] > 0
    assert doc["identical_storm"]["gateway"]["upstream_calls_max"] == 1
    assert doc["memory"]["redis_large"]["ratio"] < 0.5, "large answers are stored compressed"
    if nginx_available() is not None:
        assert hit["nginx"]["rps"] > 0
        assert doc["miss_storm"]["nginx"]["upstream_requests"] == doc["plan"]["storm"]
        assert doc["identical_storm"]["nginx"]["upstream_calls_max"] == 1
    assert "| measure | this run | goal | met |" in run.stdout
    assert "Machine and noise:" in run.stdout


def test_saving_rewrites_only_the_readme_block_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{report.BEGIN}\nold table\n{report.END}\nafter\n")
    report.write_readme(readme, {"command": "python -m bench.run", "seconds": 12.3}, "| new |")

    text = readme.read_text()
    assert "old table" not in text
    assert text.startswith("# T\n\nbefore\n")
    assert text.endswith(f"| new |\n{report.END}\nafter\n")
    assert "`python -m bench.run`, 12 s:" in text


def test_the_committed_readme_has_the_block_the_bench_writes() -> None:
    text = (ROOT / "README.md").read_text()
    assert text.count(report.BEGIN) == text.count(report.END) == 1


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing: apt-get install wrk")
def test_cpu_per_hit_is_read_for_both_servers_with_a_setting_passed_on() -> None:
    args = ["--rounds", "1", "--seconds", "1", "--env", "GATEWAY_LOG__LEVEL=WARNING"]
    run = bench("bench.cpu", *args, timeout=110)
    doc = json.loads(run.stdout)
    assert doc["settings"] == {"log__level": "WARNING"}
    for server in ("bare", "gateway"):
        [figures] = doc[server]
        assert figures["rps"] > 0, server
        assert figures["user_us"] > 0, server
