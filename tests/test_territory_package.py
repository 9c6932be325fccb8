"""Territory data packages (issue 12, items 1-3): loader, time done right, graphs done right.

Each test writes a tiny package into a temporary folder (or reads the example package in
``tests/data/territory_example``) and checks exact values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedldt.data.graph import complete_self_loops, normalized_adjacency, self_loop_counts
from fedldt.data.package import TerritoryPackageError, load_package
from fedldt.data.territory import TerritoryDataset
from fedldt.data.windows import day_fraction

EXAMPLE = Path(__file__).parent / "data" / "territory_example"


def write_package(root: Path, rows: list | pd.DataFrame, tz: str = "America/Los_Angeles", interval: str = "5min",
                  sensors: list[str] = ("s1",), edges: list | None = None, **manifest) -> Path:
    """A long-layout package with one channel 'speed' (mph, 0..120) and sensors on a line."""
    root.mkdir(parents=True, exist_ok=True)
    obs = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows, columns=["timestamp", "sensor_id", "speed"])
    obs.to_csv(root / "observations.csv", index=False)
    pd.DataFrame({"sensor_id": list(sensors), "latitude": [34.0 + 0.01 * i for i in range(len(sensors))],
                  "longitude": [-118.0] * len(sensors)}).to_csv(root / "sensors.csv", index=False)
    spec = {"name": "t", "interval": interval, "timezone": tz,
            "channels": [{"name": "speed", "unit": "mph", "min": 0, "max": 120}],
            "provenance": "test", "licence": "CC0-1.0", "graph": {"method": "knn", "k": 1}}
    if edges is not None:
        pd.DataFrame(edges, columns=["source", "target", "weight"]).to_csv(root / "edges.csv", index=False)
        spec["graph"] = {"edges": "edges.csv", "directed": True}
    spec.update(manifest)
    (root / "territory.yaml").write_text(yaml.safe_dump(spec))
    return root


# ------------------------------------------------------------------------------------- time
def test_missing_step_is_masked_and_time_of_day_is_local(tmp_path):
    ds = load_package(write_package(tmp_path, [["2012-03-01 00:00", "s1", 60], ["2012-03-01 00:05", "s1", 61],
                                               ["2012-03-01 00:15", "s1", 63]]))
    assert ds.num_steps == 4
    np.testing.assert_array_equal(ds.mask[:, 0, 0], [1, 1, 0, 1])
    np.testing.assert_array_equal(ds.values[:, 0, 0], [60, 61, 0, 63])
    assert [t.strftime("%H:%M") for t in ds.timestamps] == ["00:00", "00:05", "00:10", "00:15"]
    np.testing.assert_allclose(day_fraction(ds.timestamps[1:]), [0.003472, 0.006944, 0.010417], atol=5e-7)
    assert [p["code"] for p in ds.extra["problems"]] == ["gaps"]
    assert ds.extra["problems"][0]["timestamps"] == ["2012-03-01 00:10:00-08:00"]


def autumn_rows() -> list:
    """America/Los_Angeles 2012-11-04 00:00..02:55 local, 01:00..01:55 twice: 48 rows, value = row."""
    local = [f"2012-11-04 {h:02d}:{m:02d}" for h in (0, 1, 1, 2) for m in range(0, 60, 5)]
    return [[t, "s1", float(i)] for i, t in enumerate(local)]


def test_repeated_autumn_hour_is_resolved_by_order(tmp_path):
    ds = load_package(write_package(tmp_path, autumn_rows()))
    utc = ds.timestamps.tz_convert("UTC")
    assert ds.num_steps == 48 and utc.is_unique
    assert utc[0] == pd.Timestamp("2012-11-04 07:00Z") and utc[-1] == pd.Timestamp("2012-11-04 10:55Z")
    np.testing.assert_array_equal(ds.values[:, 0, 0], np.arange(48))  # no row lost, order kept
    assert ds.mask.sum() == 48 and ds.extra["problems"] == []
    # local wall-clock time of day: 01:30 PDT (row 18) and 01:30 PST (row 30) are both 0.0625
    np.testing.assert_allclose(day_fraction(ds.timestamps[[18, 30]]), [0.0625, 0.0625])


def test_spring_gap_is_not_invented(tmp_path):
    local = [f"2013-03-10 {h:02d}:{m:02d}" for h in (0, 1, 3) for m in range(0, 60, 5)]
    ds = load_package(write_package(tmp_path, [[t, "s1", 50.0 + i] for i, t in enumerate(local)]))
    assert ds.num_steps == 36 and ds.mask.sum() == 36
    assert (np.diff(ds.timestamps.asi8) == 300 * 10**9).all()
    assert ds.extra["problems"] == []


def test_offsets_and_z_are_converted_and_time_of_day_stays_local(tmp_path):
    offsets = [[pd.Timestamp(t, tz="America/Los_Angeles").isoformat(), s, v] for t, s, v in autumn_rows()[:12]]
    # mixed offsets across the change: the repeated hour written with -07:00 then -08:00
    utc = pd.date_range("2012-11-04 08:00Z", periods=24, freq="5min")
    mixed = [[t.tz_convert("America/Los_Angeles").isoformat(), "s1", float(12 + i)] for i, t in enumerate(utc)]
    ds = load_package(write_package(tmp_path / "a", offsets + mixed))
    assert ds.num_steps == 36 and ds.mask.sum() == 36
    np.testing.assert_array_equal(ds.values[:, 0, 0], np.arange(36))
    z = [["2012-11-04T08:00:00Z", "s1", 1.0], ["2012-11-04T08:05:00Z", "s1", 2.0]]
    dz = load_package(write_package(tmp_path / "b", z))
    np.testing.assert_allclose(day_fraction(dz.timestamps), [60 / 1440, 65 / 1440])  # 01:00 PDT, not 08:00 UTC
    assert dz.timestamps[0].hour == 1


def test_local_time_in_the_spring_gap_is_refused(tmp_path):
    with pytest.raises(TerritoryPackageError) as e:
        load_package(write_package(tmp_path, [["2013-03-10 01:55", "s1", 1], ["2013-03-10 02:30", "s1", 2]]))
    assert str(e.value).endswith("observations.csv: column 'timestamp': local time '2013-03-10 02:30' of sensor 's1' (data "
                                 "row 2; 1 such row(s)) does not exist in America/Los_Angeles: the clock skips that hour "
                                 "when summer time starts; fix: correct the stamp (e.g. an hour later), or write every "
                                 "stamp with its UTC offset")
    assert "argument" not in str(e.value)  # pandas' own sentence is not passed on


def test_mixed_naive_and_offset_stamps_name_file_and_fix(tmp_path):
    with pytest.raises(TerritoryPackageError, match=r"observations.csv: column 'timestamp'.*offset.*fix"):
        load_package(write_package(tmp_path, [["2012-03-01 00:00", "s1", 1], ["2012-03-01T00:05:00Z", "s1", 2]]))


def test_off_grid_stamp_is_refused(tmp_path):
    with pytest.raises(TerritoryPackageError, match=r"observations.csv: 1 row\(s\) with 1 distinct timestamp\(s\) are off "
                       r"the 5min grid that starts at 2012-03-01 00:00:00-08:00, e.g. '2012-03-01 00:07'; fix: resample"):
        load_package(write_package(tmp_path, [["2012-03-01 00:00", "s1", 1], ["2012-03-01 00:07", "s1", 2]]))


@pytest.mark.parametrize("rule, expected, mask", [("mean", 62.0, 1), ("first", 60.0, 1)])
def test_duplicate_rule(tmp_path, rule, expected, mask):
    rows = [["2012-03-01 00:00", "s1", 60], ["2012-03-01 00:00", "s1", 64], ["2012-03-01 00:00", "s1", -1],
            ["2012-03-01 00:05", "s1", ""], ["2012-03-01 00:05", "s1", 70]]
    ds = load_package(write_package(tmp_path, rows, duplicates=rule, missing_values=[-1]))
    np.testing.assert_array_equal(ds.values[:, 0, 0], [expected, 70.0])
    np.testing.assert_array_equal(ds.mask[:, 0, 0], [mask, 1])
    codes = [p["code"] for p in ds.extra["problems"]]
    assert codes == ["missing_values", "duplicates"]
    with pytest.raises(TerritoryPackageError, match=r"2 \(timestamp, sensor\) pair\(s\) occur more than once, e.g. sensor "
                       r"'s1' at '2012-03-01 00:00' in data rows 1, 2, 3; fix: .*duplicates: mean\|first"):
        load_package(write_package(tmp_path / "e", rows, missing_values=[-1]))


def test_markers_non_finite_and_out_of_range_are_masked_and_counted(tmp_path):
    rows = [["2012-03-01 00:00", "s1", -1], ["2012-03-01 00:05", "s1", 130], ["2012-03-01 00:10", "s1", "inf"],
            ["2012-03-01 00:15", "s1", "NaN"], ["2012-03-01 00:20", "s1", 0]]
    ds = load_package(write_package(tmp_path, rows, missing_values=[-1]))
    np.testing.assert_array_equal(ds.mask[:, 0, 0], [0, 0, 0, 0, 1])
    msgs = {p["code"]: p["message"] for p in ds.extra["problems"]}
    assert msgs["out_of_range"].startswith("1 speed value(s) outside the valid range 0 to 120 mph")
    assert msgs["missing_values"].startswith("2 speed cell(s)") and msgs["infinite"].startswith("1 infinite")
    with pytest.raises(TerritoryPackageError, match=r"column 'speed': 1 cell\(s\) are not numbers, e.g. 'fast'.*missing_values"):
        load_package(write_package(tmp_path / "b", [["2012-03-01 00:00", "s1", "fast"]]))


# ------------------------------------------------------------------------------------- sensors
def test_example_package_end_to_end():
    ds = load_package(EXAMPLE)
    assert ds.name == "example_madrid" and ds.values.shape == (292, 5, 1)  # 3 days + the repeated hour
    assert ds.node_ids.tolist() == ["0717804", "00", "A12", "0042", "B7"]
    assert ds.timestamps.tz.key == "Europe/Madrid" and str(ds.timestamps[0]) == "2024-10-25 00:00:00+02:00"
    assert str(ds.timestamps[-1]) == "2024-10-27 23:45:00+01:00"
    assert int((ds.mask == 0).sum()) == 4 + 1 + 5  # four -1 markers, one empty cell, one lost step x 5 sensors
    assert [p["code"] for p in ds.extra["problems"]] == ["missing_values", "gaps"]
    np.testing.assert_allclose(ds.coords[0], [40.415557, -3.704735], atol=1e-6)  # EPSG:25830 -> WGS84 (pyproj)
    assert ds.edge_index.shape[1] == 5 + 2 * 5  # self-loops + 5 undirected edges
    assert ds.units == ("vehicles/15min",) and ds.extra["licence"] == "CC0-1.0"


def test_sensor_ids_stay_text_through_every_layout(tmp_path):
    ids = ["0717804", "00"]
    wide = pd.DataFrame({"timestamp": ["2012-03-01 00:00", "2012-03-01 00:05"], "0717804": [1, 2], "00": [3, 4]})
    for fmt in ("csv", "parquet"):
        root = write_package(tmp_path / fmt, pd.DataFrame(), sensors=ids, edges=[["0717804", "00", 1.0]],
                             observations={"file": f"obs.{fmt}", "layout": "wide"})
        wide.to_csv(root / "obs.csv", index=False) if fmt == "csv" else wide.to_parquet(root / "obs.parquet")
        ds = load_package(root)
        assert ds.node_ids.tolist() == ids
        np.testing.assert_array_equal(ds.values[:, :, 0], [[1, 3], [2, 4]])
    long = pd.DataFrame({"timestamp": ["2012-03-01 00:00"] * 2, "sensor_id": ["00", "0717804"], "speed": [5, 6]})
    long.to_parquet(tmp_path / "l.parquet")
    root = write_package(tmp_path / "long", long, sensors=ids, observations={"file": "obs.parquet"})
    (tmp_path / "l.parquet").rename(root / "obs.parquet")
    np.testing.assert_array_equal(load_package(root).values[0, :, 0], [6, 5])
    long["sensor_id"] = [0, 717804]
    long.to_parquet(root / "obs.parquet")
    with pytest.raises(TerritoryPackageError, match=r"obs.parquet: column 'sensor_id' is int64, not text; fix"):
        load_package(root)


def test_sensor_sets_that_differ_follow_the_stated_rule(tmp_path):
    rows = [["2012-03-01 00:00", "a", 1], ["2012-03-01 00:00", "b", 2]]
    ds = load_package(write_package(tmp_path, rows, sensors=["a", "b", "c"], edges=[["a", "b", 1.0]]))
    assert ds.node_ids.tolist() == ["a", "b", "c"] and ds.mask[0, :, 0].tolist() == [1, 1, 0]
    problems = {p["code"]: p for p in ds.extra["problems"]}
    assert problems["sensor_without_data"]["sensors"] == ["c"]
    assert problems["isolated_sensor"]["sensors"] == ["c"]
    with pytest.raises(TerritoryPackageError, match=r"edges.csv: 1 of 2 edge\(s\) name sensor\(s\) not in sensors.csv: 'z' "
                       r"\(data row\(s\) 2\); fix"):
        load_package(write_package(tmp_path / "z", rows, sensors=["a", "b", "c"], edges=[["a", "b", 1.0], ["a", "z", 1.0]]))
    with pytest.raises(TerritoryPackageError, match=r"observations.csv: sensor\(s\) 'b' are not in sensors.csv; fix"):
        load_package(write_package(tmp_path / "x", rows, sensors=["a"]))


def test_manifest_errors_name_file_field_and_fix(tmp_path):
    root = write_package(tmp_path, [["2012-03-01 00:00", "s1", 1]], intervall="5min")
    with pytest.raises(TerritoryPackageError, match=r"territory.yaml: field 'intervall': unknown key \(did you mean 'interval'\?\); fix"):
        load_package(root)
    root = write_package(tmp_path / "b", [["2012-03-01 00:00", "s1", 1]], timezone="Mars/Olympus",
                         duplicates="max", observations={"file": "../secret.csv"})
    with pytest.raises(TerritoryPackageError) as e:
        load_package(root)
    assert "field 'timezone': 'Mars/Olympus' is not an IANA time zone" in str(e.value)
    assert "field 'duplicates'" in str(e.value)
    root = write_package(tmp_path / "d", [["2012-03-01 00:00", "s1", 1]], name="PedalMe London", license="MIT")
    with pytest.raises(TerritoryPackageError) as e:
        load_package(root)
    assert "field 'name': letters, digits, '_', '.' and '-' only (no spaces), at most 64 characters; fix" in str(e.value)
    assert "field 'license': unknown key (did you mean 'licence'?); fix" in str(e.value)
    root = write_package(tmp_path / "c", [["2012-03-01 00:00", "s1", 1]], observations={"file": "../secret.csv"})
    with pytest.raises(TerritoryPackageError, match=r"field 'observations.file': '../secret.csv' must be a file name inside"):
        load_package(root)


ROWS = ([[f"2012-03-01 00:{m:02d}", s, float(m + i)] for m in range(0, 60, 5) if m != 25 for i, s in enumerate("abc")]
        + [["2012-03-01 00:40", "b", 2.0], ["2012-03-01 00:10", "c", -1]])


@settings(max_examples=20, deadline=None)
@given(st.permutations(range(len(ROWS))))
def test_any_shuffle_of_rows_gives_the_same_grid_values_and_mask(order):
    with tempfile.TemporaryDirectory() as d:
        base = load_package(write_package(Path(d) / "a", ROWS, sensors=["a", "b", "c"], duplicates="mean",
                                          missing_values=[-1]))
        ds = load_package(write_package(Path(d) / "b", [ROWS[i] for i in order], sensors=["a", "b", "c"],
                                        duplicates="mean", missing_values=[-1]))
    assert ds.timestamps.equals(base.timestamps) and ds.num_steps == 12
    np.testing.assert_array_equal(ds.values, base.values)
    np.testing.assert_array_equal(ds.mask, base.mask)
    assert ds.mask[5].sum() == 0 and ds.values[8, 1, 0] == (41.0 + 2.0) / 2


# ------------------------------------------------------------------------------------- graphs
def two_node(edge_index, edge_weight) -> TerritoryDataset:
    return TerritoryDataset(name="g", values=np.zeros((2, 2, 1)), mask=np.ones((2, 2, 1)),
                            timestamps=pd.date_range("2012-03-01", periods=2, freq="5min"), node_ids=["0717804", "00"],
                            edge_index=torch.tensor(edge_index), edge_weight=torch.tensor(edge_weight))


def test_two_node_graph_gets_one_self_loop_each_and_entries_one_half():
    ds = two_node([[0, 0, 1], [0, 1, 0]], [1.0, 1.0, 1.0])  # adjacency [[1, 1], [1, 0]]
    assert self_loop_counts(ds.edge_index, 2).tolist() == [1, 1]
    np.testing.assert_array_equal(ds.adjacency(), [[1, 1], [1, 1]])
    norm = normalized_adjacency(ds.edge_index, ds.edge_weight, 2)
    assert list(norm) == ["sym"]
    np.testing.assert_allclose(norm["sym"].numpy(), np.full((2, 2), 0.5), rtol=1e-6)
    assert ds.node_ids.tolist() == ["0717804", "00"]


def test_self_loops_never_doubled_and_directed_graphs_use_random_walks():
    ei, ew = complete_self_loops(torch.tensor([[0, 0, 1, 0], [0, 0, 1, 1]]), torch.tensor([2.0, 4.0, 1.0, 1.0]), 2)
    assert ei.tolist() == [[0, 0, 1], [0, 1, 1]] and ew.tolist() == [3.0, 1.0, 1.0]  # repeated loop merged (mean)
    same = torch.tensor([[0, 1, 0], [0, 1, 1]]), torch.tensor([1.0, 1.0, 0.5])
    out = complete_self_loops(*same, 2)
    assert out[0] is same[0] and out[1] is same[1]  # already complete: unchanged, same order
    norm = normalized_adjacency(torch.tensor([[0], [1]]), torch.tensor([1.0]), 2)  # 0 -> 1 only
    assert sorted(norm) == ["forward", "reverse"]
    np.testing.assert_allclose(norm["forward"].numpy(), [[1.0, 0.0], [0.5, 0.5]])  # row = target, mean over in-edges
    np.testing.assert_allclose(norm["reverse"].numpy(), [[0.5, 0.5], [0.0, 1.0]])  # row = source, over out-edges


def test_builtin_los_loop_graph_is_unchanged_by_self_loop_completion(data_root):
    adj = pd.read_csv(data_root / "los_loop" / "los_adj.csv", header=None).to_numpy()
    assert (np.diag(adj) == 1).all()  # every sensor already has its one self-loop: the models see the same graph
    from torch_geometric.utils import dense_to_sparse

    ei, ew = dense_to_sparse(torch.from_numpy(adj).float())
    out = complete_self_loops(ei, ew, adj.shape[0])
    assert out[0] is ei and out[1] is ew


def test_covariates_and_a_knn_graph_from_coordinates(tmp_path):
    rows = [[f"2012-03-01 00:{m:02d}", s, 50.0] for m in (0, 5, 10) for s in ("a", "b", "c")]
    root = write_package(tmp_path, rows, sensors=["a", "b", "c"], graph={"method": "knn", "k": 1},
                         covariates={"file": "weather.csv", "columns": ["temp"]})
    pd.DataFrame({"timestamp": ["2012-03-01T08:10:00Z", "2012-03-01T08:00:00Z", "2012-03-01T08:05:00Z"],
                  "temp": [12.5, 11.0, 11.5]}).to_csv(root / "weather.csv", index=False)
    ds = load_package(root)
    np.testing.assert_array_equal(ds.extra["covariates"][:, 0], [11.0, 11.5, 12.5])  # put on the grid by time
    assert ds.extra["covariate_names"] == ["temp"]
    # sensors 0.01 deg of latitude apart on a line: each one's nearest neighbour is the next one
    np.testing.assert_array_equal(ds.adjacency() > 0, [[1, 1, 0], [1, 1, 1], [0, 1, 1]])
    pd.DataFrame({"timestamp": ["2012-03-01T08:00:00Z"], "temp": [11.0]}).to_csv(root / "weather.csv", index=False)
    with pytest.raises(TerritoryPackageError, match=r"weather.csv: no row for 2 step\(s\).*fix"):
        load_package(root)


def test_data_format_doc_shows_the_example_manifest_as_it_is():
    doc = (Path(__file__).parents[1] / "docs" / "data-format.md").read_text()
    shown = doc.split("`tests/data/territory_example/territory.yaml`:\n\n```yaml\n")[1].split("```")[0]
    real = "".join(line for line in (EXAMPLE / "territory.yaml").read_text().splitlines(True) if not line.startswith("#"))
    assert shown == real


# ------------------------------------------------------------------------------------- newcomer trial (s10)
def test_daily_and_weekly_local_midnights_follow_the_calendar_across_summer_time(tmp_path):
    days = pd.date_range("2020-03-27", "2020-04-01", freq="D")  # Europe/London: summer time from 2020-03-29 01:00 UTC
    rows = [[f"{d:%Y-%m-%d %H:%M}", "s1", float(i)] for i, d in enumerate(days) if i != 4]
    ds = load_package(write_package(tmp_path / "d", rows, tz="Europe/London", interval="1D"))
    assert ds.num_steps == 6 and ds.freq == pd.Timedelta("1D")
    np.testing.assert_array_equal(ds.mask[:, 0, 0], [1, 1, 1, 1, 0, 1])  # the missing day is masked, not dropped
    assert [t.strftime("%H:%M") for t in ds.timestamps] == ["00:00"] * 6  # local midnight every day
    assert [str(t) for t in ds.timestamps.tz_convert("UTC")[2:4]] == ["2020-03-29 00:00:00+00:00",
                                                                      "2020-03-29 23:00:00+00:00"]  # a 23-hour day
    assert [p["code"] for p in ds.extra["problems"]] == ["gaps"]
    assert ds.extra["problems"][0]["timestamps"] == ["2020-03-31 00:00:00+01:00"]
    weeks = [[f"{d:%Y-%m-%d}", "s1", 1.0 + i] for i, d in enumerate(pd.date_range("2020-10-12", periods=4, freq="7D"))]
    dw = load_package(write_package(tmp_path / "w", weeks, tz="Europe/London", interval="7D"))  # autumn: a 169-hour week
    assert dw.num_steps == 4 and dw.mask.sum() == 4 and dw.freq == pd.Timedelta("7D")
    assert np.diff(dw.timestamps.tz_convert("UTC").asi8).tolist() == [168 * 3600 * 10**9, 169 * 3600 * 10**9,
                                                                        168 * 3600 * 10**9]
    # only whole-day steps may follow the calendar: local hours 00:00, 01:00 (BST), 02:00 (GMT) are 1 h, 2 h apart
    hours = pd.DatetimeIndex(["2020-10-25 00:00", "2020-10-25 01:00", "2020-10-25 02:00"]).tz_localize(
        "Europe/London", ambiguous=np.array([True, True, False]))
    with pytest.raises(ValueError, match="fixed interval"):
        TerritoryDataset(name="h", values=np.zeros((3, 1, 1)), mask=np.ones((3, 1, 1)), timestamps=hours,
                         node_ids=["s1"], edge_index=torch.zeros((2, 0), dtype=torch.long), edge_weight=torch.zeros(0))


def test_off_calendar_stamps_are_quoted_as_written_with_consistent_counts_and_the_right_fix(tmp_path):
    stamps = ["2020-03-27 00:00", "2020-03-28 00:00", "2020-03-29 03:00", "2020-03-30 00:00"]
    rows = [[t, s, 1.0] for t in stamps for s in ("a", "b")]
    with pytest.raises(TerritoryPackageError) as e:
        load_package(write_package(tmp_path / "a", rows, tz="Europe/London", interval="1D", sensors=["a", "b"]))
    assert str(e.value).endswith(
        "observations.csv: 2 row(s) with 1 distinct timestamp(s) are off the 1D grid of local calendar days in "
        "Europe/London that starts at 2020-03-27 00:00 local time, e.g. '2020-03-29 03:00'; fix: give every stamp the "
        "same local time of day (e.g. 00:00), or correct 'interval'")
    utc_days = [[f"{d:%Y-%m-%dT%H:%MZ}", "a", 1.0] for d in pd.date_range("2020-03-27", periods=4, freq="D")]
    with pytest.raises(TerritoryPackageError, match=r"1 row\(s\) with 1 distinct timestamp\(s\) are off .* e.g. "
                       r"'2020-03-30T00:00Z'; fix: the stamps are regular in UTC but not in "
                       r"Europe/London local time: if the days are UTC days, set timezone: UTC"):
        load_package(write_package(tmp_path / "b", utc_days, tz="Europe/London", interval="1D", sensors=["a"]))


def test_unknown_ids_are_refused_with_a_did_you_mean_hint(tmp_path):
    rows = [["2012-03-01 00:00", s, 1.0] for s in ("00", "01", "A")]
    edges = [["0", "01", 0.5], ["01", "A", 0.5], ["A", "Z", 0.5], ["1", "A", 0.5]]
    with pytest.raises(TerritoryPackageError) as e:
        load_package(write_package(tmp_path / "e", rows, sensors=["00", "01", "A"], edges=edges))
    assert str(e.value).endswith(
        "edges.csv: 3 of 4 edge(s) name sensor(s) not in sensors.csv: '0' (did you mean '00'?), '1' (did you mean "
        "'01'?), 'Z' (data row(s) 1, 3, 4); fix: write the ids exactly as in sensors.csv (as text, leading zeros kept), "
        "or remove those edges")
    with pytest.raises(TerritoryPackageError, match=r"observations.csv: sensor\(s\) '1' \(did you mean '01'\?\), "
                       r"'A ' \(did you mean 'A'\?\) are not in sensors.csv; fix"):
        load_package(write_package(tmp_path / "o", [["2012-03-01 00:00", "1", 1.0], ["2012-03-01 00:00", "A ", 1.0]],
                                   sensors=["00", "01", "A"]))
    root = write_package(tmp_path / "s", rows, sensors=["00", "01", "A"])
    (root / "sensors.csv").write_text("sensor_id,latitude,longitude\n00,34,-118\n01 ,34.01,-118\nA,34.02,-118\n")
    with pytest.raises(TerritoryPackageError, match=r"sensors.csv: column 'sensor_id' has spaces around the id in data "
                       r"row\(s\) 2, e.g. '01 '; fix: remove the spaces"):
        load_package(root)


def test_distance_weights_go_through_the_gaussian_kernel_and_large_similarities_are_flagged(tmp_path):
    rows = [["2012-03-01 00:00", s, 1.0] for s in "abc"]
    km = [["a", "b", 1.0], ["b", "c", 3.0]]
    ds = load_package(write_package(tmp_path / "s", rows, sensors=list("abc"), edges=km,
                                    graph={"edges": "edges.csv", "weight_kind": "distance", "sigma_km": 2.0}))
    adj = ds.adjacency()  # undirected (directed false by default); exp(-(1/2)^2), exp(-(3/2)^2) >= 0.1
    np.testing.assert_allclose(adj, [[1, np.exp(-0.25), 0], [np.exp(-0.25), 1, np.exp(-2.25)], [0, np.exp(-2.25), 1]],
                               rtol=1e-6)
    ds = load_package(write_package(tmp_path / "d", rows, sensors=list("abc"), edges=km,
                                    graph={"edges": "edges.csv", "weight_kind": "distance"}))
    # sigma = std of the listed distances = 1: exp(-1) kept, exp(-9) < threshold 0.1 left out
    np.testing.assert_allclose(ds.adjacency(), [[1, np.exp(-1), 0], [np.exp(-1), 1, 0], [0, 0, 1]], rtol=1e-6)
    ds = load_package(write_package(tmp_path / "m", rows, sensors=list("abc"), edges=[["a", "b", 1991.3]]))
    flagged = [p for p in ds.extra["problems"] if p["code"] == "weights_above_one"]
    assert flagged[0]["severity"] == "warning" and "1991" not in flagged[0]["message"]  # no data in the message
    assert flagged[0]["message"].startswith("1 of 1 edge weight(s) of edges.csv exceed 1") and \
        flagged[0]["message"].endswith("set graph.weight_kind: distance (km)")
    with pytest.raises(TerritoryPackageError, match=r"field 'graph': edges is set, so \['k', 'method'\] would be "
                       r"ignored: give edges, or \['k', 'method'\] \(a graph built from the coordinates\), not both; fix"):
        load_package(write_package(tmp_path / "k", rows, sensors=list("abc"), edges=km,
                                   graph={"edges": "edges.csv", "method": "knn", "k": 3}))


def test_file_errors_name_the_place_and_the_fix(tmp_path):
    rows = [["2012-03-01 00:00", "s1", 1.0]]
    root = write_package(tmp_path / "y", rows)
    (root / "territory.yaml").write_text("name: t\ninterval: 5min\nchannels:\n  - name: x\n   unit: y\n")
    with pytest.raises(TerritoryPackageError, match=r"territory.yaml: line 5, column 4: not valid YAML: .*; fix: correct "
                       r"the syntax at that place"):
        load_package(root)
    (root / "territory.yaml").write_text("name: t\n\tinterval: 5min\n")
    with pytest.raises(TerritoryPackageError, match=r"line 2, column 1: not valid YAML: .* \(tabs are not allowed in YAML "
                       r"indentation: use spaces\); fix"):
        load_package(root)
    (root / "territory.yaml").write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(TerritoryPackageError, match=r"line 1, column 7: YAML tags \(!!...\) are not allowed"):
        load_package(root)
    root = write_package(tmp_path / "semi", rows)
    (root / "observations.csv").write_text("timestamp;sensor_id;speed\n2012-03-01 00:00;s1;1,5\n")
    with pytest.raises(TerritoryPackageError, match=r"observations.csv: the header is separated by semicolons, not "
                       r"commas; fix: save it as a comma-separated CSV with '.' as the decimal point"):
        load_package(root)
    root = write_package(tmp_path / "latin", rows)
    (root / "sensors.csv").write_bytes("sensor_id,latitude,longitude,road\ns1,34,-118,Caf\xe9\n".encode("latin-1"))
    with pytest.raises(TerritoryPackageError, match=r"sensors.csv: not UTF-8 \(line 2 of the file holds byte 0xe9.*; "
                       r"fix: save the file as UTF-8"):
        load_package(root)
    root = write_package(tmp_path / "wide", pd.DataFrame(), sensors=["00", "01"], observations={"layout": "wide"})
    (root / "observations.csv").write_text("timestamp,00,01,00\n2012-03-01 00:00,1,2,3\n")
    with pytest.raises(TerritoryPackageError, match=r"observations.csv: column\(s\) '00' appear more than once in the "
                       r"header; fix"):
        load_package(root)


def test_covariate_and_range_messages_name_the_step_and_read_well(tmp_path):
    rows = [[f"2012-03-01 00:{m:02d}", "s1", 50.0] for m in (0, 5, 10)]
    root = write_package(tmp_path / "c", rows, covariates={"file": "weather.csv", "columns": ["temp"]})
    pd.DataFrame({"timestamp": ["2012-03-01 00:00", "2012-03-01 00:05", "2012-03-01 00:10"],
                  "temp": ["11", "", "12"]}).to_csv(root / "weather.csv", index=False)
    with pytest.raises(TerritoryPackageError, match=r"weather.csv: column 'temp' is missing or not finite at 1 step\(s\), "
                       r"e.g. '2012-03-01 00:05:00-08:00' \(data row\(s\) 2\); fix"):
        load_package(root)
    channels = [{"name": "speed", "unit": "transformed demand (z-score)", "type": "integer", "min": None}]
    ds = load_package(write_package(tmp_path / "r", [["2012-03-01 00:00", "s1", -0.5], ["2012-03-01 00:05", "s1", -2]],
                                    channels=channels))
    msgs = {p["code"]: p["message"] for p in ds.extra["problems"]}
    assert msgs["out_of_range"] == "1 speed value(s) outside the valid range any whole number: masked"
    assert "negative_values" not in msgs  # min: null declares that negative values are intended


# ---------------------------------------------------------------------------------- outages
def test_constant_runs_known_answer():
    from fedldt.data.checks import constant_runs

    v = np.array([5, 5, 5, 5, 1, 2, 2, 0, 0, 0], dtype=np.float32)[:, None, None]
    m = np.ones_like(v)
    assert constant_runs(v, m, 2)[:, 0, 0].tolist() == [1, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    m[2] = 0  # a masked step ends a run: 5 5 | 5 5 are two runs of two
    assert constant_runs(v, m, 2)[:, 0, 0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("masked", [False, True])
def test_runs_longer_than_max_constant_are_suspected_outages(tmp_path, masked):
    # hourly: 4 h of 5 mph (longer than 2 h), then 1, 2, 2, then 3 h of zeros (also longer)
    series = [5, 5, 5, 5, 1, 2, 2, 0, 0, 0]
    rows = [[f"2012-03-01 {h:02d}:00", "s1", x] for h, x in enumerate(series)]
    ds = load_package(write_package(tmp_path, rows, interval="1h",
                                    outages={"max_constant": "2h", "mask": masked}))
    (p,) = [p for p in ds.extra["problems"] if p["code"] == "suspected_outage"]
    assert p["severity"] == "warning" and p["sensors"] == ["s1"] and p["message"].startswith("7 valid speed value(s)")
    expected = [0, 0, 0, 0, 1, 1, 1, 0, 0, 0] if masked else [1] * 10
    assert ds.mask[:, 0, 0].tolist() == expected
    np.testing.assert_array_equal(ds.values[:, 0, 0], series)  # values kept as read; only the mask changes


def test_outages_need_a_duration(tmp_path):
    with pytest.raises(TerritoryPackageError, match="max_constant"):
        load_package(write_package(tmp_path, [["2012-03-01 00:00", "s1", 1]], interval="1h",
                                   outages={"max_constant": "often"}))
