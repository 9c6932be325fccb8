"""``task.train_history``: a territory keeps only the last N steps of its training part; validation
and test are untouched; nothing before the kept start is used; bad values are named errors."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedldt.data import TerritoryDataset
from fedldt.engine import TerritoryTask, check_train_history_names, duration_text, task_from_config, train_history_steps
from fedldt.metrics import mae
from fedldt.schema import ConfigError, TaskConfig

TASK = {"window": 2, "horizon": 3, "split": [0.6, 0.2, 0.2], "scaler_per_node": True, "time_of_day": False,
        "day_of_week": False, "report_steps": [1, 3], "covariates": False, "ha_period": "day", "train_stride": 1,
        "train_history": {}}
TRAIN = {"batch_size": 8, "eval_batch_size": 16}


def _ramp(t=240, name="t2"):
    """Hourly unit ramp, one node: train [0, 144), val [144, 192), test [192, 240) with TASK's split."""
    values = np.arange(t, dtype=np.float32)[:, None, None]
    return TerritoryDataset(name=name, values=values, mask=np.ones_like(values),
                            timestamps=pd.date_range("2021-01-04", periods=t, freq="h"), node_ids=["a"],
                            edge_index=torch.zeros((2, 1), dtype=torch.long), edge_weight=torch.ones(1))


def _task(history=None, ds=None, **task):
    return task_from_config(ds if ds is not None else _ramp(), {**TASK, **task, "train_history": history or {}}, TRAIN)


def test_keeps_exactly_the_last_n_training_steps_and_never_touches_val_or_test():
    full, short = _task(), _task({"t2": "2D"})  # 48 hourly steps
    starts = short.windows["train"].starts
    assert short.bounds["train"] == (96, 144) and full.bounds["train"] == (0, 144)
    assert starts[0] == 144 - 48 and starts.min() >= 96 and len(starts) == 48 - 2 - 3 + 1
    assert starts[-1] + 2 + 3 == 144  # the last training window still ends at the split
    for split in ("val", "test"):
        assert short.bounds[split] == full.bounds[split]
        assert np.array_equal(short.windows[split].starts, full.windows[split].starts)
    # other territories keep everything
    assert _task({"t0": "2D"}).bounds["train"] == (0, 144)
    assert _task({"t2": None}).bounds["train"] == (0, 144)


def test_scaler_and_historical_average_are_fitted_on_the_kept_part_only():
    full, short = _task(), _task({"t2": "2D"})
    # ramp values 96..143: mean 119.5, population std of 48 consecutive integers sqrt((48^2 - 1) / 12)
    assert float(short.scaler.mean.squeeze()) == pytest.approx(119.5)
    assert float(short.scaler.std.squeeze()) == pytest.approx(np.sqrt((48**2 - 1) / 12), rel=1e-6)
    assert float(full.scaler.mean.squeeze()) == pytest.approx(71.5)
    # hour-of-day slot h: mean of (96 + h, 120 + h) kept, of (h, 24 + h, ..., 120 + h) in full
    assert short._ha_table[:, 0, 0].tolist() == pytest.approx((108 + np.arange(24)).tolist())
    assert full._ha_table[:, 0, 0].tolist() == pytest.approx((60 + np.arange(24)).tolist())
    # hence on validation (targets 146..191) the error is the target's distance to those means
    assert mae(short.historical_average("val")) < mae(full.historical_average("val"))


def test_seasonal_naive_uses_no_lag_value_before_the_kept_start():
    # Keep 30 h: the kept part starts at step 114. Training targets s = start + 2 + k (starts
    # 114..139) use the value at s - 24 only when s - 24 >= 114 (error 24), else the last input
    # (error k + 1): s - 24 >= 114 <=> start >= 136 - k, i.e. 4 + k windows of 26.
    short = _task({"t2": "30h"})
    starts = short.windows["train"].starts
    assert (starts[0], len(starts)) == (114, 26)
    got = short.seasonal_naive("train", "1D")
    assert got.abs_err_sum.tolist() == pytest.approx([(4 + k) * 24 + (22 - k) * (k + 1) for k in range(3)])
    # the same windows without train_history would use every lagged value (all >= 92 > 0)
    full = TerritoryTask(_ramp(), window=2, horizon=3, split=(0.6, 0.2, 0.2), time_of_day=False)
    assert mae(full.seasonal_naive("val", "1D")) == mae(short.seasonal_naive("val", "1D")) == pytest.approx(24.0)
    # a week before any validation target lies before step 114: all fall back to the last input
    assert np.array_equal(short.seasonal_naive("val", "7D").abs_err_sum, short.persistence("val").abs_err_sum)
    assert not np.array_equal(full.seasonal_naive("val", "7D").abs_err_sum, full.persistence("val").abs_err_sum)


@pytest.mark.parametrize("history,match", [
    ("4h", r"task.train_history.t2 keeps 4 steps \(4h\) of the training part, fewer than one window .* keep at least 5h"),
    ("7D", r"task.train_history.t2 keeps 168 steps \(7D\) but the training part of territory 't2' has 144 steps \(6D\)"),
    ("90min", r"task.train_history.t2='90min' is not a whole number of the data's 1h steps"),
    ("abc", r"task.train_history.t2='abc' is not a duration pandas reads"),
    ("-1D", r"task.train_history.t2='-1D' is not a positive duration"),
    ("0h", r"task.train_history.t2='0h' is not a positive duration"),
    ("12", r"task.train_history.t2='12' has no unit"),
])
def test_bad_history_is_a_named_error(history, match):
    with pytest.raises(ConfigError, match=match):
        _task({"t2": history})


def test_schema_checks_the_values_and_reports_the_key():
    TaskConfig.model_validate({**TASK, "train_history": {"t2": "1D", "t0": None}})
    from fedldt.schema import check_block

    with pytest.raises(ConfigError, match=r"task.train_history.MEL='soon' is not a duration"):
        check_block(TaskConfig, {**TASK, "train_history": {"MEL": "soon"}}, "task", "conf/config.yaml")
    with pytest.raises(ConfigError, match=r"task.train_history.MEL=3"):
        check_block(TaskConfig, {**TASK, "train_history": {"MEL": 3}}, "task", "conf/config.yaml")


def test_unknown_territory_name_is_an_error_naming_the_known_ones(synthetic_dir, small_cfg):
    with pytest.raises(ConfigError, match=r"task.train_history names no territory \['t9'\]: the territories are "
                                          r"\['t0', 't1'\]"):
        check_train_history_names({"train_history": {"t9": "1D", "t1": None}}, ["t0", "t1"])
    check_train_history_names({"train_history": {}}, ["t0"])
    check_train_history_names({}, ["t0"])
    # at the boundary: resolving the config (data checks) before anything runs
    with pytest.raises(ConfigError, match=r"names no territory \['t9'\]"):
        small_cfg(synthetic_dir, "+task.train_history.t9=12h")
    with pytest.raises(ConfigError, match=r"task.train_history.t1 keeps 2016 steps \(7D\) but"):
        small_cfg(synthetic_dir, "+task.train_history.t1=7D")


def test_every_mode_builds_the_short_territory(synthetic_dir, small_cfg):
    # 300 five-minute steps: training part 210 steps; 12h = 144 steps kept by t1 only
    from clients.territory import get_task
    from fedldt.baselines import build_tasks

    cfg = small_cfg(synthetic_dir, "+task.train_history.t1=12h")
    full = small_cfg(synthetic_dir)
    centralized = {t.dataset.name: t for t in build_tasks(cfg)}  # centralized and local
    federated = get_task(cfg, 1)  # a territory's client (simulation)
    for task in (centralized["t1"], federated):
        assert task.bounds["train"] == (210 - 144, 210)
        assert task.num_windows("train") == 144 - 12 - 12 + 1
    assert centralized["t0"].bounds["train"] == (0, 210)
    ref = get_task(full, 1)
    for split in ("val", "test"):
        assert np.array_equal(federated.windows[split].starts, ref.windows[split].starts)


def test_train_history_steps_and_duration_text():
    ds = _ramp()
    assert train_history_steps(ds, "1D") == 24 and train_history_steps(ds, "2W") == 336
    assert duration_text(pd.Timedelta("4D21h35min")) == "4D21h35min" and duration_text(pd.Timedelta(0)) == "0s"
    assert pd.Timedelta(duration_text(pd.Timedelta("1D2h"))) == pd.Timedelta("26h")


@settings(max_examples=40, deadline=None)
@given(hours=st.integers(5, 144), window=st.integers(1, 3), horizon=st.integers(1, 2), stride=st.integers(1, 4))
def test_any_history_keeps_the_last_n_steps(hours, window, horizon, stride):
    if hours < window + horizon:
        with pytest.raises(ConfigError, match="fewer than one window"):
            _task({"t2": f"{hours}h"}, window=window, horizon=horizon)
        return
    full = _task(window=window, horizon=horizon, train_stride=stride)
    short = _task({"t2": f"{hours}h"}, window=window, horizon=horizon, train_stride=stride)
    starts = short.windows["train"].starts
    assert starts[0] == 144 - hours and starts.min() >= 144 - hours
    assert np.array_equal(starts, np.arange(144 - hours, 144 - window - horizon + 1, stride))
    assert starts.max() + window + horizon <= 144
    assert float(short.scaler.mean.squeeze()) == pytest.approx(144 - (hours + 1) / 2)
    for split in ("val", "test"):
        assert np.array_equal(short.windows[split].starts, full.windows[split].starts)
        assert np.array_equal(short.persistence(split).abs_err_sum, full.persistence(split).abs_err_sum)


def test_deployment_territories_apply_it_and_the_server_checks_the_names(tmp_path):
    # Each territory holds only its own package (it knows only its own name): it applies its own
    # entry; the server checks the names against the names its territories report.
    from clients.client_app import app
    from fedldt.config import compose_config, resolve_config
    from server.rounds import discover_territories
    from tests.conftest import write_territory_packages
    from tests.inprocess import InProcessGrid

    folders = write_territory_packages(tmp_path / "territories", num_territories=2, seed=3)

    def discover(history):
        cfg = resolve_config(compose_config(["pilot=los_loop_3", "dataset=packages", "dataset.path=/nonexistent",
                                             "partition.num_territories=2", "model.hidden=8",
                                             f"+task.train_history.{history}"]), require_data=False)
        grid = InProcessGrid(app, {10 + i: {"territory": i, "data-path": str(f), "out-dir": str(tmp_path / f"o{i}")}
                                   for i, f in enumerate(folders)})
        return discover_territories(grid, cfg, timeout=30)

    infos = discover("t1=12h")  # 5-minute data: 144 steps kept of 210
    assert (infos[0]["num-train"], infos[1]["num-train"]) == (210 - 24 + 1, 144 - 24 + 1)
    with pytest.raises(ConfigError, match=r"task.train_history names no territory \['t9'\]: the territories are "
                                          r"\['t0', 't1'\]"):
        discover("t9=12h")
