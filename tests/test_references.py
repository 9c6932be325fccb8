"""Seasonal naive references: known answers on small synthetic series, the undefined (null) cases,
and properties against a plain per-element implementation of the rule."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedldt.data import TerritoryDataset
from fedldt.engine import TerritoryTask
from fedldt.metrics import MetricSums, mae, masked_error_sums
from fedldt.results import REFERENCES, build_summary, reference_sums, summary_table, sums_from_record, sums_to_record


def _dataset(values, mask=None, freq="h", start="2021-01-04"):
    """One territory: ``values`` ``[time]`` or ``[time, node]`` on a ring of its nodes."""
    values = np.asarray(values, dtype=np.float32)
    values = values.reshape(values.shape[0], -1, 1)
    t, n = values.shape[:2]
    src = torch.arange(n)
    mask = np.ones_like(values) if mask is None else np.asarray(mask, np.float32).reshape(values.shape)
    return TerritoryDataset(
        name="syn", values=values, mask=mask,
        timestamps=pd.date_range(start, periods=t, freq=freq), node_ids=[f"s{i}" for i in range(n)],
        edge_index=torch.stack([src, (src + 1) % n]), edge_weight=torch.ones(n))


def _ramp_task(mask=None, **kw):
    # hourly unit ramp, 10 days: train [0, 144), val [144, 192), test [192, 240); window 2, horizon 3
    t = 240
    return TerritoryTask(_dataset(np.arange(t), mask), **{"window": 2, "horizon": 3, "split": (0.6, 0.2, 0.2),
                                                          "time_of_day": False, **kw})


def test_seasonal_naive_day_known_answer_with_a_masked_lag_value():
    # On a unit ramp the value one day (24 h) earlier is 24 below the target: error 24. The value
    # at step 180 (validation part) is masked, so test target 204 falls back to the last input
    # value: 3 windows (starts 200, 201, 202, target at steps k = 2, 1, 0) with error k + 1.
    mask = np.ones(240)
    mask[180] = 0
    task = _ramp_task(mask)
    s = task.seasonal_naive("test", "1D")
    assert task.num_windows("test") == 44
    assert [mae(s, k) for k in (1, 2, 3)] == pytest.approx([(43 * 24 + k) / 44 for k in (1, 2, 3)])
    assert mae(s) == pytest.approx(23.5)  # (3 * 43 * 24 + 1 + 2 + 3) / 132
    assert s.num_valid.tolist() == [44, 44, 44]
    # without the masked value: exactly 24 everywhere
    assert mae(_ramp_task().seasonal_naive("test", "1D")) == pytest.approx(24.0)


def test_seasonal_naive_week_falls_back_where_the_series_is_too_short():
    # Week lag = 168 h. Training targets (steps 2..143) have no value a week earlier: the forecast
    # is the last input value, exactly persistence. Validation targets s = start + 2 + k lie in
    # 146..191; s - 168 < 0 for starts 144 .. 165 - k (22 - k windows, error k + 1), the other
    # 22 + k windows use the lagged value (error 168).
    task = _ramp_task()
    train, pers = task.seasonal_naive("train", "7D"), task.persistence("train")
    assert np.array_equal(train.abs_err_sum, pers.abs_err_sum) and np.array_equal(train.num_valid, pers.num_valid)
    val = task.seasonal_naive("val", "7D")
    assert val.abs_err_sum.tolist() == pytest.approx([(22 - k) * (k + 1) + (22 + k) * 168 for k in range(3)])
    assert mae(task.seasonal_naive("test", "7D")) == pytest.approx(168.0)


def test_fallback_is_the_last_valid_input_value_not_a_masked_filler():
    # A week is longer than the training part, so every training window falls back. Step 100 is
    # masked (filler 0): the window starting at 98 (window 3, inputs 98..100) forecasts 99, its
    # last valid input, for targets 101..103 (errors 2, 3, 4), where persistence forecasts the
    # filler (errors 101, 102, 103); every other window's last input is valid (both agree).
    values, mask = np.arange(240, dtype=np.float32), np.ones(240)
    values[100], mask[100] = 0.0, 0
    task = TerritoryTask(_dataset(values, mask), window=3, horizon=3, split=(0.6, 0.2, 0.2), time_of_day=False)
    sums, pers = task.seasonal_naive("train", "7D"), task.persistence("train")
    assert sums.abs_err_sum.tolist() == pytest.approx((pers.abs_err_sum - [101, 102, 103] + [2, 3, 4]).tolist())
    # target 100 (windows starting at 95, 96, 97) is masked: counted by neither
    assert sums.num_valid.tolist() == pers.num_valid.tolist() == [task.num_windows("train") - 1] * 3


@pytest.mark.parametrize("freq,horizon,undefined,defined", [
    ("7min", 3, "seasonal_naive_day", "seasonal_naive_week"),  # 7 min divides a week (1440 steps), not a day
    ("1D", 3, "seasonal_naive_day", "seasonal_naive_week"),  # a day lag is 1 step < horizon 3: it would be the future
    ("8D", 1, "seasonal_naive_day", None),  # steps longer than both lags
])
def test_reference_is_null_where_the_lag_is_not_defined(freq, horizon, undefined, defined):
    rng = np.random.default_rng(0)
    task = TerritoryTask(_dataset(rng.normal(size=(120, 2)) + 10, freq=freq), window=4, horizon=horizon,
                         time_of_day=False)
    refs = reference_sums(task, "test")
    assert list(refs) == list(REFERENCES)
    assert int(refs[undefined].num_valid.sum()) == 0 and task.seasonal_lag_steps(
        {"seasonal_naive_day": "1D", "seasonal_naive_week": "7D"}[undefined]) is None
    if defined is not None:
        assert refs[defined].num_valid.tolist() == refs["persistence"].num_valid.tolist() != [0] * horizon
    if freq == "7min":  # a week (1440 steps) is longer than the series: persistence exactly
        assert np.array_equal(refs["seasonal_naive_week"].abs_err_sum, refs["persistence"].abs_err_sum)
    if freq == "1D":  # week lag 7 steps: the value a week before the target
        assert task.seasonal_lag_steps("7D") == 7
    # the summary holds an all-null block (valid JSON, never NaN) and the closing table says n/a
    test = {"syn": {"model": refs["persistence"], **refs}}
    cfg = {"name": "p", "dataset": {"name": "d", "path": "/x"}, "train": {"rounds": 1, "local_epochs": 1}, "seed": 0,
           "strategy": {"name": "fedavg"}, "personalization": {"name": "none"}, "task": {"report_steps": [1]}}
    summary = build_summary(cfg, "local", [], test, [], [], {}, 1.0)
    assert summary[undefined] == {m: {"h1": None, "all": None} for m in ("mae", "rmse", "mape", "wape")}
    assert summary[f"{undefined}_per_territory"]["syn"]["mae"]["all"] is None
    assert json.loads(json.dumps(summary, allow_nan=False))[undefined]["mae"]["h1"] is None
    label = "seasonal naive (day)"
    assert f"| MAE {label} | n/a | n/a |" in summary_table(summary)


def test_reference_sums_travel_in_the_evaluate_record():
    task = _ramp_task()
    sums = {"model": task.persistence("val"), **reference_sums(task, "val")}
    back = sums_from_record(sums_to_record(sums))
    assert list(back) == ["model", *REFERENCES]
    assert all(np.array_equal(back[k].abs_err_sum, sums[k].abs_err_sum) for k in back)


def _seasonal_naive_by_hand(values, mask, starts, w, h, lag, first):
    """The rule element by element: target s gets the value at s - lag when that is valid and
    >= first, else the window's last valid input (else its last input)."""
    t, n, c = values.shape
    y_hat = np.zeros((len(starts), h, n, c))
    for b, s0 in enumerate(starts):
        for j in range(n):
            for ch in range(c):
                valid_inputs = [p for p in range(s0, s0 + w) if mask[p, j, ch] > 0]
                fallback = values[valid_inputs[-1], j, ch] if valid_inputs else values[s0 + w - 1, j, ch]
                for k in range(h):
                    p = s0 + w + k - lag
                    y_hat[b, k, j, ch] = values[p, j, ch] if p >= first and mask[p, j, ch] > 0 else fallback
    targets = np.asarray(starts)[:, None] + w + np.arange(h)[None]
    return masked_error_sums(y_hat, values[targets], mask[targets])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), lag_hours=st.sampled_from([2, 4, 6, 24]), window=st.integers(1, 6),
       horizon=st.integers(1, 4), missing=st.floats(0.0, 0.5), batch=st.integers(1, 7))
def test_vectorised_seasonal_naive_matches_the_rule(seed, lag_hours, window, horizon, missing, batch):
    rng = np.random.default_rng(seed)
    t = 200
    values = rng.normal(50, 10, size=(t, 2, 2)).astype(np.float32)
    mask = (rng.random((t, 2, 2)) >= missing).astype(np.float32)
    values[mask == 0] = 0.0
    ds = TerritoryDataset(name="r", values=values, mask=mask, timestamps=pd.date_range("2021-01-04", periods=t, freq="h"),
                          node_ids=["a", "b"], edge_index=torch.tensor([[0, 1], [1, 0]]), edge_weight=torch.ones(2),
                          channels=("x", "y"), units=("", ""))
    task = TerritoryTask(ds, window=window, horizon=horizon, time_of_day=False, eval_batch_size=batch)
    lag = f"{lag_hours}h"
    for split in ("train", "test"):
        got = task.seasonal_naive(split, lag)
        if lag_hours < horizon:
            assert int(got.num_valid.sum()) == 0
            continue
        want = _seasonal_naive_by_hand(values, mask, task.windows[split].starts, window, horizon, lag_hours, 0)
        for key in ("abs_err_sum", "sq_err_sum", "num_valid"):
            np.testing.assert_allclose(getattr(got, key), getattr(want, key), rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(period=st.sampled_from([1, 2, 3, 4, 6, 8, 12, 24]), seed=st.integers(0, 2**16), window=st.integers(1, 12),
       horizon=st.integers(1, 12), days=st.integers(8, 12))
def test_periodic_series_is_forecast_exactly_where_the_lag_exists(period, seed, window, horizon, days):
    # A series repeating every `period` hours (a divisor of 24) is forecast with zero error one
    # day and one week later: validation and test targets all lie >= a day after the start, test
    # targets of an 8+ day series a week after it (the lagged value always exists).
    pattern = np.random.default_rng(seed).uniform(0, 100, size=(period, 3))
    t = 24 * days
    task = TerritoryTask(_dataset(pattern[np.arange(t) % period]), window=window, horizon=horizon,
                         split=(0.6, 0.2, 0.2), time_of_day=False)
    assert mae(task.seasonal_naive("val", "1D")) == pytest.approx(0.0, abs=1e-9)
    if task.windows["test"].starts[0] + window >= 168:
        assert mae(task.seasonal_naive("test", "7D")) == pytest.approx(0.0, abs=1e-9)
    assert int(task.seasonal_naive("val", "1D").num_valid.sum()) == task.num_windows("val") * horizon * 3


def test_metric_sums_zero_block_is_what_a_null_reference_gives():
    task = TerritoryTask(_dataset(np.arange(120.0), freq="7min"), window=4, horizon=3, time_of_day=False)
    z = task.seasonal_naive("test", "1D")
    assert all(np.array_equal(getattr(z, k), getattr(MetricSums.zeros(3), k)) for k in ("abs_err_sum", "num_valid"))
