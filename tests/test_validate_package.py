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
