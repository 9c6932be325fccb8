"""`fedldt predict`: forecasts from a model package equal the run's own predictions, and bad
observations are refused with a message naming what is wrong."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedldt.cli import main
from fedldt.data.windows import collate
from fedldt.deploy import ForecastPackage, InputError
from fedldt.engine import TerritoryTask

pytestmark = pytest.mark.slow  # needs the session's real federated run


def step_of(task, when: str) -> int:
    """Index of timestamp ``when`` in the territory's series."""
    return int(task.dataset.timestamps.get_loc(pd.Timestamp(when)))


def observations(task, end: int, steps: int) -> pd.DataFrame:
    """The raw observations of steps ``end-steps .. end-1``: index = naive ISO times, one column per sensor."""
    ds = task.dataset
    rows = slice(end - steps, end)
    return pd.DataFrame(ds.values[rows, :, 0].astype(np.float64), columns=ds.node_ids.tolist(),
                        index=[t.isoformat() for t in ds.timestamps[rows]])


def in_run_prediction(task, model, start: int) -> np.ndarray:
    """``TerritoryTask.predict`` of the run's model on the test window starting at ``start`` -> ``[H, N, C]``."""
    i = int(np.flatnonzero(task.windows["test"].starts == start)[0])
    return task.predict(model, collate([task.windows["test"][i]]))[0].numpy()


def write_csv(table: pd.DataFrame, path: Path) -> Path:
    table.rename_axis("timestamp").reset_index().to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def pkg(package_dir):
    return ForecastPackage.load(package_dir)


@pytest.mark.parametrize("first_input", ["2012-03-06 23:00", "2012-03-07 22:00"])
def test_predict_cli_equals_the_in_run_prediction(first_input, package_dir, in_run, tmp_path):
    # The last 12 steps of test day 2012-03-06, and the last test window of 2012-03-07.
    task = in_run.task
    start = step_of(task, first_input)
    expected = in_run_prediction(task, in_run.model, start)  # [12, N, 1] mph
    csv_in = write_csv(observations(task, start + 12, steps=36), tmp_path / "obs.csv")  # 24 older rows are ignored
    assert main(["predict", str(package_dir), "--input", str(csv_in), "--output", str(tmp_path / "fc.csv")]) == 0
    out = pd.read_csv(tmp_path / "fc.csv")
    ids = task.dataset.node_ids.tolist()
    assert list(out["horizon_step"]) == list(range(1, 13))
    target_times = task.dataset.timestamps[start + 12:start + 24]
    assert list(pd.to_datetime(out["timestamp"]).dt.tz_localize(None)) == list(target_times)
    assert np.abs(out[ids].to_numpy() - expected[:, :, 0]).max() <= 1e-5
    # the JSON table input gives the same numbers
    table = observations(task, start + 12, steps=12)
    body = {"timestamps": list(table.index), "sensors": {s: table[s].tolist() for s in table.columns}}
    (tmp_path / "obs.json").write_text(json.dumps(body))
    assert main(["predict", str(package_dir), "--input", str(tmp_path / "obs.json"), "--output", str(tmp_path / "fc.json")]) == 0
    fc = json.loads((tmp_path / "fc.json").read_text())
    assert fc["unit"] == "mph" and fc["territory"] == "t1"
    assert fc["timestamps"][0] == target_times[0].tz_localize("America/Los_Angeles").isoformat()
    got = np.array([fc["forecasts"][s] for s in ids]).T  # [12, N]
    assert np.abs(got - expected[:, :, 0]).max() <= 1e-5


def test_column_order_does_not_matter(pkg, in_run, tmp_path):
    task = in_run.task
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    shuffled = table[np.random.default_rng(0).permutation(table.columns)]
    assert list(shuffled.columns) != list(table.columns)
    a, b = pkg.forecast(table), pkg.forecast(shuffled)
    assert np.array_equal(a.values, b.values)  # identical, sensor by sensor
    for path, t in (("a.csv", table), ("b.csv", shuffled)):
        assert main(["predict", str(pkg.root), "--input", str(write_csv(t, tmp_path / path)),
                     "--output", str(tmp_path / f"out-{path}")]) == 0
    out_a, out_b = pd.read_csv(tmp_path / "out-a.csv"), pd.read_csv(tmp_path / "out-b.csv")
    for sensor in task.dataset.node_ids:
        assert out_a[sensor].tolist() == out_b[sensor].tolist()


def test_bad_observations_are_refused_naming_the_problem(pkg, in_run):
    task = in_run.task
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=24)
    ids = task.dataset.node_ids.tolist()
    with pytest.raises(InputError, match=r"unknown sensor id\(s\) 999999\b"):
        pkg.forecast(table.assign(**{"999999": 55.0}))
    with pytest.raises(InputError, match=rf"missing sensor\(s\) {ids[7]}\b"):
        pkg.forecast(table.drop(columns=ids[7]))
    with pytest.raises(InputError, match=r"^11 time step\(s\) given; the model needs the 12 most recent steps, 5min apart"):
        pkg.forecast(table.iloc[-11:])
    with pytest.raises(InputError, match=r"must be 5min apart .* is 10min"):
        pkg.forecast(table.iloc[::2])  # 10-minute data
    with pytest.raises(InputError, match=r"must be 5min apart .*11:35:00-08:00 -> 2012-03-07 11:45:00-08:00 is 10min"):
        pkg.forecast(table.drop(index="2012-03-07T11:40:00"))  # one step lost
    with pytest.raises(InputError, match=r"appear more than once"):
        pkg.forecast(pd.concat([table, table.iloc[-1:]]))
    gap = table.copy()
    gap.loc["2012-03-07T11:50:00", ids[3]] = np.nan
    with pytest.raises(InputError, match=rf"missing value\(s\) .*: {ids[3]} at 2012-03-07 11:50:00-08:00; .*--allow-missing"):
        pkg.forecast(gap)
    gap.loc["2012-03-07T10:30:00", ids[3]] = np.nan  # outside the 12 steps used: not a problem
    gap.loc["2012-03-07T11:50:00", ids[3]] = 50.0
    assert np.isfinite(pkg.forecast(gap).values).all()
    text = table.astype(object)
    text.loc["2012-03-07T11:55:00", ids[0]] = "fast"
    with pytest.raises(InputError, match=rf"invalid value\(s\) .*: sensor {ids[0]} at 2012-03-07 11:55:00-08:00: 'fast' \(not a number\)"):
        pkg.forecast(text)
    with pytest.raises(InputError, match="not ISO 8601"):
        pkg.forecast(table.set_axis(["07/03/2012 10:00"] * len(table)))


def test_utc_timestamps_give_the_same_forecast_as_local_ones(pkg, in_run):
    task = in_run.task
    local = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    utc_index = pd.DatetimeIndex(local.index).tz_localize("America/Los_Angeles").tz_convert("UTC")
    utc = local.set_axis(utc_index.strftime("%Y-%m-%dT%H:%M:%SZ"))  # 2012-03-07T19:55:00Z ...
    a, b = pkg.forecast(local), pkg.forecast(utc)
    assert np.array_equal(a.values, b.values) and list(a.timestamps) == list(b.timestamps)


def test_allowed_missing_values_enter_the_model_as_masked_entries(pkg, in_run, tmp_path):
    task = in_run.task
    start = step_of(task, "2012-03-07 12:00")
    ids = task.dataset.node_ids.tolist()
    table = observations(task, start + 12, steps=12)
    table.loc[table.index[-2], ids[5]] = np.nan
    fc = pkg.forecast(table, allow_missing=True)
    assert fc.missing_inputs == {ids[5]: 1}
    # The same window in training's convention: mask 0 (value x mask) on that entry of the territory's data.
    ds = task.dataset
    mask = ds.mask.copy(); mask[start + 10, 5, 0] = 0.0
    values = ds.values.copy(); values[start + 10, 5, 0] = 0.0
    masked_task = TerritoryTask(dataclasses.replace(ds, mask=mask, values=values), window=12, horizon=12)
    assert np.array_equal(masked_task.scaler.mean, task.scaler.mean)  # the gap is in the test part
    expected = in_run_prediction(masked_task, in_run.model, start)
    assert np.abs(fc.values - expected).max() <= 1e-5
    assert np.abs(fc.values - pkg.forecast(observations(task, start + 12, steps=12)).values).max() > 0
    # the CLI says so, on stderr and in the JSON output
    csv_in = write_csv(table, tmp_path / "gap.csv")
    assert main(["predict", str(pkg.root), "--input", str(csv_in), "--format", "json",
                 "--output", str(tmp_path / "o.json")]) == 1
    assert main(["predict", str(pkg.root), "--input", str(csv_in), "--allow-missing", "--format", "json",
                 "--output", str(tmp_path / "o.json")]) == 0
    out = json.loads((tmp_path / "o.json").read_text())
    assert out["missing_inputs"] == {ids[5]: 1} and "masked" in out["note"]


def test_console_script_reports_errors_with_exit_status_1(pkg, in_run, tmp_path):
    task = in_run.task
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12).assign(**{"424242": 60.0})
    fedldt_bin = Path(sys.executable).parent / "fedldt"
    proc = subprocess.run([str(fedldt_bin), "predict", str(pkg.root), "--input", str(write_csv(table, tmp_path / "x.csv"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("fedldt predict: error: unknown sensor id(s) 424242")
    proc = subprocess.run([str(fedldt_bin), "predict", str(pkg.root), "--input", str(tmp_path / "x.txt")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "use a .csv or .json/.jsonld file" in proc.stderr
