"""`fedldt predict`: forecasts from a model package equal the run's own predictions, and bad
observations are refused with a message naming what is wrong."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedldt.cli import main
from fedldt.data.windows import collate
from fedldt.delivery import ForecastPackage, InputError
from fedldt.delivery.observations import read_csv_table
from fedldt.engine import TerritoryTask



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


# ------------------------------------------------------------------ plausible inputs only (issue 10)

def predict_json(pkg_dir, csv_path: Path, out: Path, *extra) -> tuple[int, dict | None]:
    rc = main(["predict", str(pkg_dir), "--input", str(csv_path), "--format", "json", "--output", str(out), *extra])
    return rc, (json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the output")) if rc == 0 else None)


def test_package_carries_the_declared_valid_range(pkg):
    assert pkg.manifest["task"]["valid_range"] == {"speed": {"min": 0, "max": 120, "type": "number"}}
    assert pkg.valid_range["speed"].describe("mph") == "0 to 120 mph"


@pytest.mark.parametrize("cell, shown", [
    ("1e300", "'1e300' (beyond float32's range, about 3.4e38)"), ("-1000", "'-1000' (outside the valid range 0 to 120 mph)"),
    ("1e6", "'1e6' (outside the valid range 0 to 120 mph)"), ("true", "'true' (not a number)"), ("inf", "'inf' (infinite)"),
])
def test_impossible_inputs_exit_1_naming_sensor_and_time(cell, shown, pkg, in_run, tmp_path, capsys):
    task = in_run.task
    ids = task.dataset.node_ids.tolist()
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12).astype(object)
    table.loc["2012-03-07T11:15:00", ids[4]] = cell
    rc, _ = predict_json(pkg.root, write_csv(table, tmp_path / "bad.csv"), tmp_path / "o.json")
    err = capsys.readouterr().err
    assert rc == 1 and not (tmp_path / "o.json").exists()
    assert err == (f"fedldt predict: error: invalid value(s) in the 12 most recent steps: sensor {ids[4]} at "
                   f"2012-03-07 11:15:00-08:00: {shown}; send plausible observations (0 to 120 mph, null or an empty "
                   "cell for a missing one), or mask invalid values (--invalid mask) to feed them to the model as "
                   "missing entries\n")


def test_invalid_mask_policy_equals_missing_values_and_says_so(pkg, in_run, tmp_path, capsys):
    task = in_run.task
    ids = task.dataset.node_ids.tolist()
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    bad, gaps = table.astype(object), table.copy()
    for when, sensor, value in (("2012-03-07T11:15:00", ids[4], "1e300"), ("2012-03-07T11:50:00", ids[4], "-3"),
                                ("2012-03-07T11:00:00", ids[9], "fast")):
        bad.loc[when, sensor], gaps.loc[when, sensor] = value, np.nan
    rc, masked = predict_json(pkg.root, write_csv(bad, tmp_path / "bad.csv"), tmp_path / "m.json", "--invalid", "mask")
    assert rc == 0 and masked["invalid_inputs"] == {ids[4]: 2, ids[9]: 1} and "missing_inputs" not in masked
    assert "missing or invalid" in masked["note"]
    assert capsys.readouterr().err == (f"fedldt predict: warning: 3 invalid input value(s) of 2 sensor(s) ({ids[4]}, "
                                       f"{ids[9]}) were fed to the model as masked entries\n")
    rc, missing = predict_json(pkg.root, write_csv(gaps, tmp_path / "gaps.csv"), tmp_path / "g.json", "--allow-missing")
    assert rc == 0 and missing["missing_inputs"] == {ids[4]: 2, ids[9]: 1}
    assert masked["forecasts"] == missing["forecasts"]  # masked invalid values enter the model exactly as gaps do
    assert masked["forecasts"] != pkg.forecast(table).to_json()["forecasts"]


def test_all_missing_windows_are_refused_and_a_silent_sensor_has_no_forecast(pkg, in_run, tmp_path, capsys):
    task = in_run.task
    ids = task.dataset.node_ids.tolist()
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    rc, _ = predict_json(pkg.root, write_csv(table * np.nan, tmp_path / "none.csv"), tmp_path / "o.json", "--allow-missing")
    assert rc == 1 and capsys.readouterr().err.startswith(
        "fedldt predict: error: no valid observation in the 12 most recent steps: every value is missing or invalid")
    silent = table.copy()
    silent[ids[2]] = np.nan
    rc, out = predict_json(pkg.root, write_csv(silent, tmp_path / "silent.csv"), tmp_path / "o.json", "--allow-missing")
    assert rc == 0 and out["unavailable"] == {ids[2]: "no valid observation of this sensor in the 12 most recent steps"}
    assert sorted(out["forecasts"]) == sorted(set(ids) - {ids[2]})
    assert f"fedldt predict: warning: no forecast of sensor {ids[2]}: no valid observation" in capsys.readouterr().err
    assert main(["predict", str(pkg.root), "--input", str(tmp_path / "silent.csv"), "--allow-missing",
                 "--output", str(tmp_path / "o.csv")]) == 0
    assert list(pd.read_csv(tmp_path / "o.csv").columns) == ["timestamp", "horizon_step"] + [s for s in ids if s != ids[2]]


class NonFinite(ForecastPackage):
    """The loaded package, whose model output is made non-finite for some sensors (the output guard's test)."""

    bad: tuple = ()

    def predict_window(self, win, engine="torch"):
        y = super().predict_window(win, engine).copy()
        for j, v in self.bad:
            y[3, j, 0] = v
        return y


def test_non_finite_forecasts_are_absent_with_a_reason(pkg, in_run):
    task = in_run.task
    ids = task.dataset.node_ids.tolist()
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    odd = NonFinite(pkg.root, pkg.manifest, pkg.model, pkg.scaler, pkg.node_ids, pkg.edge_index, pkg.edge_weight, pkg.coords)
    odd.bad = ((1, np.nan), (5, np.inf))
    fc = odd.forecast(table)
    reason = "the model gave no finite forecast (NaN or infinity)"
    assert fc.unavailable == {ids[1]: reason, ids[5]: reason}
    body = fc.to_json()
    text = json.dumps(body, allow_nan=False)  # valid JSON
    assert ids[1] not in body["forecasts"] and ids[5] not in body["forecasts"] and len(body["forecasts"]) == len(ids) - 2
    assert body["unavailable"] == {ids[1]: reason, ids[5]: reason}
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the output")) == body
    assert ids[1] not in fc.to_frame().columns and np.isfinite(fc.to_frame()[ids[0]]).all()
    odd.bad = tuple((j, np.nan) for j in range(len(ids)))
    with pytest.raises(InputError) as e:
        odd.forecast(table)
    assert str(e.value) == f"no forecast can be made: {ids[0]}: {reason}, {ids[1]}: {reason} and {len(ids) - 2} more"


def test_files_that_broke_predict_give_messages(pkg, in_run, tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["predict", *map(str, argv)]) == 1
        return capsys.readouterr().err

    (tmp_path / "bin.csv").write_bytes(bytes(range(256)) * 4)
    assert error(pkg.root, "--input", tmp_path / "bin.csv") == \
        f"fedldt predict: error: {tmp_path / 'bin.csv'}: a binary file, not CSV text; export the observations as UTF-8 CSV\n"
    (tmp_path / "latin.csv").write_bytes("timestamp,vitesse moyenne \xe0 Paris\n".encode("latin-1"))
    assert error(pkg.root, "--input", tmp_path / "latin.csv") == \
        f"fedldt predict: error: {tmp_path / 'latin.csv'}: not UTF-8 text (byte 26, b'\\xe0'); save the CSV as UTF-8\n"
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert error(pkg.root, "--input", tmp_path / "deep.json") == \
        f"fedldt predict: error: {tmp_path / 'deep.json'}: JSON nested more than 32 levels deep\n"
    task = in_run.task
    table = observations(task, step_of(task, "2012-03-07 12:00"), steps=12)
    first = table.columns[0]
    body = {"timestamps": list(table.index), "sensors": {s: table[s].tolist() for s in table.columns}}
    body["sensors"][first][-1] = int("9" * 4000)
    (tmp_path / "huge.json").write_text(json.dumps(body))
    assert f"sensor {first} at 2012-03-07 11:55:00-08:00: an integer of 4000 digits (beyond float32's range" in \
        error(pkg.root, "--input", tmp_path / "huge.json")
    body["sensors"][first][-1] = "HUGE"
    (tmp_path / "huger.json").write_text(json.dumps(body).replace('"HUGE"', "9" * 5000))  # beyond Python's int parsing
    assert "huger.json: not valid JSON (Exceeds the limit (4300 digits) for integer string conversion" in \
        error(pkg.root, "--input", tmp_path / "huger.json")
    # the output folder is checked before anything is computed (even before the package is read)
    assert error(tmp_path / "no-package", "--input", tmp_path / "huge.json", "--output", tmp_path / "no" / "fc.json") == \
        f"fedldt predict: error: --output {tmp_path / 'no' / 'fc.json'}: folder {tmp_path / 'no'} does not exist; create it first\n"
    # a manifest without `files`: a message, never a traceback
    broken = tmp_path / "broken"
    shutil.copytree(pkg.root, broken)
    manifest = json.loads((broken / "package.json").read_text())
    del manifest["files"]
    (broken / "package.json").write_text(json.dumps(manifest))
    err = error(broken, "--input", tmp_path / "huge.json")
    assert err.startswith(f"fedldt predict: error: {broken}") and "Traceback" not in err and err.count("\n") == 1
    assert main(["serve", str(broken), "--port", "1"]) == 1  # fails before listening
    err = capsys.readouterr().err
    assert err.startswith(f"fedldt serve: error: {broken}") and err.count("\n") == 1
    assert main(["serve", str(pkg.root), "--port", "1", "--allowed-hosts", "a*b.org"]) == 1
    assert capsys.readouterr().err == ("fedldt serve: error: --allowed-hosts: allowed hosts ['a*b.org']: give host names "
                                       "(forecast.example.org), patterns like *.example.org, or * for any\n")


def test_csv_with_byte_order_mark_gives_the_same_forecast(pkg, in_run, tmp_path):
    task = in_run.task
    plain = write_csv(observations(task, step_of(task, "2012-03-07 12:00"), steps=12), tmp_path / "plain.csv")
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert (tmp_path / "bom.csv").read_bytes()[:12] == b"\xef\xbb\xbftimestamp"
    pd.testing.assert_frame_equal(read_csv_table(plain), read_csv_table(tmp_path / "bom.csv"))
    for name in ("plain", "bom"):
        assert main(["predict", str(pkg.root), "--input", str(tmp_path / f"{name}.csv"),
                     "--output", str(tmp_path / f"{name}-fc.json")]) == 0
    assert (tmp_path / "plain-fc.json").read_bytes() == (tmp_path / "bom-fc.json").read_bytes()


# ------------------------------------------------------------------ never overwrite what fedldt did not write

@pytest.mark.parametrize("fmt,suffix", [("csv", ".csv"), ("json", ".json"), ("ngsi-ld", ".jsonld")])
def test_output_replaces_only_a_forecast_fedldt_wrote(fmt, suffix, package_dir, in_run, tmp_path, capsys):
    src = write_csv(observations(in_run.task, step_of(in_run.task, "2012-03-07 08:00"), 12), tmp_path / "obs.csv")
    out = tmp_path / f"fc{suffix}"
    args = ["predict", str(package_dir), "--input", str(src), "--format", fmt, "--output", str(out)]
    assert main(args) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert main(args) == 1  # an existing file is never replaced silently
    assert capsys.readouterr().err == (f"fedldt predict: error: --output {out}: exists; choose a new file, or add "
                                       "--force to replace a forecast fedldt predict wrote\n")
    out.write_bytes(first[:-1] + b" ")  # still a forecast: replaced with --force
    assert main(args + ["--force"]) == 0 and out.read_bytes() == first

    notes = tmp_path / f"notes{suffix}"
    notes.write_text('{"forecasts": "mine"}\n' if suffix != ".csv" else "timestamp,value\n2012-03-07,1\n")
    before = notes.read_bytes()
    assert main(args[:-1] + [str(notes), "--force"]) == 1
    assert capsys.readouterr().err.endswith(f"--output {notes}: exists and is not a forecast fedldt predict wrote; "
                                            "refusing to replace it\n")
    assert notes.read_bytes() == before

    link = tmp_path / f"link{suffix}"
    link.symlink_to(out)
    assert main(args[:-1] + [str(link), "--force"]) == 1 and out.read_bytes() == first
    assert "is a symbolic link" in capsys.readouterr().err
