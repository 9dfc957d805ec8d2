"""Each benchmark runs with tiny sizes (`--smoke`) and writes its results file with the expected keys.

Never asserts on time: the figures of a smoke run mean nothing (docs/performance.md has the real ones)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHES = ["token_latency", "connect_auth", "publish_throughput", "sessions_memory", "revocation"]
KEYS = {"name", "cpu_count", "python", "amqtt", "iotauth", "smoke", "parameters", "figures", "targets", "met"}


@pytest.mark.parametrize("name", BENCHES)
def test_bench_smoke_run_writes_its_results(name: str, tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", "--smoke", "--results-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    doc = json.loads((tmp_path / f"{name}.json").read_text())
    assert doc.keys() >= KEYS
    assert doc["name"] == name and doc["smoke"] is True
    assert doc["cpu_count"] and doc["amqtt"] == "0.12.1"
    assert doc["targets"], "every benchmark states at least one target"
    assert doc["targets"].keys() == doc["met"].keys() and doc["targets"].keys() <= doc["figures"].keys()
    assert name in run.stdout
