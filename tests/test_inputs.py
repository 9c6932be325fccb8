"""Plausible inputs only: declared valid ranges, cell checks, strict JSON and CSV reading (no model needed)."""

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from fedldt.config import checkout_root
from fedldt.data import load_los_loop
from fedldt.data.ranges import FLOAT32_MAX, ValidRange, check_data, parse_valid_ranges
from fedldt.delivery.observations import (
    InputError, NotANumber, cell_value, load_json, read_csv_table, select_window, table_from_columns,
)

SPEED = ValidRange(0.0, 120.0)
IDS = ["a", "b", "c"]
TIMES = [f"2012-03-07T10:{m:02d}:00" for m in (0, 5, 10, 15)]


def table(**cells) -> pd.DataFrame:
    """4 steps x sensors a, b, c of 50 mph (object cells), with ``cells`` = {"b2": value} set (sensor b, step 2)."""
    t = pd.DataFrame(50.0, index=TIMES, columns=IDS).astype(object)
    for key, v in cells.items():
        t.loc[TIMES[int(key[1:])], key[0]] = v
    return t


def window(t, **kw):
    return select_window(t, IDS, 4, pd.Timedelta("5min"), valid_range=SPEED, unit="mph", **kw)


# ------------------------------------------------------------------ declared ranges

def test_dataset_configs_declare_ranges_that_hold_for_the_real_data(data_root):
    los = yaml.safe_load((checkout_root() / "conf" / "dataset" / "los_loop.yaml").read_text())["valid_range"]
    assert parse_valid_ranges(los) == {"speed": ValidRange(0.0, 120.0, "number")}
    ev = parse_valid_ranges(yaml.safe_load((checkout_root() / "conf" / "dataset" / "charged_ev.yaml").read_text())["valid_range"])
    assert ev["energy"] == ValidRange(0.0, None) and ev["humidity"] == ValidRange(0.0, 100.0)
    assert set(ev) == {"energy", "temp", "humidity", "precip", "windspeed", "cloudcover", "solarradiation"}
    ds = load_los_loop(data_root / "los_loop", valid_range=los)  # 1..70 mph: inside
    assert ds.values.max() == 70.0
    above = int((pd.read_csv(data_root / "los_loop" / "los_speed.csv").to_numpy() > 60).sum())
    first = pd.read_csv(data_root / "los_loop" / "los_speed.csv").iloc[0, 0]  # 64.375 mph, sensor 0 at step 0
    with pytest.raises(ValueError, match=rf"los_speed.csv: speed value {first:g} at index \(0, 0\) is outside the "
                                         rf"declared valid_range 0 to 60 mph \({above} such value\(s\)\)"):
        load_los_loop(data_root / "los_loop", valid_range={"speed": {"min": 0, "max": 60}})
    with pytest.raises(ValueError, match=r"\['flow'\] are not channels of Los-loop"):
        load_los_loop(data_root / "los_loop", valid_range={"flow": {"min": 0}})


def test_valid_range_declarations_are_checked():
    r = parse_valid_ranges({"count": {"min": 0, "type": "integer"}})["count"]
    assert (r.min, r.max, r.type) == (0.0, None, "integer")
    assert r.problem(3.0) is None and r.problem(-1.0, "veh") == "outside the valid range at least 0 veh (whole numbers)"
    assert r.problem(2.5) == "not a whole number (this channel counts)"
    assert SPEED.describe("mph") == "0 to 120 mph" and ValidRange().describe() == "any number"
    assert SPEED.violations(np.array([-0.1, 0.0, 120.0, 120.5, np.nan])).tolist() == [True, False, False, True, False]
    for spec, msg in [({"speed": {"min": 5, "max": 1}}, "min 5 > max 1"),
                      ({"speed": {"min": "0"}}, r"speed.min: '0' is not a finite number"),
                      ({"speed": {"max": float("inf")}}, "speed.max: inf is not a finite number"),
                      ({"speed": {"min": True}}, "speed.min: True is not a finite number"),
                      ({"speed": {"lo": 0}}, r"unknown key\(s\) \['lo'\]"),
                      ({"speed": {"type": "float"}}, "speed.type: 'float' must be one of"),
                      ({"speed": 5}, "expected {min"), ([1], "expected a mapping")]:
        with pytest.raises(ValueError, match=msg):
            parse_valid_ranges(spec)
    with pytest.raises(ValueError, match=r"x: energy value -1 at index \(1, 0\) .* at least 0 kWh \(1 such value"):
        check_data(np.array([[[2.0]], [[-1.0]]]), None, ["energy"], {"energy": ValidRange(0.0)}, "x", ["kWh"])
    check_data(np.array([[[-5.0]]]), np.zeros((1, 1, 1)), ["energy"], {"energy": ValidRange(0.0)}, "x")  # unobserved


# ------------------------------------------------------------------ cells

@pytest.mark.parametrize("cell, expected", [
    (61.5, (61.5, None)), (7, (7.0, None)), (" 61.5 ", (61.5, None)), ("-3e2", (-300.0, None)),
    (None, (None, None)), (float("nan"), (None, None)), ("", (None, None)), ("NA", (None, None)), ("nan", (None, None)),
    (True, (None, "a boolean, not a number")), (np.bool_(False), (None, "a boolean, not a number")),
    ("fast", (None, "not a number")), ("1,5", (None, "not a number")), ([1.0], (None, "a list, not a number")),
    ({"v": 1}, (None, "an object, not a number")), (NotANumber('"61"', "a string"), (None, "a string, not a number")),
    (float("inf"), (None, "infinite")), ("-inf", (None, "infinite")), (1e300, (None, "beyond float32's range, about 3.4e38")),
    ("1e39", (None, "beyond float32's range, about 3.4e38")), (10 ** 4000, (None, "beyond float32's range, about 3.4e38")),
    (FLOAT32_MAX, (FLOAT32_MAX, None)), (-(10 ** 38), (-1e38, None)),
])
def test_cell_value(cell, expected):
    value, problem = cell_value(cell)
    assert problem == expected[1]
    assert np.isnan(value) if expected[0] is None else value == expected[0]


def test_implausible_values_are_refused_naming_sensor_and_timestamp():
    cases = [(1e300, "1e+300 (beyond float32's range, about 3.4e38)"), (-1000.0, "-1000 (outside the valid range 0 to 120 mph)"),
             (1e6, "1e+06 (outside the valid range 0 to 120 mph)"), (True, "True (a boolean, not a number)"),
             ("fast", "'fast' (not a number)"), (10 ** 400, "an integer of 401 digits (beyond float32's range, about 3.4e38)"),
             (float("-inf"), "-inf (infinite)"), (NotANumber("true", "a boolean"), "true (a boolean, not a number)")]
    for value, shown in cases:
        with pytest.raises(InputError) as e:
            window(table(b2=value))
        assert str(e.value).startswith(f"invalid value(s) in the 4 most recent steps: sensor b at 2012-03-07 10:10:00: {shown}; "
                                       "send plausible observations (0 to 120 mph, null or an empty cell for a missing one), "
                                       "or mask invalid values (--invalid mask)")
    with pytest.raises(InputError, match=r"sensor a at 2012-03-07 10:00:00: -1 .*, sensor c at 2012-03-07 10:15:00: 121 "):
        window(table(c3=121.0, a0=-1.0))  # listed in time order
    assert window(table(b2=0.0, c3=120.0)).values[2, 1, 0] == 0.0  # the bounds are valid


def test_mask_policy_masks_and_counts_invalid_values():
    win = window(table(b2=1e300, b3="fast", c0=-5.0), invalid="mask")
    assert win.invalid == {"b": 2, "c": 1} and win.missing == {} and win.unavailable == {}
    assert win.mask[:, :, 0].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 1], [1, 0, 1]]
    assert win.values[2, 1, 0] == 0.0 and win.values[0, 0, 0] == 50.0
    # missing values still need allow_missing, under either policy
    with pytest.raises(InputError, match=r"missing value\(s\) \(NaN or empty\) .*: a at 2012-03-07 10:05:00; "):
        window(table(b2=1e300, a1=None), invalid="mask")
    with pytest.raises(ValueError, match="invalid='drop' must be one of"):
        window(table(), invalid="drop")


def test_all_missing_windows_are_refused_and_unobserved_sensors_have_no_forecast():
    empty = table(**{f"{s}{i}": None for s in IDS for i in range(4)})
    with pytest.raises(InputError, match=r"^no valid observation in the 4 most recent steps: every value is missing or invalid"):
        window(empty, allow_missing=True)
    with pytest.raises(InputError, match="^no valid observation"):
        window(table(**{f"{s}{i}": -1.0 for s in IDS for i in range(4)}), invalid="mask")
    win = window(table(**{f"b{i}": None for i in range(4)}), allow_missing=True)
    assert win.unavailable == {"b": "no valid observation of this sensor in the 4 most recent steps"}
    assert win.missing == {"b": 4}


def test_json_cells_are_kept_for_the_window_check():
    t = table_from_columns(TIMES[:2], {"a": [1, None], "b": ["61", True], "c": [[1], {"x": 1}]})
    assert t.loc[TIMES[0], "a"] == 1 and isinstance(t.loc[TIMES[0], "a"], int) and np.isnan(t.loc[TIMES[1], "a"])
    assert t.loc[TIMES[0], "b"] == NotANumber('"61"', "a string") and t.loc[TIMES[1], "b"] == NotANumber("true", "a boolean")
    assert t.loc[TIMES[0], "c"] == NotANumber("a list", "a list") and t.loc[TIMES[1], "c"] == NotANumber("an object", "an object")


# ------------------------------------------------------------------ files and JSON text

def test_csv_with_byte_order_mark_reads_like_without(tmp_path):
    text = "timestamp,717804,773869\n2012-03-07 10:00,61.5,\n2012-03-07 10:05,60.0,58.25\n"
    (tmp_path / "plain.csv").write_bytes(text.encode())
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    plain, bom = read_csv_table(tmp_path / "plain.csv"), read_csv_table(tmp_path / "bom.csv")
    pd.testing.assert_frame_equal(plain, bom)
    assert list(bom.columns) == ["717804", "773869"] and bom.index.name == "timestamp"
    assert bom.loc["2012-03-07 10:05", "773869"] == "58.25" and np.isnan(bom.loc["2012-03-07 10:00", "773869"])


def test_unreadable_files_give_messages(tmp_path):
    cases = {
        "bin.csv": (b"timestamp,a\n\x00\x01\x02", r"bin.csv: a binary file, not CSV text"),
        "latin.csv": ("timestamp,caf\xe9\n".encode("latin-1"), r"latin.csv: not UTF-8 text \(byte 13, b'\\xe9'\); save the CSV as UTF-8"),
        "empty.csv": (b"", r"empty.csv: no 'timestamp' column"),
        "quote.csv": (b'timestamp,a\n"2012-03-07 10:00,1\n', r"quote.csv: not a readable CSV table"),
    }
    for name, (content, msg) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError, match=msg):
            read_csv_table(tmp_path / name)
    with pytest.raises(InputError, match=r"cannot read input file .*nope.csv: No such file"):
        read_csv_table(tmp_path / "nope.csv")


def test_json_text_is_decoded_strictly():
    assert load_json(b"\xef\xbb\xbf{\"a\": [1, null]}", "x") == {"a": [1, None]}
    assert load_json("[" * 32 + "]" * 32, "x") == eval("[" * 32 + "]" * 32)
    big = int("7" * 4000)
    assert load_json(str(big), "x") == big  # parsed exactly; the window check refuses it
    for text, msg in [("[" * 33 + "]" * 33, "x: JSON nested more than 32 levels deep"),
                      ("[" * 100_000, "x: JSON nested more than 32 levels deep"),
                      ("7" * 5000, r"x: not valid JSON \(Exceeds the limit \(4300 digits\)"),
                      ("[NaN]", r"x: not valid JSON \(NaN is not a JSON number; send null for a missing value\)"),
                      ("[-Infinity]", r"not valid JSON \(-Infinity is not a JSON number"),
                      (b"\xff{}", r"x: not UTF-8 text \(byte 0\)"), ("{not json", r"x: not valid JSON \(Expecting property name")]:
        with pytest.raises(InputError, match=msg):
            load_json(text, "x")
    assert json.dumps(load_json("[1e400]", "x")) == "[Infinity]"  # decoded as inf: the window check refuses it
    assert cell_value(load_json("[1e400]", "x")[0])[1] == "infinite"
