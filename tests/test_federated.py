"""Real federated runs through Flower's simulation engine (SuperLink + Ray, `flwr run`)."""

import json
import time

import pandas as pd
import pytest
import torch

from clients.audit import egress_log_path
from fedldt.launch.simulation import run_simulation
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
    # That another seed gives other numbers is shown without Flower (tests/test_engine.py).


def test_los_loop_3_two_rounds_end_to_end(los_loop_run):
    # The session's shared run (tests/conftest.py): scripts/simulate.py pilot=los_loop_3 train.rounds=2.
    out, proc = los_loop_run.path, los_loop_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MAE model" in proc.stdout  # the closing table
    s = json.loads((out / "summary.json").read_text())
    assert s["pilot"] == "los_loop_3" and s["mode"] == "federated" and s["rounds"] == 2 and s["seed"] == 0
    assert [t["id"] for t in s["territories"]] == ["t0", "t1", "t2"]
    assert sum(t["num_nodes"] for t in s["territories"]) == 207
    for block in (s["test"], s["persistence"], *s["test_per_territory"].values()):
        assert set(block) == {"mae", "rmse", "mape", "wape"}
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


def test_personalized_graph_wavenet_through_flower_keeps_local_entries_home(synthetic_dir, tmp_path):
    """gwnet with per-territory node embeddings and a FedPer head, FedAdam, 2 rounds in Flower's
    simulation engine: what each territory sent (its egress log) never holds a local entry."""
    start = time.time()
    overrides = ["pilot=los_loop_3", f"dataset.path={synthetic_dir}", "partition.num_territories=2", "train.rounds=2",
                 "model=gwnet", "model.residual_channels=8", "model.dilation_channels=8", "model.skip_channels=16",
                 "model.end_channels=16", "model.blocks=2", "strategy=fedadam", "personalization=fedper"]
    s = run_simulation(overrides, tmp_path / "run", num_supernodes=2)
    assert s["strategy"]["name"] == "fedadam" and s["personalization"] == "fedper" and not s["failures"]
    assert s["test"]["mae"]["all"] < s["persistence"]["mae"]["all"] * 2  # finite, sane
    ckpt = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert ckpt["personalization"] == "fedper"
    assert {"node_emb1", "node_emb2", "end1.weight", "end2.bias", "norms.0.num_batches_tracked"} <= set(ckpt["local_keys"])
    assert not set(ckpt["local_keys"]) & set(ckpt["state_dict"])
    for i in range(2):
        lines = [json.loads(x) for x in egress_log_path({"partition-id": i}).read_text().splitlines()]
        sent = [e for e in lines if e["time"] >= start and e["message_type"] == "train"]
        assert len(sent) == 2  # one reply per round
        for e in sent:
            keys = {k for r in e["records"] if r["kind"] == "array" for k in r["arrays"]}
            assert keys == set(ckpt["state_dict"])  # the shared part, nothing else
