"""Forecasts stay within their channel's declared valid range (issue 12, item 8): a channel declared
non-negative (counts, energy) is never forecast below 0 in the test metrics
(``TerritoryTask.predict``), in ``model.onnx`` and in ``fedldt predict``/``serve``/NGSI-LD
(``ForecastPackage.predict_window``); a channel without a lower bound is untouched."""

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch import nn

from fedldt.data.ranges import clip_forecast, forecast_limits, parse_valid_ranges
from fedldt.data.territory import TerritoryDataset
from fedldt.delivery import ForecastPackage
from fedldt.delivery.onnx_export import FixedGraphForecaster, export_onnx, run_onnx
from fedldt.engine import TerritoryTask
from fedldt.metrics import mae
from fedldt.models import build_model
from tests.test_models_zoo import SMALL
from tests.test_onnx_export import BATCH, H, N, _territory
from tests.test_predict import observations, step_of

INF = float("inf")
RANGES = parse_valid_ranges({"energy": {"min": 0, "max": None}, "speed": {"min": 0, "max": 120}})


def test_known_values_negative_becomes_zero_and_an_unbounded_channel_is_untouched():
    lim = forecast_limits(("energy", "temp", "speed"), RANGES)  # temp declares no range
    assert lim.dtype == np.float32 and lim.tolist() == [[0.0, -INF, 0.0], [INF, INF, 120.0]]
    y = np.array([[-1.5, -3.25, 130.0], [2.0, np.nan, -0.5], [0.0, 7.0, 55.5]], dtype=np.float32)
    expected = np.array([[0.0, -3.25, 120.0], [2.0, np.nan, 0.0], [0.0, 7.0, 55.5]], dtype=np.float32)
    out = clip_forecast(y, lim)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, expected)  # NaN stays NaN: a failed forecast never becomes a bound
    out_t = clip_forecast(torch.from_numpy(y), torch.from_numpy(lim))
    assert out_t.dtype == torch.float32
    np.testing.assert_array_equal(out_t.numpy(), expected)
    assert forecast_limits(("energy",), None).tolist() == [[-INF], [INF]]  # nothing declared: nothing clipped


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.just(3)),
              elements=st.floats(-1e6, 1e6, width=32) | st.just(float("nan"))))
def test_clipped_forecasts_lie_in_the_range_and_in_range_values_are_unchanged(y):
    lim = forecast_limits(("energy", "temp", "speed"), RANGES)
    out = clip_forecast(y, lim)
    finite = ~np.isnan(y)
    assert (np.isnan(out) == ~finite).all()
    assert (out[finite] >= np.broadcast_to(lim[0], y.shape)[finite]).all()
    assert (out[finite] <= np.broadcast_to(lim[1], y.shape)[finite]).all()
    inside = finite & (y >= lim[0]) & (y <= lim[1])
    assert (out[inside] == y[inside]).all()
    np.testing.assert_array_equal(clip_forecast(out, lim), out)  # idempotent


class Constant(nn.Module):
    """A forecaster whose every output is ``value`` in scaled units ([batch, horizon, node, 1])."""

    def __init__(self, value: float, horizon: int) -> None:
        super().__init__()
        self.value, self.horizon = float(value), int(horizon)

    def forward(self, x, edge_index, edge_weight):
        return torch.full((x.shape[0], self.horizon, x.shape[2], 1), self.value)


def _energy_task(valid_range):
    values = np.arange(300, dtype=np.float32).reshape(300, 1, 1)  # kWh, all >= 0
    ds = TerritoryDataset(name="e", values=values, mask=np.ones_like(values),
                          timestamps=pd.date_range("2020-01-01", periods=300, freq="h"), node_ids=["0"],
                          edge_index=torch.tensor([[0], [0]]), edge_weight=torch.ones(1), units=("kWh",),
                          channels=("energy",))
    return TerritoryTask(ds, window=4, horizon=2, time_of_day=False, valid_range=valid_range)


def test_test_metrics_use_forecasts_clipped_at_zero():
    task = _energy_task({"energy": {"min": 0, "max": None}})
    raw = -100.0 * float(task.scaler.std.ravel()[0]) + float(task.scaler.mean.ravel()[0])
    assert raw < -5000  # what the model says, in kWh
    batch = next(iter(task.loader("test")))
    y = task.predict(Constant(-100.0, 2), batch)
    assert y.shape == batch.y.shape and (y == 0).all()
    # the test MAE is that of the all-zero forecast: the mean target of the test windows
    starts = task.windows["test"].starts
    targets = np.stack([task.dataset.values[s + 4:s + 6] for s in starts])
    assert mae(task.evaluate(Constant(-100.0, 2), "test")) == pytest.approx(float(targets.mean()), rel=1e-6)
    # a declared range without a lower bound (or none at all) leaves the forecast as it is
    for unbounded in ({"energy": {"min": None, "max": 1e6}}, None):
        y = _energy_task(unbounded).predict(Constant(-100.0, 2), batch)
        assert torch.allclose(y, torch.full_like(y, raw), rtol=1e-6)


def test_model_onnx_clips_as_pytorch_does(tmp_path):
    ei, ew, values, mask, calendar, scaler = _territory(seed=1)
    scaler.mean = scaler.mean - 1e5  # every forecast far below 0 before clipping
    torch.manual_seed(3)
    model = build_model({**SMALL["dcrnn"], "in_channels": 3, "out_channels": 1, "horizon": H}, num_nodes=N).eval()
    example = tuple(torch.from_numpy(a[:2]) for a in (values, mask, calendar))
    limits = forecast_limits(("energy",), RANGES)
    clipped = export_onnx(FixedGraphForecaster(model, ei, ew, N, scaler, limits), example, tmp_path / "c.onnx")
    raw = export_onnx(FixedGraphForecaster(model, ei, ew, N, scaler), example, tmp_path / "r.onnx")
    out = run_onnx(clipped, values, mask, calendar)
    assert out.shape == (BATCH, H, N, 1) and (out == 0).all()
    assert (run_onnx(raw, values, mask, calendar) < -5e4).all()


def test_fedldt_predict_never_forecasts_below_the_declared_minimum(package_dir, in_run):
    """The real Los-loop package (speed 0..120 mph) with a model that forecasts far below 0 mph:
    every forecast of ``fedldt predict``/``serve`` (and the NGSI-LD entities built from it) is 0."""
    pkg = ForecastPackage.load(package_dir)
    assert pkg.forecast_limits.tolist() == [[0.0], [120.0]]
    task = in_run.task
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    before = pkg.forecast(table).values
    assert (before > 0).all()  # the trained model: plausible speeds, unchanged by the clipping
    np.testing.assert_array_equal(before, np.clip(before, 0, 120))
    pkg.model = Constant(-1000.0, pkg.horizon)
    fc = pkg.forecast(table)
    assert fc.values.shape == (pkg.horizon, len(pkg.node_ids), 1) and (fc.values == 0).all()
    assert all(v == 0 for series in fc.to_json()["forecasts"].values() for v in series)
