"""Issue 14 personalization: fine-tuning keeps the better model, Ditto's personal update, the
personal model never leaves a territory, the held-out territory never trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from tests.conftest import write_los_loop_like
from fedldt.config import compose_config, resolve_config
from fedldt.data import TerritoryDataset
from fedldt.egress import FINETUNE_MESSAGE, Code, EgressRefused, Reply, Request, check_reply, message_category
from fedldt.engine import TerritoryTask, build_optimizer, train_epochs
from fedldt.metrics import mae
from fedldt.models import build_model
from fedldt.personal import KEPT, PERSONAL_PREFIX, finetune
from fedldt.results import REFERENCES
from fedldt.schema import ConfigError


def _sine_task(t: int = 400, n: int = 4) -> TerritoryTask:
    rng = np.random.default_rng(0)
    base = np.sin(np.arange(t) * 2 * np.pi / 24)[:, None] * 5 + 20 + rng.normal(0, 0.2, size=(t, n))
    src = torch.arange(n)
    ds = TerritoryDataset(
        name="sine", values=base[:, :, None].astype(np.float32), mask=np.ones((t, n, 1), dtype=np.float32),
        timestamps=pd.date_range("2021-01-01", periods=t, freq="h"), node_ids=[str(i) for i in range(n)],
        edge_index=torch.stack([src, (src + 1) % n]), edge_weight=torch.ones(n),
    )
    return TerritoryTask(ds, window=12, horizon=3, batch_size=64)


def _model(task: TerritoryTask) -> nn.Module:
    torch.manual_seed(0)
    return build_model(dict(name="dcrnn", hidden=8, num_layers=1, K=1, **task.model_dims()))


# ------------------------------------------------------------------ finetune keeps the better model
def test_finetune_keeps_the_finetuned_model_when_it_validates_better():
    task = _sine_task()
    model = _model(task)
    before = mae(task.evaluate(model, "val"))
    state, info = finetune(task, model, epochs=2, lr=0.01, patience=2, seed=0)
    assert info["kept"] == "finetuned"
    assert info["val_mae_global"] == pytest.approx(before)
    assert info["val_mae_finetuned"] < 0.5 * before
    assert info["epochs_run"] == 2
    check = _model(task)
    check.load_state_dict(state)  # the returned state is the model whose validation MAE is reported
    assert mae(task.evaluate(check, "val")) == pytest.approx(info["val_mae_finetuned"], rel=1e-9)


def test_finetune_keeps_the_global_model_when_finetuning_diverges():
    task = _sine_task()
    model = _model(task)
    task.fit(model, epochs=3, lr=0.01, seed=0)  # a good global model
    start = {k: v.clone() for k, v in model.state_dict().items()}
    good = mae(task.evaluate(model, "val"))
    # SGD at lr 10 without clipping throws the weights far away: every epoch validates worse
    state, info = finetune(task, model, epochs=5, lr=10.0, patience=2, seed=0, optimizer="torch.optim.SGD",
                           grad_clip=None)
    assert info["kept"] == "global"
    assert info["val_mae_global"] == pytest.approx(good)
    assert info["val_mae_finetuned"] is None or info["val_mae_finetuned"] > good
    assert all(torch.equal(state[k], start[k]) for k in start)  # exactly the global weights
    assert all(torch.equal(model.state_dict()[k], start[k]) for k in start)


def test_finetune_tie_and_no_epochs_keep_the_global_model():
    task = _sine_task()
    state, info = finetune(task, _model(task), epochs=0, lr=0.01, patience=1, seed=0)
    assert info == {"kept": "global", "val_mae_global": pytest.approx(mae(task.evaluate(_model(task), "val"))),
                    "val_mae_finetuned": None, "epochs_run": 0}
    with pytest.raises(ValueError, match="patience"):
        finetune(task, _model(task), epochs=1, lr=0.01, patience=0, seed=0)


# ------------------------------------------------------------------ Ditto's personal update
class _Scalar(nn.Module):
    """Forecasts one learned scalar v everywhere (scaled units)."""

    def __init__(self, v0: float) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.tensor(float(v0)))

    def forward(self, x, edge_index, edge_weight):
        return self.v * torch.ones(x.shape[0], 3, x.shape[2], 1)


def test_ditto_personal_update_matches_a_hand_computation():
    """One SGD step on F(v) + lam/2 (v - w)^2 with v0 above every scaled target: dF/dv = mean
    sign(v0 - y) = 1 exactly, so v1 = v0 - lr * (1 + lam * (v0 - w)), w = the global model
    received (not v's start value, which would give v0 - lr)."""
    task = _sine_task(t=200)
    task.batch_size = task.num_windows("train")  # one batch: one step per epoch
    v0, w, lam, lr = 10.0, 2.0, 0.5, 0.1
    model = _Scalar(v0)
    opt = build_optimizer(model.parameters(), "torch.optim.SGD", lr=lr)
    train_epochs(model, opt, [(task, 0)], 1, seed=0, grad_clip=None, proximal_mu=lam,
                 proximal_reference={"v": torch.tensor(w)})
    assert float(model.v.detach()) == pytest.approx(v0 - lr * (1.0 + lam * (v0 - w)), abs=1e-6)  # 9.5
    fedprox = _Scalar(v0)  # without a reference the term pulls to v's start: zero gradient
    train_epochs(fedprox, build_optimizer(fedprox.parameters(), "torch.optim.SGD", lr=lr), [(task, 0)], 1, seed=0,
                 grad_clip=None, proximal_mu=lam)
    assert float(fedprox.v.detach()) == pytest.approx(v0 - lr, abs=1e-6)
    with pytest.raises(ValueError, match="proximal_reference"):
        train_epochs(_Scalar(v0), opt, [(task, 0)], 1, seed=0, proximal_mu=lam, proximal_reference={})


# ------------------------------------------------------------------ egress of the finetune reply
def _finetune_reply(**metrics) -> Reply:
    return Reply({"metrics": "metric"}, values={"metrics": metrics})


def test_finetune_reply_carries_metrics_only():
    req = Request(message_category(FINETUNE_MESSAGE), None, '{"task": {"horizon": 3}}')
    assert req.category == FINETUNE_MESSAGE and message_category("train") == "train"
    check_reply(req, _finetune_reply(territory=0, kept=1, val_mae_global=2.5, val_mae_finetuned=2.0, epochs_run=3))
    check_reply(req, _finetune_reply(territory=0, kept=0, epochs_run=0))  # no finite MAE: keys absent
    with pytest.raises(EgressRefused) as e:  # a model in the reply: refused
        check_reply(req, Reply({"metrics": "metric", "arrays": "array"}, arrays={"arrays": {}},
                               values={"metrics": {"territory": 0, "kept": 1, "epochs_run": 3}}))
    assert e.value.code == Code.RECORDS
    with pytest.raises(EgressRefused) as e:
        check_reply(req, _finetune_reply(territory=0, kept=1, epochs_run=3, val_mae_personal=1.0))
    assert e.value.code == Code.METRIC_KEY
    with pytest.raises(EgressRefused) as e:
        check_reply(req, _finetune_reply(territory=0, kept=1, epochs_run=3, val_mae_global=float("nan")))
    assert e.value.code == Code.METRIC_VALUE


# ------------------------------------------------------------------ config refusals
def _cfg(*overrides: str) -> dict:
    return resolve_config(compose_config(["pilot=los_loop_3", *overrides]), require_data=False)


@pytest.mark.parametrize("overrides, match", [
    (("personalization=finetune", "privacy=sample"), "without differential privacy"),
    (("personalization=ditto", "privacy=territory"), "without differential privacy"),
    (("personalization=fedper", "federation.holdout=t2"), "untrained random"),
    (("federation.holdout_finetune=3D",), "needs federation.holdout"),
    (("federation.holdout=t2", "federation.holdout_finetune=soon"), "federation.holdout_finetune=.soon. is not a duration"),
    (("personalization=finetune", "personalization.patience=0"), "patience"),
])
def test_nonsense_combinations_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(*overrides)


def test_personalization_configs_load():
    assert _cfg("personalization=finetune")["personalization"] == {"name": "finetune", "epochs": 20, "lr": 0.001,
                                                                    "patience": 3}
    assert _cfg("personalization=ditto")["personalization"] == {"name": "ditto", "lam": 0.1, "epochs": 1, "lr": None}


# ------------------------------------------------------------------ in-process federations
def _run(tmp_path, *overrides: str):
    from clients.client_app import app
    from tests.inprocess import InProcessGrid
    from server.rounds import run_federated

    folder = write_los_loop_like(tmp_path / "syn", num_steps=600)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", "partition.num_territories=3",
                                         "train.rounds=2", "task.train_stride=4", *overrides]))
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "out-dir": str(tmp_path / f"out-{i}")} for i in range(3)})
    return run_federated(grid, cfg, tmp_path / "run"), grid


def _shared_keys(grid) -> set[str]:
    return {k for m in grid.sent if str(m.metadata.message_type) == "train" for k in m.content["arrays"].keys()}


def test_finetune_with_holdout_in_process(tmp_path):
    from fedldt.checkpoint import load_personal_model

    summary, grid = _run(tmp_path, "model.hidden=8", "personalization=finetune", "personalization.epochs=3",
                         "federation.holdout=t2", "federation.holdout_finetune=1D")
    held = 12  # SuperNode of t2
    types = [(str(m.metadata.message_type), int(m.metadata.dst_node_id)) for m in grid.sent]
    assert ("train", held) not in types  # the held-out territory never trains
    assert types.count(("evaluate", held)) == 2  # no per-round validation: zero-shot and fine-tuned test only
    assert types.count((FINETUNE_MESSAGE, held)) == 1
    assert [t["id"] for t in summary["territories"]] == ["t0", "t1"]
    assert set(summary["test_per_territory"]) == set(summary["global_test_per_territory"]) == {"t0", "t1"}
    assert set(pd.read_csv(tmp_path / "run" / "history.csv")["territory"]) == {"t0", "t1"}  # no validation of t2
    result = summary["personalization_result"]
    for tid, r in result.items():
        assert set(r) == {"kept", "val_mae_global", "val_mae_finetuned", "epochs_run"}
        assert r["kept"] in KEPT and 1 <= r["epochs_run"] <= 3
        better = r["val_mae_finetuned"] is not None and r["val_mae_finetuned"] < r["val_mae_global"]
        assert r["kept"] == ("finetuned" if better else "global")
    hold = summary["holdout"]
    assert set(hold) == {"territory", "zero_shot", "finetuned", "finetune_history", "references"}
    assert hold["territory"] == "t2" and hold["finetune_history"] == "1D"
    assert math.isfinite(hold["zero_shot"]["mae"]["all"]) and math.isfinite(hold["finetuned"]["mae"]["all"])
    assert set(hold["references"]) == set(REFERENCES)
    # replies: fine-tuning replies carry no arrays; train replies exactly the shared keys
    shared = _shared_keys(grid)
    for req, rep in zip(grid.sent, grid.replies):
        assert not rep.has_error()
        kind = str(req.metadata.message_type)
        arrays = {k for rec in rep.content.array_records.values() for k in rec.keys()}
        assert arrays == (shared if kind == "train" else set())
    run_key = next(p.name for p in (tmp_path / "out-0" / "checkpoints").iterdir())
    meta, state = load_personal_model(tmp_path / "out-0", run_key)
    assert meta["kept"] == result["t0"]["kept"] and set(state) >= shared
    assert (tmp_path / "out-0" / "checkpoints" / run_key / "personal.pt").stat().st_mode & 0o777 == 0o600
    # export takes the personal model from the territory's own folder, never from the server
    from fedldt.delivery.export import ExportError, export_package

    with pytest.raises(ExportError, match="--territory-dir"):
        export_package(tmp_path / "run", "t0", tmp_path / "pkg", onnx=False)
    with pytest.raises(ExportError, match="personal model"):
        export_package(tmp_path / "run", "t0", tmp_path / "pkg", onnx=False, territory_dir=tmp_path / "out-2" / "x")
    pkg = export_package(tmp_path / "run", "t0", tmp_path / "pkg", onnx=False, territory_dir=tmp_path / "out-0")
    assert pkg.territory == "t0"


def test_ditto_in_process_keeps_the_personal_model_home(tmp_path):
    summary, grid = _run(tmp_path, "model.hidden=8", "personalization=ditto")
    shared = _shared_keys(grid)
    for rep in grid.replies:  # never a personal entry in any reply
        for rec in rep.content.array_records.values():
            assert set(rec.keys()) == shared and not any(k.startswith(PERSONAL_PREFIX) for k in rec.keys())
    assert set(summary["personalization_result"]) == {"t0", "t1", "t2"}
    for tid, r in summary["personalization_result"].items():
        assert set(r) == {"val_mae_global", "val_mae_personal"}
        assert r["val_mae_personal"] != r["val_mae_global"]
    assert summary["test"]["mae"]["all"] != summary["global_test"]["mae"]["all"]
    assert "holdout" not in summary


def test_centralized_and_local_leave_the_holdout_out_of_training(tmp_path):
    from fedldt.baselines import build_tasks, run_centralized, run_local

    folder = write_los_loop_like(tmp_path / "syn", num_steps=600)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", "partition.num_territories=3",
                                         "train.rounds=1", "task.train_stride=4", "model.hidden=8",
                                         "federation.holdout=t2", "federation.holdout_finetune=1D"]))
    tasks = build_tasks(cfg)
    central = run_centralized(cfg, tmp_path / "central", tasks)
    assert [t["id"] for t in central["territories"]] == ["t0", "t1"] and set(central["test_per_territory"]) == {"t0", "t1"}
    hold = central["holdout"]
    assert hold["territory"] == "t2" and hold["finetune_history"] == "1D"
    assert math.isfinite(hold["zero_shot"]["mae"]["all"]) and math.isfinite(hold["finetuned"]["mae"]["all"])
    assert hold["references"]["persistence"]["mae"]["all"] == pytest.approx(mae(tasks[2].persistence("test")))
    local = run_local(cfg, tmp_path / "local", tasks)
    assert set(local["test_per_territory"]) == {"t0", "t1"}
    assert local["holdout"]["zero_shot"] is None and local["holdout"]["finetuned"] is None
    assert local["holdout"]["references"] == hold["references"]
    with pytest.raises(ValueError, match="not a territory"):
        run_local({**cfg, "federation": {**cfg["federation"], "holdout": "nowhere"}}, tmp_path / "x", tasks)


@pytest.mark.slow
def test_finetune_and_holdout_through_flower(synthetic_dir, tmp_path):
    """The one Flower simulation of issue 14's personalization: 3 SuperNodes, t2 held out, one
    round, then train.finetune on t0/t1 and t2. t2's egress log shows no train reply and its
    fine-tuning reply carries metrics only."""
    import json
    import time

    from clients.audit import egress_log_path
    from fedldt.launch.simulation import run_simulation

    start = time.time()
    s = run_simulation(["pilot=los_loop_3", f"dataset.path={synthetic_dir}", "partition.num_territories=3",
                        "train.rounds=1", "model.hidden=8", "task.train_stride=8", "personalization=finetune",
                        "personalization.epochs=2", "federation.holdout=t2", "federation.holdout_finetune=6h"],
                       tmp_path / "run", num_supernodes=3)
    assert not s["failures"] and set(s["test_per_territory"]) == {"t0", "t1"}
    assert set(s["personalization_result"]) == set(s["global_test_per_territory"]) == {"t0", "t1"}
    assert s["holdout"]["territory"] == "t2" and s["holdout"]["finetuned"] is not None
    held = [json.loads(x) for x in egress_log_path({"partition-id": 2}).read_text().splitlines()]
    held = [e for e in held if e["time"] >= start]
    assert [e["message_type"] for e in held].count("train") == 0
    tuned = [e for e in held if e["message_type"] == "train.finetune"]
    assert len(tuned) == 1 and [r["kind"] for r in tuned[0]["records"]] == ["metric"]


def test_a_failed_holdout_evaluation_keeps_the_run(tmp_path):
    """The held-out territory fails its test evaluation: the federation's trained model and its
    results are still written, with the failure named in summary.json (not a lost run)."""
    from flwr.app import Error, Message

    from clients.client_app import app
    from server.rounds import run_federated
    from tests.inprocess import InProcessGrid

    def flaky(msg, context):  # t2 (SuperNode 12) answers its held-out test with an error
        if int(msg.metadata.dst_node_id) == 12 and str(msg.metadata.message_type) == "evaluate":
            return Message(Error(code=0, reason="disk full"), reply_to=msg)
        return app(msg, context)

    folder = write_los_loop_like(tmp_path / "syn", num_steps=600)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", "partition.num_territories=3",
                                         "train.rounds=1", "task.train_stride=4", "model.hidden=8",
                                         "federation.holdout=t2"]))
    grid = InProcessGrid(flaky, {10 + i: {"partition-id": i, "out-dir": str(tmp_path / f"out-{i}")} for i in range(3)})
    summary = run_federated(grid, cfg, tmp_path / "run")
    assert "holdout" not in summary
    assert summary["holdout_failure"]["territory"] == "t2" and "disk full" in summary["holdout_failure"]["reason"]
    assert set(summary["test_per_territory"]) == {"t0", "t1"} and math.isfinite(summary["test"]["mae"]["all"])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["holdout_failure"] == summary["holdout_failure"] and (tmp_path / "run" / "model.pt").is_file()
