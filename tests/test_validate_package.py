"""``fedldt validate PACKAGE_DIR [--json]`` (issue 12, item 4): the loader's checks as a report."""

from __future__ import annotations

import json

import pandas as pd

from fedldt.cli import main
from tests.test_territory_package import EXAMPLE, write_package


def run(capsys, *argv) -> tuple[int, str]:
    code = main(["validate", *map(str, argv)])
    return code, capsys.readouterr().out


def test_example_package_is_usable_with_exact_report(capsys):
    code, out = run(capsys, EXAMPLE, "--json")
    report = json.loads(out)
    assert code == 0 and report["usable"] is True
    assert (report["num_sensors"], report["num_steps"], report["interval"]) == (5, 292, "15min")
    assert report["coverage"] == round(1 - 10 / (292 * 5), 6) == 0.993151  # 5 masked cells + 1 lost step x 5
    assert [p["code"] for p in report["problems"]] == ["missing_values", "gaps"]
    assert set(report["problems"][0]) == {"code", "severity", "message", "sensors", "timestamps"}
    code, text = run(capsys, EXAMPLE)
    assert code == 0 and text.splitlines()[0].endswith(": usable")
    assert "  [warning] gaps: 1 of 292 step(s) have no row at all: masked" in text.splitlines()


def test_zero_constant_and_short_data_make_it_unusable(tmp_path, capsys):
    times = [f"2012-03-01 00:{m:02d}" for m in range(0, 60, 5)]
    rows = [[t, s, v] for i, t in enumerate(times) for s, v in (("moving", 50.0 + i), ("zero", 0.0), ("stuck", 7.0))]
    root = write_package(tmp_path, rows, sensors=["moving", "zero", "stuck"])
    code, out = run(capsys, root, "--json", "--window", "3", "--horizon", "3")
    report = json.loads(out)
    assert code == 1 and report["usable"] is False and report["num_steps"] == 12
    by_code = {p["code"]: p for p in report["problems"]}
    assert by_code["all_zero_sensor"]["sensors"] == ["zero"] and by_code["constant_sensor"]["sensors"] == ["stuck"]
    assert by_code["too_little_history"]["severity"] == "error"
    assert by_code["too_little_history"]["message"].startswith("the val part has 2 steps, fewer than window+horizon=6")


def test_unreadable_package_reports_file_field_and_fix(tmp_path, capsys):
    root = write_package(tmp_path, pd.DataFrame({"timestamp": ["2012-03-01 00:00"], "sensor_id": ["s1"], "speed": [1]}),
                         interval="often")
    code, out = run(capsys, root, "--json")
    report = json.loads(out)
    assert code == 1 and report["num_steps"] is None and [p["code"] for p in report["problems"]] == ["unreadable"]
    assert "territory.yaml: field 'interval': 'often' is not a duration; write it like 5min" in report["problems"][0]["message"]


def test_low_coverage_is_an_error_below_ten_percent_and_a_warning_below_half(tmp_path, capsys):
    times = [f"2012-03-01 {h:02d}:{m:02d}" for h in range(2) for m in range(0, 60, 5)]  # 24 steps
    rows = [[t, "s1", 50.0 + i if i % 20 == 0 else -1] for i, t in enumerate(times)]  # 2 of 24 valid: 8.33 %
    root = write_package(tmp_path / "low", rows, missing_values=[-1])
    code, out = run(capsys, root, "--json", "--window", "1", "--horizon", "1")
    low = [p for p in json.loads(out)["problems"] if p["code"] == "low_coverage"]
    assert code == 1 and low[0]["severity"] == "error"
    assert low[0]["message"].startswith("only 8.33 % of the values are valid (mask 1); below 10 % the package is not "
                                        "usable, below 50 % it is reported; fix:")
    rows = [[t, "s1", 50.0 + i if i % 3 == 0 else -1] for i, t in enumerate(times)]  # 8 of 24 valid: 33.33 %
    code, out = run(capsys, write_package(tmp_path / "some", rows, missing_values=[-1]), "--json", "--window", "1",
                    "--horizon", "1")
    low = [p for p in json.loads(out)["problems"] if p["code"] == "low_coverage"]
    assert code == 0 and low[0]["severity"] == "warning" and low[0]["message"].startswith("only 33.33 %")


def test_split_option_changes_the_history_check(tmp_path, capsys):
    times = [f"2012-03-01 {h:02d}:{m:02d}" for h in range(2) for m in range(0, 60, 5)]  # 24 steps
    root = write_package(tmp_path, [[t, "s1", 50.0 + i] for i, t in enumerate(times)])
    code, out = run(capsys, root, "--json", "--window", "3", "--horizon", "1")  # val part 0.1 x 24 = 2 steps < 4
    short = [p["message"] for p in json.loads(out)["problems"] if p["code"] == "too_little_history"]
    assert code == 1 and short == ["the val part has 2 steps, fewer than window+horizon=4: lengthen the series, change "
                                   "split.ratios (fedldt validate --split) or shorten window/horizon"]
    code, out = run(capsys, root, "--json", "--window", "3", "--horizon", "1", "--split", "0.5", "0.25", "0.25")
    assert code == 0 and json.loads(out)["usable"] is True
    assert run(capsys, root, "--split", "0.5", "0.5", "0.5")[0] == 2


def test_one_run_reports_every_fault_of_the_observations_and_the_edges(tmp_path, capsys):
    rows = [["2012-03-01 00:00", "a", 1], ["2012-03-01 00:00", "a", 2], ["2012-03-01 00:05", "q", 3],
            ["2012-03-01 00:10", "b", "N/A"]]
    root = write_package(tmp_path, rows, sensors=["a", "b"], edges=[["a", "z", 0.5]])
    code, out = run(capsys, root, "--json")
    messages = [p["message"] for p in json.loads(out)["problems"]]
    assert code == 1 and len(messages) == 4
    assert [m.split(": ", 1)[1][:40] for m in messages] == [
        "sensor(s) 'q' are not in sensors.csv; fi", "column 'speed': 1 cell(s) are not number",
        "1 (timestamp, sensor) pair(s) occur more", "1 of 1 edge(s) name sensor(s) not in sen"]
    assert [m.split(": ", 1)[0].rsplit("/", 1)[1] for m in messages] == ["observations.csv"] * 3 + ["edges.csv"]
