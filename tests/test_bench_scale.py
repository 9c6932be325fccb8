"""scripts/bench_scale.py on a tiny setting (a 60-sensor synthetic network, 3 territories): it
runs as a real subprocess, every case completes with its time, memory and bytes measured, and the
report is valid JSON (benchmarks are scripts, not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_scale_tiny(tmp_path):
    out = tmp_path / "scale"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_scale.py"), "--tiny", "--territories", "3", "--timeout-s", "300",
                           "--out-dir", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "scale.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    net = report["networks"]["synthetic"]
    assert net["nodes"] == 60 and net["steps"] == 576 and net["mean_out_degree"] >= 3
    assert [(c["network"], c["territories"]) for c in report["cases"]] == [("synthetic", 3)]  # one case: CI time
    for c in report["cases"]:
        assert c["status"] == "completed" and c["within_limit"], c["reason"]
        assert c["wall_s"] > c["round_s"] > 0 and c["setup_s"] > 0 and c["final_s"] > 0
        assert len(c["rounds"]) == 1 and c["rounds"][0]["train_s"] > 0
        # a run is a SuperLink, Ray's daemons, the ServerApp and the territories' actors: several processes
        assert c["peak_rss_mb"] > 100 and c["max_processes"] >= 3
        assert c["bytes_per_round"] > 0 and all(v > 0 for v in c["bytes_per_territory"].values())
        npt = c["nodes_per_territory"]
        assert npt["mean"] * c["territories"] == pytest.approx(60) and npt["min"] >= 1
    md = (out / "scale.md").read_text()
    assert "scripts/bench_scale.py --tiny" in md and "| synthetic | 3 |" in md
