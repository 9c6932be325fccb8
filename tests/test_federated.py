"""Real federated runs through Flower's simulation engine (SuperLink + Ray, `flwr run`)."""

import json

import pandas as pd
import pytest
import torch

from fedldt.federation.launch import run_simulation
from fedldt.models import build_model

pytestmark = pytest.mark.slow


def test_synthetic_round_through_flower_is_reproducible(synthetic_dir, tmp_path):
    overrides = ["pilot=los_loop_3", f"dataset.path={synthetic_dir}", "partition.num_territories=2",
                 "train.rounds=1", "model.hidden=8", "seed=3"]
    a = run_simulation(overrides, tmp_path / "a", num_supernodes=2)
    b = run_simulation(overrides, tmp_path / "b", num_supernodes=2)
    assert a["rounds"] == 1 and [t["num_nodes"] for t in a["territories"]] == [6, 6]
    assert a["test"] == b["test"]  # same seed, same numbers, exactly
    assert a["test_per_territory"] == b["test_per_territory"]
    hist = pd.read_csv(tmp_path / "a" / "history.csv")
    assert list(hist["territory"]) == ["t0", "t1"] and hist["val_mae_all"].notna().all()
    c = run_simulation(overrides[:-1] + ["seed=4"], tmp_path / "c", num_supernodes=2)
    assert c["test"]["mae"]["all"] != a["test"]["mae"]["all"]


def test_los_loop_3_two_rounds_end_to_end(los_loop_3_simulation):
    out, proc = los_loop_3_simulation  # shared with tests/test_deploy.py (session fixture)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MAE model" in proc.stdout  # the closing table
    s = json.loads((out / "summary.json").read_text())
    assert s["pilot"] == "los_loop_3" and s["mode"] == "federated" and s["rounds"] == 2 and s["seed"] == 0
    assert [t["id"] for t in s["territories"]] == ["t0", "t1", "t2"]
    assert sum(t["num_nodes"] for t in s["territories"]) == 207
    for block in (s["test"], s["persistence"], *s["test_per_territory"].values()):
        assert set(block) == {"mae", "rmse", "mape"}
        assert all(set(block[m]) == {"h3", "h6", "h12", "all"} for m in block)
    assert s["persistence"]["mae"]["h3"] == pytest.approx(3.58, abs=0.02)  # last-value forecast, same test windows
    for h in ("h3", "h6", "h12"):
        assert s["test"]["mae"][h] < s["persistence"]["mae"][h]
    hist = pd.read_csv(out / "history.csv")
    assert len(hist) == 2 * 3 and set(hist["round"]) == {1, 2}
    assert hist["val_mae_all"].between(1, 10).all()
    ckpt = torch.load(out / "model.pt", weights_only=False)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    assert (out / "resolved_config.yaml").is_file() and (out / "logs" / "server.log").is_file()
    assert s["wall_time_s"] > 0
