"""Hostile inputs found by the issue-10 review (fast, no model needed): what `fedldt predict` and
the forecast service read from a CSV or JSON file before any model runs."""

from pathlib import Path

import numpy as np
import pytest

from fedldt.delivery.observations import InputError, cell_value, load_json, parse_timestamps, read_csv_table

HEADER = "timestamp,a,b\n"


def csv_file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "obs.csv"
    p.write_text(text, encoding="utf-8")
    return p


def test_json_repeating_a_key_is_refused_naming_it():
    # json.loads keeps the last value silently: sensor "a" would lose its first series
    with pytest.raises(InputError) as e:
        load_json('{"timestamps": ["2012-03-07T10:00"], "sensors": {"a": [50], "b": [1], "a": [1]}}', "obs.json")
    assert str(e.value) == ("obs.json: not valid JSON (key(s) a appear more than once in one object; "
                            "give each key once)")
    with pytest.raises(InputError, match=r"key\(s\) timestamps appear more than once"):
        load_json(b'{"timestamps": [], "timestamps": ["2012-03-07T10:00"]}', "request body")
    assert load_json('{"a": {"a": 1}, "b": [{"a": 2}]}', "x") == {"a": {"a": 1}, "b": [{"a": 2}]}  # nesting is fine


@pytest.mark.parametrize("rows, message", [
    # one field too many in every row: pandas would take the first column as index and shift
    # every value under the next sensor's name
    ("2012-03-07T10:00,50,51,52\n2012-03-07T10:05,50,51,52\n", "line 2 has 4 field(s), the header 3"),
    ("2012-03-07T10:00,50,51\n2012-03-07T10:05,50\n", "line 3 has 2 field(s), the header 3"),
])
def test_csv_rows_must_have_as_many_fields_as_the_header(tmp_path, rows, message):
    p = csv_file(tmp_path, HEADER + rows)
    with pytest.raises(InputError) as e:
        read_csv_table(p)
    assert str(e.value) == f"{p}: {message}; give every row one value (or an empty cell) per column"


def test_csv_blank_lines_are_skipped_and_quoted_ids_read_plain(tmp_path):
    t = read_csv_table(csv_file(tmp_path, 'timestamp,"a","b"\n\n2012-03-07T10:00,50,51\n\n'))
    assert list(t.columns) == ["a", "b"] and t.loc["2012-03-07T10:00"].tolist() == ["50", "51"]


def test_csv_with_an_unnamed_column_or_an_unclosed_quote_is_refused(tmp_path):
    p = csv_file(tmp_path, "timestamp,a,\n2012-03-07T10:00,50,51\n")
    with pytest.raises(InputError) as e:
        read_csv_table(p)
    assert str(e.value) == (f"{p}: column(s) 3 of the header have no name; name each sensor's column by its "
                            "sensor id (or remove the empty column)")
    p = csv_file(tmp_path, HEADER + '2012-03-07T10:00,"50,51\n2012-03-07T10:05,50,51\n')
    with pytest.raises(InputError) as e:
        read_csv_table(p)
    assert str(e.value) == f"{p}: not a readable CSV table (unexpected end of data)"


@pytest.mark.parametrize("text", ["5_0", "\u0665\u0660", "\uff15\uff10", "0x10", "50,5", "1e", "--5", "5..0", "١"])
def test_text_cells_must_be_plain_ascii_decimals(text):
    # float() reads "5_0" as 50 and Arabic-Indic or full-width digits as numbers
    value, problem = cell_value(text)
    assert np.isnan(value) and problem == "not a number"


@pytest.mark.parametrize("text, expected", [
    ("50", 50.0), (" 50 ", 50.0), ("\u00a050", 50.0), ("-0.0", 0.0), ("+1e2", 100.0), (".5", 0.5), ("5.", 5.0),
    ("1E-3", 0.001),
])
def test_plain_decimals_still_read(text, expected):
    assert cell_value(text) == (expected, None)


@pytest.mark.parametrize("text", ["inf", "-Infinity", "+INF"])
def test_infinite_text_is_refused_as_infinite(text):
    value, problem = cell_value(text)
    assert np.isnan(value) and problem == "infinite"


@pytest.mark.parametrize("word", ["now", "today", "NaT", "nat", "NaN", "1e300", "tomorrow"])
def test_timestamps_pandas_would_read_as_words_are_refused(word):
    # pandas.to_datetime(format="ISO8601") reads "now"/"today" as the current time and "NaT"/"NaN" as NaT
    with pytest.raises(InputError) as e:
        parse_timestamps(["2012-03-07T10:00", word], "column 'timestamp' of obs.csv")
    assert str(e.value) == (f"column 'timestamp' of obs.csv: {word} not ISO 8601 date-time(s); "
                            "write them like 2012-03-07T10:05:00")


def test_a_timestamp_out_of_range_gets_one_message_not_two():
    with pytest.raises(InputError) as e:
        parse_timestamps(["2012-03-07T10:00", "9999-01-01"])
    assert str(e.value) == ("timestamps: timestamp(s) 9999-01-01 are not between the years 1900 and 2200; "
                            "check the dates")


# ----------------------------------------------------------------------------- model packages

def small_package(tmp_path: Path) -> Path:
    from tests.test_package_integrity import write_small_package

    return write_small_package(tmp_path / "pkg")


def test_a_manifest_repeating_a_key_is_refused(tmp_path):
    """json.loads keeps the last of two "task" keys: a reviewer reading the first one would
    see other units than the forecasts use."""
    import json

    from fedldt.delivery.package import MANIFEST, PackageError, check_package

    root = small_package(tmp_path)
    text = (root / MANIFEST).read_text()
    shown = dict(json.loads(text)["task"], units=["km/h"])
    (root / MANIFEST).write_text(text.replace("{", '{"task": ' + json.dumps(shown) + ",", 1))
    with pytest.raises(PackageError) as e:
        check_package(root)
    assert str(e.value) == (f"{root / MANIFEST}: not valid JSON (key(s) task appear more than once in one object; "
                            "give each key once); re-export the package")


@pytest.mark.parametrize("field, value, message", [
    ("horizon", 10 ** 12, "task.horizon = '1000000000000' is not a whole number from 1 to 100000"),
    ("window", 0, "task.window = '0' is not a whole number from 1 to 100000"),
    ("window", True, "task.window = 'True' is not a whole number from 1 to 100000"),
    ("window", "12", "task.window = '12' is not a whole number from 1 to 100000"),
    ("interval_s", -300, "task.interval_s = '-300' is not a whole number from 1 to 31622400"),
    ("interval_s", 1e308, "task.interval_s = '1e+308' is not a whole number from 1 to 31622400"),
    ("timezone", "../../etc/passwd", "task.timezone = '../../etc/passwd' is not an IANA time zone name"),
    ("units", [], "task.channels and task.units must be lists of names of the same length"),
])
def test_a_resealed_manifest_with_impossible_task_fields_is_refused(tmp_path, field, value, message):
    """An unsigned package can be re-sealed by whoever rewrites it; its task fields must still be
    what export writes (a horizon of 10**12 made every forecast exhaust memory, window 0 or an
    interval of 1e308 gave tracebacks)."""
    import json

    from fedldt.delivery.package import MANIFEST, PackageError, check_package, seal_manifest

    root = small_package(tmp_path)
    m = json.loads((root / MANIFEST).read_text())
    m["task"][field] = value
    (root / MANIFEST).write_text(json.dumps(seal_manifest(m)))
    with pytest.raises(PackageError) as e:
        check_package(root)
    assert str(e.value) == f"{root / MANIFEST}: {message}; re-export the package"


# ----------------------------------------------------------------------------- egress

def test_an_exception_class_made_at_run_time_cannot_carry_data_in_its_name():
    from fedldt.egress import error_reason

    leaky = type("Sensor_773869_at_20120307T1005_read_61_4mph", (ValueError,), {})
    assert error_reason(leaky("text")) == "ValueError [fedldt-100]"
    leaky_base = type("S773869_61mph", (Exception,), {})
    assert error_reason(type("Inner", (leaky_base,), {})("x")) == "Exception [fedldt-100]"
    assert error_reason(KeyError("a")) == "KeyError [fedldt-100]"
    from fedldt.delivery.observations import InputError
    assert error_reason(InputError("sensor 773869 at 10:05: 61.4")) == "InputError [fedldt-100]"


def test_a_metric_int_beyond_float_range_is_refused_with_the_metric_code():
    # math.isfinite(10**400) raises OverflowError: the reply became "OverflowError [fedldt-100]"
    from fedldt.egress import Code, EgressRefused, _check_value

    with pytest.raises(EgressRefused) as e:
        _check_value(10 ** 400, float, "train reply", "train_loss")
    assert e.value.code == Code.METRIC_VALUE
    assert e.value.detail == "train reply: 'train_loss' must be finite and >= 0"


def test_a_package_folder_named_tilde_is_read_where_it_was_checked(tmp_path, monkeypatch):
    """pandas expands a leading "~" of a path: the package ./~ was checked, then its nodes.csv
    read from the home folder (FileNotFoundError traceback after `fedldt export --out "~"`)."""
    import json

    import torch

    from fedldt.delivery.package import (
        EDGES, MANIFEST, NODES, ForecastPackage, PackageError, graph_hash, seal_manifest,
    )
    from tests.test_package_integrity import write_small_package

    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # holds no nodes.csv
    monkeypatch.chdir(tmp_path)
    root = write_small_package(tmp_path / "~")
    m = json.loads((root / MANIFEST).read_text())
    m["graph_hash"] = graph_hash(["773869"], torch.tensor([[0], [0]]), torch.tensor([1.0]))
    (root / MANIFEST).write_text(json.dumps(seal_manifest(m)))
    assert (root / NODES).is_file() and (root / EDGES).is_file()
    with pytest.raises(PackageError) as e:  # nodes, edges and scaler read and checked: the model config fails next
        ForecastPackage.load("~")
    assert str(e.value).startswith("~/package.json: model_config: ")
