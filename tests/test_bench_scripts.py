"""The benchmark scripts run end to end (not timed tests: only that they produce complete, valid
results). ``scripts/bench_models.py --tiny``: a few training steps on a small Los-loop subgraph."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

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
            else:  # installed and the library has the architecture: it must run
                assert ref["status"] == "ok", ref["status"]
            if ref["status"] == "ok":
                assert ref["windows_per_s"] > 0 and math.isfinite(ref["val_mae"]) and ref["fedldt_over_ref"] > 0
            else:
                assert ref["windows_per_s"] is None and ref["val_mae"] is None and ref["peak_mem_mb"] is None
    table = (tmp_path / "models.md").read_text()
    assert f"Command: `{result['command']}`" in table and table in proc.stdout
    assert "| gwnet | pgt | 8 | – |" in table and "not available: torch_geometric_temporal has no Graph WaveNet" in table


SMALL = {"dcrnn": {"hidden": 8, "K": 2, "num_layers": 2, "dropout": 0.0},
         "gwnet": {"residual_channels": 8, "dilation_channels": 8, "skip_channels": 8, "end_channels": 16, "blocks": 2,
                   "layers": 2, "kernel_size": 2, "order": 2, "adaptive": True, "emb_dim": 4, "dropout": 0.0}}


@pytest.mark.skipif(importlib.util.find_spec("tsl") is None, reason="torch-spatiotemporal is not installed (bench extra)")
@pytest.mark.parametrize("model", ["dcrnn", "gwnet"])
def test_tsl_sparse_reference_computes_what_tsl_computes_on_edge_index(model):
    """The tsl-sparse rows time the same tsl model as the tsl rows, only fed a SparseTensor: same
    output on a directed, weighted graph (a transposed adjacency would change it)."""
    spec = importlib.util.spec_from_file_location("bench_models", SCRIPT)
    bm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bm)
    n = 6
    cfg = {"name": model, "in_channels": 2, "out_channels": 1, "horizon": 3, **SMALL[model]}
    ref, _ = bm.ADAPTERS[("tsl", model)](cfg, n)
    sparse, notes = bm.ADAPTERS[("tsl-sparse", model)](cfg, n)
    sparse.model.load_state_dict(ref.state_dict())
    ref.eval(), sparse.eval()
    gen = torch.Generator().manual_seed(0)
    ei = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 2], [1, 2, 3, 4, 5, 0, 3, 5]])  # directed, no reverse edges
    ew = torch.rand(ei.shape[1], generator=gen) + 0.5
    x = torch.randn(2, 13, n, 2, generator=gen)
    with torch.no_grad():
        out = ref(x, ei, ew)
        torch.testing.assert_close(sparse(x, ei, ew), out, rtol=1e-5, atol=1e-5)
        assert out.shape == (2, 3, n, 1)
        assert not torch.allclose(ref(x, ei.flip(0), ew), out, atol=1e-4)  # the direction matters on this graph
    assert "SparseTensor" in notes


def test_bench_models_profile_tiny(tmp_path, data_root):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--profile", "--threads", "1", "--models", "gwnet",
                           "--implementations", "fedldt", "--out-dir", str(tmp_path), f"paths.data_root={data_root}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "profile.md").read_text()
    assert not (tmp_path / "models.json").exists()  # --profile replaces the timing table
    assert "Command: `python scripts/bench_models.py --tiny --profile" in text and "## gwnet" in text
    head = next(line for line in text.splitlines() if line.startswith("### fedldt: "))
    share = float(head.split("matrix products ")[1].split("(")[1].split(" %")[0])
    assert 0 < share < 100  # some of the step is matrix products, not all of it
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(rows) == 12 and any("aten::mm" in r or "aten::addmm" in r for r in rows)
    ms = [float(r.split("|")[2]) for r in rows]
    assert ms == sorted(ms, reverse=True) and ms[0] > 0  # most self time first
