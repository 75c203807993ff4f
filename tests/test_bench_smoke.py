"""The benchmark runs end to end in quick mode and reports every section (no timing asserts:
the figures belong to the machine, the README says what they were)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk missing: apt-get install wrk")
def test_the_quick_benchmark_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    for section in ("machine", "hit", "miss_storm", "burst", "identical_storm", "memory"):
        assert section in doc, section
    assert doc["hit"]["bare"]["rps"] > 0
    assert doc["hit"]["gateway"]["rps"] > 0
    assert doc["miss_storm"]["violations"] == 0
    assert doc["identical_storm"]["upstream_calls_max"] == 1
    assert "| measure | result | target | met |" in run.stdout
