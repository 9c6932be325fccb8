"""Review of issue 14 (a breaker's findings, each a known defect fixed): forged fine-tuning replies,
forged personal models, hold-out and contribution names checked before any training, long
values kept out of messages."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedldt.config import compose_config, resolve_config
from server.strategy import FederationError


def _cfg(*overrides: str) -> dict:
    return resolve_config(compose_config(["pilot=los_loop_3", *overrides]), require_data=False)


# ------------------------------------------------------------------ forged fine-tuning replies (server side)
def _hostile_territory(metrics_of):
    """A territory that does not run fedldt's ClientApp: it answers every message with the metric
    record ``metrics_of(node)`` (no egress mod between it and the server)."""
    def app(msg: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(metrics_of(int(context.node_id)))}), reply_to=msg)
    return app


def _finetune(metrics_of):
    from server.rounds import finetune_territories
    from tests.inprocess import InProcessGrid

    grid = InProcessGrid(_hostile_territory(metrics_of), {10: {"partition-id": 0}, 11: {"partition-id": 1}})
    arrays = ArrayRecord({"w": torch.zeros(2)})
    return finetune_territories(grid, {0: 10, 1: 11}, arrays, _cfg(), timeout=5.0, **{"run-key": "0" * 32})


def _good(node: int) -> dict:
    return {"territory": node - 10, "kept": 1, "val_mae_global": 2.5, "val_mae_finetuned": 2.0, "epochs_run": 3}


def test_an_honest_finetune_reply_is_accepted():
    from server.rounds import finetune_result

    out = _finetune(_good)
    assert sorted(out) == [0, 1]
    assert finetune_result(out[1]) == {"kept": "finetuned", "val_mae_global": 2.5, "val_mae_finetuned": 2.0,
                                       "epochs_run": 3}
    # no computable validation MAE: the keys are absent, the result holds None
    assert finetune_result({"territory": 0, "kept": 0, "epochs_run": 0})["val_mae_global"] is None


@pytest.mark.parametrize("forged, match", [
    ({"kept": -1}, "'kept' must be finite and >= 0"),  # was read as KEPT[-1] = "finetuned"
    ({"kept": 2}, "'kept' must be 0"),  # was an IndexError
    ({"val_mae_global": math.nan}, "'val_mae_global' must be finite"),  # was a crash writing summary.json at the end
    ({"val_mae_finetuned": math.inf}, "'val_mae_finetuned' must be finite"),
    ({"epochs_run": -5}, "'epochs_run' must be finite and >= 0"),
    ({"epochs_run": 2.5}, "'epochs_run' must be int"),
    ({"secret": 1.0}, "keys not in the allow-list"),
    ({"territory": 0}, "answered for territory 0"),  # node 11 claims territory 0
])
def test_a_forged_finetune_reply_is_refused_naming_the_node(forged, match):
    def metrics_of(node):
        return {**_good(node), **forged} if node == 11 else _good(node)

    with pytest.raises(FederationError, match=match) as e:
        _finetune(metrics_of)
    assert "node 11" in str(e.value)


# ------------------------------------------------------------------ forged personal models (territory side, export)
def test_a_personal_model_holding_nan_is_refused(tmp_path):
    from fedldt.checkpoint import CheckpointError, load_personal_model, save_personal_model

    key = "a" * 32
    save_personal_model(tmp_path, key, {"w": torch.tensor([1.0, math.nan]), "n": torch.tensor(3)}, {"kept": "finetuned"})
    with pytest.raises(CheckpointError, match=r"entries \['w'\] hold NaN or inf"):
        load_personal_model(tmp_path, key)
    save_personal_model(tmp_path, key, {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}, {"kept": "finetuned"})
    meta, state = load_personal_model(tmp_path, key)
    assert meta["run_key"] == key and state["w"].tolist() == [1.0, 2.0]


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory):
    """A personalization=finetune federation of 3 synthetic territories, in process (about 10 s)."""
    from clients.client_app import app
    from server.rounds import run_federated
    from tests.conftest import write_los_loop_like
    from tests.inprocess import InProcessGrid

    tmp = tmp_path_factory.mktemp("finetuned")
    folder = write_los_loop_like(tmp / "syn", num_steps=600)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", "partition.num_territories=3",
                                         "train.rounds=1", "task.train_stride=4", "model.hidden=8",
                                         "personalization=finetune", "personalization.epochs=1"]))
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "out-dir": str(tmp / f"out-{i}")} for i in range(3)})
    run_federated(grid, cfg, tmp / "run")
    return tmp


def _forge(folder, change):
    """Rewrite ``folder``'s personal model with ``change(state)`` (same run key and metadata)."""
    from fedldt.checkpoint import load_personal_model, save_personal_model

    key = next(p.name for p in (folder / "checkpoints").iterdir())
    meta, state = load_personal_model(folder, key)
    save_personal_model(folder, key, change(dict(state)), {k: v for k, v in meta.items() if k != "run_key"})


def test_export_refuses_another_territorys_personal_model(finetuned_run):
    from fedldt.delivery.export import ExportError, export_package

    # the models are node-count independent: t1's loads into t0; before, only the MAE check caught it, misleadingly
    with pytest.raises(ExportError, match="holds the personal model of territory 't1', not 't0'"):
        export_package(finetuned_run / "run", "t0", finetuned_run / "pkg", onnx=False,
                       territory_dir=finetuned_run / "out-1")
    with pytest.raises(ExportError, match="personal model .* does not exist"):  # a file, not a folder
        export_package(finetuned_run / "run", "t0", finetuned_run / "pkg", onnx=False,
                       territory_dir=finetuned_run / "run" / "summary.json")
    assert not (finetuned_run / "pkg").exists()


def test_export_refuses_a_personal_model_that_forecasts_nan(finetuned_run):
    from fedldt.delivery.export import ExportError, export_package

    def huge(state):  # finite weights whose forecast is not finite: the MAE check used to pass NaN
        return {k: (v * 3e38 if torch.is_floating_point(v) else v) for k, v in state.items()}

    _forge(finetuned_run / "out-2", huge)
    with pytest.raises(ExportError, match="test MAE re-computed here (nan|inf)"):
        export_package(finetuned_run / "run", "t2", finetuned_run / "pkg", onnx=False,
                       territory_dir=finetuned_run / "out-2")
    _forge(finetuned_run / "out-2", lambda s: {**s, next(iter(s)): torch.full_like(next(iter(s.values())), math.nan)})
    with pytest.raises(ExportError, match="hold NaN or inf"):
        export_package(finetuned_run / "run", "t2", finetuned_run / "pkg", onnx=False,
                       territory_dir=finetuned_run / "out-2")
    assert not (finetuned_run / "pkg").exists()


# ------------------------------------------------------------------ hold-out checked before any training
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from tests.conftest import write_los_loop_like

    return write_los_loop_like(tmp_path_factory.mktemp("syn"), num_steps=600)


def _data_cfg(folder, *overrides: str) -> dict:
    return resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", *overrides]))


@pytest.mark.parametrize("overrides, match", [
    # before: found by the ServerApp after the SuperLink and SuperNodes started (simulation, deployment)
    (("federation.holdout=nowhere",), r"federation.holdout='nowhere' is not a territory of this pilot; its territories "
                                      r"are \['t0', 't1', 't2'\]"),
    (("partition.num_territories=1", "federation.holdout=t0"), "only territory"),
    # before: found by the held-out territory after the last round, the whole run lost
    (("federation.holdout=t2", "federation.holdout_finetune=1000D"),
     r"federation.holdout_finetune='1000D' for the held-out territory: .* keep at most"),
    (("federation.holdout=t2", "federation.holdout_finetune=7min"), "not a whole number of the data's 5min steps"),
])
def test_holdout_is_checked_against_the_data_before_training(synthetic, overrides, match):
    from fedldt.schema import ConfigError

    with pytest.raises(ConfigError, match=match):
        _data_cfg(synthetic, "partition.num_territories=3", *overrides)


def test_a_valid_holdout_resolves(synthetic):
    cfg = _data_cfg(synthetic, "partition.num_territories=3", "federation.holdout=t2", "federation.holdout_finetune=1D")
    assert cfg["federation"]["holdout"] == "t2" and cfg["federation"]["holdout_finetune"] == "1D"


# ------------------------------------------------------------------ compare.contribution checked before training
@pytest.mark.parametrize("name", ["null", "true", "1", "1e3", "nan", "t.1-a_b"])
def test_a_leave_one_out_run_holds_out_exactly_the_named_territory(name):
    from fedldt.compare import run_overrides

    # before: federation.holdout=null composed to None (a territory named "null" was never held out)
    ov = run_overrides(["pilot=los_loop_3"], "federated", 0, holdout=name)
    assert compose_config(ov)["federation"]["holdout"] == name


def test_contribution_with_one_territory_is_refused_before_any_run(synthetic_dir, small_cfg, tmp_path):
    from fedldt.compare import run_comparison

    over = ["partition.num_territories=1", "compare.contribution=true", "compare.methods=[local]"]
    cfg = small_cfg(synthetic_dir, *over)
    with pytest.raises(ValueError, match=r"needs at least 2 territories .*\['t0'\]"):
        run_comparison(cfg, ["pilot=los_loop_3", f"dataset.path={synthetic_dir}", *over], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # before: the local runs first, then a failed leave-one-out run


# ------------------------------------------------------------------ a NaN filler under the mask
def test_a_nan_filler_under_the_mask_is_refused():
    import numpy as np
    import pandas as pd

    from fedldt.data import TerritoryDataset

    values, mask = np.arange(48, dtype=np.float32)[:, None, None].copy(), np.ones((48, 1, 1), dtype=np.float32)
    mask[20:22], values[20:22] = 0, np.nan  # before: accepted; model inputs, persistence and seasonal naive became NaN
    with pytest.raises(ValueError, match=r"missing \(mask=0\) values must hold a finite filler"):
        TerritoryDataset(name="t", values=values, mask=mask, timestamps=pd.date_range("2021-01-04", periods=48, freq="h"),
                         node_ids=["a"], edge_index=torch.zeros((2, 1), dtype=torch.long), edge_weight=torch.ones(1))


# ------------------------------------------------------------------ long values stay out of messages
def test_train_history_messages_stay_short_for_long_values():
    from fedldt.engine import check_train_history_names
    from fedldt.schema import ConfigError, train_history_timedelta

    with pytest.raises(ConfigError) as e:
        train_history_timedelta("t" * 10_000, "x" * 100_000)
    assert len(str(e.value)) < 300 and "is not a duration pandas reads" in str(e.value)  # before: 110 kB
    with pytest.raises(ConfigError) as e:
        check_train_history_names({"train_history": {f"n{i}": "1D" for i in range(10_000)}}, ["t0"])
    assert len(str(e.value)) < 300 and "9995 more" in str(e.value)


# ------------------------------------------------------------------ forged evaluation sums (server side)
def test_evaluation_sums_holding_nan_are_refused():
    from fedldt.metrics import MetricSums
    from fedldt.results import sums_from_record, sums_to_record

    record = sums_to_record({name: MetricSums.zeros(3) for name in ("model", "persistence", "historical_average",
                                                                     "seasonal_naive_day", "seasonal_naive_week")})
    assert sums_from_record(record)["seasonal_naive_week"].abs_err_sum.tolist() == [0.0, 0.0, 0.0]
    record["seasonal_naive_week.abs_err_sum"] = [0.0, math.nan, 0.0]  # before: NaN reached summary.json's writer
    with pytest.raises(ValueError, match=r"prefix 'seasonal_naive_week.' hold NaN or inf in \['abs_err_sum'\]"):
        sums_from_record(record)


# ------------------------------------------------------------------ a kept history without any valid value
def test_a_kept_history_without_a_valid_value_is_refused():
    from fedldt.engine import task_from_config
    from fedldt.schema import ConfigError
    from tests.test_train_history import TASK, TRAIN, _ramp

    ds = _ramp()  # hourly, training part [0, 144)
    ds.mask[120:144] = 0  # the last day of the training part is all missing
    # before: accepted; scaler mean 0 / std 1, training loss 0.0 on nothing, fine-tuning "ran" 3 epochs
    with pytest.raises(ConfigError, match=r"task.train_history.t2 keeps 24 steps \(1D\) .* every value is missing"):
        task_from_config(ds, {**TASK, "train_history": {"t2": "1D"}}, TRAIN)
    task = task_from_config(ds, {**TASK, "train_history": {"t2": "2D"}}, TRAIN)  # one valid day: fine
    assert task.bounds["train"] == (96, 144)
