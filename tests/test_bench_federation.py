"""scripts/bench_federation.py on a tiny setting: it runs, both sides did the same work, and the
report is valid JSON with every phase measured (benchmarks are scripts, not timed tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_federation_tiny(synthetic_dir, tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_federation.py"), "--rounds", "2", "--out-dir", str(out),
         "pilot=los_loop_3", f"dataset.path={synthetic_dir}", "partition.num_territories=2", "model.hidden=8",
         "task.train_stride=8"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "federation.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity
    fed, plain = report["federated"], report["plain"]
    assert [r["round"] for r in fed["timing"]["rounds"]] == [r["round"] for r in plain["rounds"]] == [1, 2]
    for r in fed["timing"]["rounds"]:
        assert r["train_s"] > 0 and r["evaluate_s"] > 0 and r["checkpoint_s"] >= 0
        assert r["bytes_train_up"] > 0 and r["bytes_evaluate_up"] > 0
        # both downloads carry the global model and the config: nearly the same size
        assert abs(r["bytes_evaluate_down"] - r["bytes_train_down"]) < 0.05 * r["bytes_train_down"]
    # the same FedAvg inside and outside Flower: the same validation MAE each round
    for f, p in zip(fed["timing"]["rounds"], plain["rounds"]):
        assert f["val_mae"] == pytest.approx(p["val_mae"], rel=1e-4)
    assert fed["wall_s"] > fed["timing"]["rounds_s"] > 0 and fed["outside_server_s"] > 0
    assert len(report["overhead"]["per_round"]) == 2 and report["overhead"]["whole_run_ratio"] > 0
    assert "Mean round overhead" in (out / "federation.md").read_text()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU machine the script really runs (minutes)")
def test_bench_gpu_says_so_without_a_gpu():
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "bench_gpu.sh")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert proc.returncode == 3 and "no CUDA device visible to torch" in proc.stderr
    assert "cuda False" in proc.stdout
