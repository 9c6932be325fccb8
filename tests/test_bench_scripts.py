"""The benchmark scripts run end to end (not timed tests: only that they produce complete, valid
results). ``scripts/bench_models.py --tiny``: a few training steps on a small Los-loop subgraph."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

from fedldt.config import checkout_root

SCRIPT = checkout_root() / "scripts" / "bench_models.py"
MODELS = ("dcrnn", "stgcn", "gwnet")
#: reference (implementation, model) pairs the libraries lack: always "not available"
ABSENT = {("tsl", "stgcn"), ("tsl-sparse", "stgcn"), ("pgt", "gwnet")}
LIBRARY = {"tsl": "tsl", "tsl-sparse": "tsl", "pgt": "torch_geometric_temporal"}


def _no_nan(token: str):
    raise ValueError(f"models.json holds {token}: not valid JSON")


def test_bench_models_tiny(tmp_path, data_root):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--threads", "1", "--mem-jobs", "3",
                           "--out-dir", str(tmp_path), f"paths.data_root={data_root}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "models.json").read_text(), parse_constant=_no_nan)
    machine = result["machine"]
    assert machine["threads"] == 1 and machine["torch"] and machine["cores"] >= 1 and "cpu" in machine
    assert result["command"].startswith("python scripts/bench_models.py --tiny")
    assert "VmHWM" in result["memory_method"]
    rows = {(r["model"], r["implementation"], r["batch"]): r for r in result["rows"]}
    assert len(rows) == len(result["rows"]) == len(MODELS) * 4  # one batch size in --tiny
    for model in MODELS:
        row = rows[(model, "fedldt", 8)]
        assert row["status"] == "ok" and row["windows_per_s"] > 0 and row["steps"] == 2 and row["warmup"] == 1
        assert math.isfinite(row["val_mae"]) and row["val_mae"] > 0
        assert row["output_shape"] == [8, 12, result["data"]["num_nodes"], 1]
        assert row["peak_mem_mb"] > 0 and row["peak_mem_over_baseline_mb"] > 0, row.get("mem_error")
        for impl in ("tsl", "tsl-sparse", "pgt"):  # every reference row is there, measured or saying why not
            ref = rows[(model, impl, 8)]
            if (impl, model) in ABSENT:
                assert ref["status"].startswith("not available: ")
            elif importlib.util.find_spec(LIBRARY[impl]) is None:
                assert ref["status"].startswith(f"not installed: No module named '{LIBRARY[impl]}'")
            if ref["status"] == "ok":
                assert ref["windows_per_s"] > 0 and math.isfinite(ref["val_mae"]) and ref["fedldt_over_ref"] > 0
            else:
                assert ref["windows_per_s"] is None and ref["val_mae"] is None and ref["peak_mem_mb"] is None
    table = (tmp_path / "models.md").read_text()
    assert f"Command: `{result['command']}`" in table and table in proc.stdout
    assert "| gwnet | pgt | 8 | – |" in table and "not available: torch_geometric_temporal has no Graph WaveNet" in table
