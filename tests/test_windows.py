"""Chronological split before windowing, masked scaling, windows."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedldt.data import MaskedStandardScaler, TerritoryDataset, split_bounds, window_starts
from fedldt.engine import TerritoryTask


def _dataset(values, mask=None, name="syn"):
    values = np.asarray(values, dtype=np.float32)
    t, n, _ = values.shape
    return TerritoryDataset(
        name=name, values=values, mask=np.ones_like(values) if mask is None else mask,
        timestamps=pd.date_range("2020-01-01", periods=t, freq="5min"), node_ids=[str(i) for i in range(n)],
        edge_index=torch.tensor([[i for i in range(n)], [i for i in range(n)]]), edge_weight=torch.ones(n),
    )


def test_split_before_window_no_training_window_reaches_step_210():
    bounds = split_bounds(300, (0.7, 0.1, 0.2))
    assert bounds == {"train": (0, 210), "val": (210, 240), "test": (240, 300)}
    starts = window_starts(bounds["train"], 12, 12, "train")
    last_step_touched = starts.max() + 12 + 12 - 1
    assert last_step_touched == 209
    assert len(starts) == 210 - 24 + 1
    task = TerritoryTask(_dataset(np.arange(300, dtype=float).reshape(300, 1, 1)), window=12, horizon=12)
    touched = set()
    for x, y, *_ in task.windows["train"]:
        touched.update(np.asarray(y[:, 0, 0]).astype(int).tolist())  # values are the step indices
    assert max(touched) == 209
    val_first = task.windows["val"][0][1][0, 0, 0].item()
    assert val_first == 210 + 12  # first val target comes after a val-only input window


def test_scaler_fits_training_part_only():
    series = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 100], dtype=float).reshape(10, 1, 1)
    b = split_bounds(10, (0.7, 0.1, 0.2))
    assert b["train"] == (0, 7)
    sc = MaskedStandardScaler().fit(series[:7], np.ones((7, 1, 1)))
    assert sc.mean.item() == pytest.approx(4.0)
    assert sc.std.item() == pytest.approx(2.0)


def test_scaler_ignores_masked_entries_and_never_gives_nan():
    values = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 0.0], [1000.0, 5.0, 0.0]]).reshape(3, 3, 1)
    mask = np.array([[1, 1, 0], [1, 1, 0], [0, 1, 0]], dtype=float).reshape(3, 3, 1)
    sc = MaskedStandardScaler().fit(values, mask)
    assert sc.mean[0, :, 0].tolist() == pytest.approx([2.0, 5.0, 0.0])  # 1000 is masked
    assert sc.std[0, :, 0].tolist() == pytest.approx([1.0, 1.0, 1.0])  # constant and empty -> 1
    assert np.isfinite(sc.transform(values)).all()


def test_task_with_constant_and_missing_node_has_finite_inputs():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(120, 3, 1)).astype(np.float32)
    values[:, 1] = 7.0  # constant node
    mask = np.ones_like(values)
    mask[:84, 2] = 0.0  # node 2 missing during the whole training part
    values[:84, 2] = 0.0
    task = TerritoryTask(_dataset(values, mask), window=4, horizon=2)
    for s in ("train", "val", "test"):
        assert torch.isfinite(task.windows[s].features).all()


def test_split_info_reports_window_counts_and_times():
    task = TerritoryTask(_dataset(np.zeros((300, 2, 1))), window=12, horizon=12)
    info = task.split_info("test")
    assert info["num_windows"] == 60 - 24 + 1
    assert pd.Timestamp(info["first_target"]) == pd.Timestamp("2020-01-01") + pd.Timedelta(minutes=5 * (240 + 12))
    assert pd.Timestamp(info["last_target"]) == pd.Timestamp("2020-01-01") + pd.Timedelta(minutes=5 * 299)


def test_too_short_split_is_a_clear_error():
    with pytest.raises(ValueError, match="val part has 3 steps"):
        window_starts((10, 13), 12, 12, "val")
    with pytest.raises(ValueError, match="split.ratios"):
        split_bounds(100, (0.5, 0.5, 0.5))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=60, max_value=2000),
    st.floats(min_value=0.3, max_value=0.8),
    st.floats(min_value=0.05, max_value=0.3),
    st.integers(min_value=1, max_value=12),
    st.integers(min_value=1, max_value=12),
)
def test_no_window_crosses_a_split_boundary(t, r_train, r_val, window, horizon):
    r_test = 1.0 - r_train - r_val
    if r_test <= 0.05:
        return
    bounds = split_bounds(t, (r_train, r_val, r_test))
    assert bounds["train"][0] == 0 and bounds["test"][1] == t
    assert bounds["train"][1] == bounds["val"][0] and bounds["val"][1] == bounds["test"][0]
    for name, (a, b) in bounds.items():
        if b - a < window + horizon:
            continue
        starts = window_starts((a, b), window, horizon, name)
        assert starts.min() == a and starts.max() + window + horizon == b


def test_train_stride_thins_training_windows_only():
    task = TerritoryTask(_dataset(np.zeros((300, 2, 1))), window=12, horizon=12, train_stride=2)
    assert task.num_windows("train") == (210 - 24 + 1 + 1) // 2
    assert task.num_windows("test") == 60 - 24 + 1
    assert np.diff(task.windows["train"].starts).tolist() == [2] * (task.num_windows("train") - 1)
