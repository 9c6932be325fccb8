"""Latest observations of a territory's sensors: reading them and checking them against a model.

A forecast needs, for every sensor of the territory, the ``window`` most recent values at the
data's fixed interval. Observations arrive as a table — a :class:`pandas.DataFrame` whose index
holds the timestamps and whose columns are sensor ids (read from a CSV file, from the JSON
``{"timestamps": [...], "sensors": {...}}`` form, or from NGSI-LD entities, see
:mod:`fedldt.delivery.ngsi`) — and :func:`select_window` turns the table into the model's input
arrays, matching columns by sensor id (never by position) and refusing, with a message naming
what is wrong, anything that would give a silently wrong forecast.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from fedldt.data.ranges import FLOAT32_MAX, ValidRange

#: At most this many offending items (sensors, timestamps) are listed in one error message.
MAX_LISTED = 8
#: Items quoted in messages (sensor ids, values, parser errors) are cut to this many characters.
MAX_SHOWN = 80
#: What to do with implausible observations (see :func:`select_window`): refuse them, or feed them
#: to the model as masked (missing) entries and say so.
INVALID_POLICIES = ("error", "mask")
#: Timestamps outside these years are refused (they are typing errors, and forecast times must
#: stay representable).
YEARS = (1900, 2200)
#: JSON inputs nested deeper than this are refused (NGSI-LD entities need about 6 levels).
MAX_JSON_DEPTH = 32
#: Text cells read as missing values.
MISSING_TEXT = frozenset({"", "NaN", "nan", "NA"})
#: A number written in a text cell: ASCII digits, one optional sign, point and exponent (what a
#: spreadsheet or ``to_csv`` writes). Python's ``float()`` also reads ``5_0`` (50), Arabic-Indic
#: or full-width digits and surrounding Unicode spaces; those are refused, not guessed.
PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
#: Text spellings of infinity that ``float()`` reads (refused as "infinite", not as "not a number").
INFINITE_TEXT = re.compile(r"[+-]?(?:inf|infinity)", re.IGNORECASE)
#: An ISO 8601 date-time starts with a four-digit year (pandas also reads "now", "today", "NaT").
ISO_START = re.compile(r"[0-9]{4}")


class InputError(ValueError):
    """Observations that cannot give a correct forecast; the message names the field, the
    sensor or timestamp at fault, and what to change."""


def _short(text: Any, limit: int = MAX_SHOWN) -> str:
    """``text`` on one line (control characters escaped), cut to ``limit`` characters."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _listing(items: Sequence, limit: int = MAX_LISTED, width: int = MAX_SHOWN) -> str:
    shown = ", ".join(_short(i, width) for i in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@dataclass(frozen=True)
class NotANumber:
    """A JSON cell that is not a number or ``null`` (a string, a boolean, a list, an object):
    kept as is by :func:`table_from_columns` so that :func:`select_window` refuses it, naming the
    sensor and timestamp (or masks it under ``invalid="mask"``)."""

    shown: str
    kind: str


def _json_kind(v: Any) -> str:
    return {bool: "a boolean", str: "a string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for :func:`json.loads` that refuses an object repeating a key
    (``json.loads`` silently keeps the last one: a sensor given twice would lose one of its
    series, a manifest field given twice would hide one of its values).

    Raises:
        ValueError: naming the repeated key(s).
    """
    out = dict(pairs)
    if len(out) != len(pairs):
        keys = [k for k, _ in pairs]
        dups = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key(s) {_listing(dups, width=40)} appear more than once in one object; give each key once")
    return out


def load_json(data: bytes | str, where: str) -> Any:
    """Decode JSON text strictly: UTF-8 (a byte-order mark is allowed), no ``NaN``/``Infinity``
    literals, no integers of more than 4300 digits, no object repeating a key (e.g. a sensor id
    twice in ``sensors``), nesting within Python's recursion limit.

    Raises:
        InputError: the text is not such JSON (where and why, briefly).
    """
    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number; send null for a missing value")

    try:
        text = data.decode("utf-8-sig") if isinstance(data, (bytes, bytearray)) else data.removeprefix("\ufeff")
        value = json.loads(text, parse_constant=no_constant, object_pairs_hook=unique_keys)
    except UnicodeDecodeError as e:
        raise InputError(f"{where}: not UTF-8 text (byte {e.start}); send JSON encoded as UTF-8") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, huge integers, NaN/Infinity
        raise InputError(f"{where}: not valid JSON ({_short(e, 200)})") from None
    level: list[Any] = [value]
    for _ in range(MAX_JSON_DEPTH):  # breadth-first, one level of containers per pass, without recursion
        level = [c for x in level if isinstance(x, (dict, list)) for c in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return value
    raise InputError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")


def parse_timestamps(values: Iterable, where: str = "timestamps") -> pd.DatetimeIndex:
    """Parse ISO 8601 timestamps (``2012-03-07 10:05``, ``2012-03-07T10:05:00-08:00``, ``...Z``).

    All timestamps must either carry a UTC offset or not carry one; offsets may differ
    (e.g. across a daylight-saving change): such values are returned in UTC.

    Args:
        values: strings (or datetime-likes), one per time step.
        where: what the values are, for error messages (e.g. ``"column 'timestamp' of obs.csv"``).

    Returns:
        A naive or tz-aware ``DatetimeIndex`` in the input order.

    Raises:
        InputError: a value is empty or not ISO 8601, or offsets are given for some values only.
    """
    if isinstance(values, pd.DatetimeIndex):
        return values
    values = list(values)
    empty = [i for i, v in enumerate(values) if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == ""]
    if empty:
        raise InputError(f"{where}: empty timestamp at position(s) {_listing(empty)}")
    odd = [str(v) for v in values if isinstance(v, str) and not ISO_START.match(v.strip())]
    if odd:  # pandas reads "now", "today", "NaT" as times
        raise InputError(f"{where}: {_listing(odd)} not ISO 8601 date-time(s); write them like 2012-03-07T10:05:00")
    try:
        times = pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601"))
    except (ValueError, TypeError, OverflowError) as e:
        if "Mixed timezones" not in str(e):
            raise InputError(f"{where}: not ISO 8601 date-times ({_short(str(e).splitlines()[0], 200)}); "
                             "write them like 2012-03-07T10:05:00") from None
    else:
        return _plausible_years(times, where)
    stamps = [pd.Timestamp(v) for v in values]
    naive = [str(v) for v, s in zip(values, stamps) if s.tzinfo is None]
    if naive:
        raise InputError(f"{where}: some timestamps have a UTC offset and some ({_listing(naive)}) have none; "
                         "give all of them an offset (or none)")
    return _plausible_years(pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601", utc=True)), where)


def _plausible_years(times: pd.DatetimeIndex, where: str) -> pd.DatetimeIndex:
    bad = times[(times.year < YEARS[0]) | (times.year >= YEARS[1])]
    if len(bad):
        raise InputError(f"{where}: timestamp(s) {_listing(bad.astype(str))} are not between the years "
                         f"{YEARS[0]} and {YEARS[1]}; check the dates")
    return times


def localize(times: pd.DatetimeIndex, timezone: str | None, where: str = "timestamps") -> pd.DatetimeIndex:
    """Bring timestamps into the model package's time convention.

    Args:
        times: parsed timestamps, naive or tz-aware.
        timezone: the package's IANA time zone (e.g. ``"America/Los_Angeles"``), or ``None``
            when the training data's timestamps were naive local times of unknown zone.

    Returns:
        Naive timestamps when ``timezone`` is ``None``; otherwise tz-aware timestamps in
        ``timezone`` (naive inputs are read as local times of that zone).

    Raises:
        InputError: offsets are given but the package has no time zone, or a naive local time
            does not exist or is ambiguous in ``timezone`` (daylight-saving change).
    """
    if timezone is None:
        if times.tz is not None:
            raise InputError(
                f"{where} carry a UTC offset, but this model package has no time zone: its model was trained on "
                "naive local times. Send local times without offset, or export the package with --timezone"
            )
        return times
    if times.tz is None:
        try:
            return times.tz_localize(timezone, ambiguous="raise", nonexistent="raise")
        except Exception as e:  # pytz/zoneinfo errors for DST gaps and folds
            raise InputError(f"{where}: local time {e} in time zone {timezone}; send timestamps with a UTC offset") from None
    return times.tz_convert(timezone)


def wall_clock(times: pd.DatetimeIndex) -> pd.DatetimeIndex:
    """Naive local wall-clock times (what the calendar covariates are computed from)."""
    return times if times.tz is None else times.tz_localize(None)


def read_csv_table(path: str | Path, time_column: str = "timestamp") -> pd.DataFrame:
    """Read a CSV of observations: a time column plus one column per sensor id.

    The file must be UTF-8 text; a UTF-8 byte-order mark before the header is ignored (the file
    reads exactly as without it). Empty cells (and ``NaN``, ``nan``, ``NA``) become NaN (missing).
    Sensor ids are read as text (``717804`` stays ``"717804"``).

    Args:
        path: the CSV file.
        time_column: name of the timestamp column.

    Returns:
        A table: index = timestamps as text (parsed later), columns = sensor ids, values as read.

    Raises:
        InputError: the file is unreadable, binary or not UTF-8, not CSV, has no ``time_column``,
            repeats a column name, has a column without a name, or a row whose number of fields
            differs from the header's (named by line number).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read input file {path}: {e.strerror}") from None
    if b"\x00" in raw:
        raise InputError(f"{path}: a binary file, not CSV text; export the observations as UTF-8 CSV")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}, {raw[e.start:e.start + 1]!r}); "
                         "save the CSV as UTF-8") from None
    try:
        rows = csv.reader(io.StringIO(text, newline=""), strict=True)
        header = [h.strip() for h in next(rows, [])]
        unnamed = [i + 1 for i, h in enumerate(header) if not h]
        if unnamed and header:
            raise InputError(f"{path}: column(s) {_listing(unnamed)} of the header have no name; name each sensor's "
                             "column by its sensor id (or remove the empty column)")
        for row in rows:  # pandas would shift a row with an extra field under the wrong sensors
            if row and len(row) != len(header):
                raise InputError(f"{path}: line {rows.line_num} has {len(row)} field(s), the header {len(header)}; "
                                 "give every row one value (or an empty cell) per column")
        dups = sorted({h for h in header if header.count(h) > 1})
        if dups:
            raise InputError(f"{path}: column(s) {_listing(dups)} appear more than once; give each sensor one column")
        if time_column not in header:
            raise InputError(f"{path}: no '{time_column}' column (columns: {_listing(header)}); "
                             f"name the time column '{time_column}' or pass --time-column")
        table = pd.read_csv(io.StringIO(text, newline=""), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (csv.Error, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise InputError(f"{path}: not a readable CSV table ({_short(e, 200)})") from None
    table.columns = [str(c).strip() for c in table.columns]
    table = table.set_index(time_column)
    return table.replace({t: np.nan for t in MISSING_TEXT})


def table_from_columns(timestamps: Sequence, sensors: dict[str, Sequence]) -> pd.DataFrame:
    """A table from the JSON column form ``{"timestamps": [...], "sensors": {"id": [...]}}``.

    ``null`` values become NaN (missing); numbers are kept as they are (a Python ``int`` of any
    size stays an ``int``); anything else (a string, a boolean, a list, an object) becomes a
    :class:`NotANumber`, which :func:`select_window` refuses (or masks) naming sensor and time.

    Raises:
        InputError: a sensor's list is not as long as ``timestamps``.
    """
    n = len(timestamps)
    wrong = [f"{s} has {len(v)}" for s, v in sensors.items() if len(v) != n]
    if wrong:
        raise InputError(f"sensors: {_listing(wrong)} value(s) for {n} timestamps; give one value (or null) per timestamp")

    def cell(v: Any) -> Any:
        if v is None:
            return np.nan
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
        return NotANumber(_short(json.dumps(v) if isinstance(v, (str, bool)) else _json_kind(v), 40), _json_kind(v))

    data = {str(s): [cell(v) for v in vals] for s, vals in sensors.items()}
    return pd.DataFrame(data, index=pd.Index(list(timestamps), dtype=object), dtype=object)


@dataclass
class InputWindow:
    """The model input of one forecast, in the package's node order.

    Attributes:
        values: ``[window, node, channel]`` float32 observations in data units; missing entries 0.
        mask: ``[window, node, channel]`` float32, 1 = observed, 0 = missing (only with
            ``allow_missing``) or masked as invalid (only with ``invalid="mask"``); otherwise all ones.
        times: ``[window]`` timestamps (tz-aware in the package's time zone, or naive).
        missing: sensor id -> number of missing values in the window (only sensors with some).
        invalid: sensor id -> number of implausible values masked (``invalid="mask"``; only sensors with some).
        unavailable: sensor id -> why no forecast of it can be made (no valid value in the window).
    """

    values: np.ndarray
    mask: np.ndarray
    times: pd.DatetimeIndex
    missing: dict[str, int] = field(default_factory=dict)
    invalid: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def cell_value(v: Any) -> tuple[float, str | None]:
    """One observation as a float64, or why it is not a plausible number.

    Returns:
        ``(value, problem)``: ``(x, None)`` for a number within float32's range; ``(nan, None)``
        for a missing value (``None``, NaN, an empty or ``NaN``/``nan``/``NA`` text cell);
        ``(nan, reason)`` for a boolean, text that is not a plain ASCII decimal number
        (:data:`PLAIN_NUMBER`: ``5_0``, ``0x10``, non-ASCII digits are refused), any other
        object, an infinite value or one beyond float32's range (about 3.4e38). Integers of any size are
        compared exactly, never converted first.
    """
    if v is None:
        return np.nan, None
    if isinstance(v, NotANumber):
        return np.nan, f"{v.kind}, not a number"
    if isinstance(v, (bool, np.bool_)):
        return np.nan, "a boolean, not a number"
    if isinstance(v, (int, np.integer)):
        if abs(int(v)) > FLOAT32_MAX:
            return np.nan, "beyond float32's range, about 3.4e38"
        return float(v), None
    if isinstance(v, str):
        text = v.strip()
        if text in MISSING_TEXT:
            return np.nan, None
        if INFINITE_TEXT.fullmatch(text):
            return np.nan, "infinite"
        if not PLAIN_NUMBER.fullmatch(text):
            return np.nan, "not a number"
        v = float(text)
    if isinstance(v, (float, np.floating)):
        x = float(v)
        if np.isnan(x):
            return np.nan, None
        if np.isinf(x):
            return np.nan, "infinite"
        if abs(x) > FLOAT32_MAX:
            return np.nan, "beyond float32's range, about 3.4e38"
        return x, None
    return np.nan, f"{_json_kind(v)}, not a number"


def _shown(v: Any) -> str:
    if isinstance(v, NotANumber):
        return v.shown
    if isinstance(v, (float, np.floating)):
        return f"{float(v):g}"
    if isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        text = str(v) if abs(int(v)) < 10 ** 30 else f"an integer of {len(str(abs(int(v))))} digits"
        return _short(text, 40)
    if isinstance(v, (str, bool, np.bool_)):
        return _short(repr(v), 40)
    return _json_kind(v)


def select_window(
    table: pd.DataFrame,
    node_ids: Sequence[str],
    window: int,
    interval: pd.Timedelta,
    timezone: str | None = None,
    allow_missing: bool = False,
    territory: str = "?",
    valid_range: ValidRange | None = None,
    unit: str = "",
    invalid: str = "error",
) -> InputWindow:
    """Check observations against a model and take the ``window`` most recent steps.

    Columns are matched to the model's sensors by id, so their order does not matter; rows
    are sorted by time. Only the ``window`` most recent rows are used (older rows are ignored).

    A value in the window is *invalid* when it is not a number (text, a boolean, a list...),
    infinite, beyond float32's range, or outside ``valid_range``; *missing* when it is NaN,
    ``None`` or an empty cell.

    Args:
        table: index = timestamps (text or datetime), columns = sensor ids, one channel.
        node_ids: the model's sensor ids in node order.
        window: steps the model reads.
        interval: the data's fixed sampling interval.
        timezone: see :func:`localize`.
        allow_missing: treat missing values in the window as masked entries (mask 0, the model
            input is value x mask as in training) instead of refusing them.
        territory: territory id, for messages.
        valid_range: plausible values of the channel (data units), from the package; ``None`` =
            only float32's range.
        unit: the channel's unit, for messages.
        invalid: ``"error"`` refuses invalid values; ``"mask"`` feeds them to the model as masked
            entries and counts them in :attr:`InputWindow.invalid`.

    Returns:
        An :class:`InputWindow` in ``node_ids`` order. A sensor with no valid value in the window
        is listed in :attr:`InputWindow.unavailable` (it has no forecast).

    Raises:
        InputError: an unknown or missing sensor, a repeated timestamp, fewer than ``window``
            steps, steps not ``interval`` apart, an invalid value (``invalid="error"``, each
            named with sensor and timestamp), a missing value without ``allow_missing``, or no
            valid value at all in the window.
        ValueError: ``invalid`` is not one of :data:`INVALID_POLICIES`.
    """
    if invalid not in INVALID_POLICIES:
        raise ValueError(f"invalid={invalid!r} must be one of {INVALID_POLICIES}")
    cols = [str(c) for c in table.columns]
    if len(set(cols)) != len(cols):
        raise InputError(f"sensor(s) {_listing(sorted({c for c in cols if cols.count(c) > 1}))} given more than once")
    known = set(node_ids)
    unknown = [c for c in cols if c not in known]
    if unknown:
        raise InputError(f"unknown sensor id(s) {_listing(unknown)}: not among the {len(node_ids)} sensors of "
                         f"territory {territory} (see nodes.csv of the model package); remove them")
    have = set(cols)
    absent = [s for s in node_ids if s not in have]
    if absent:
        raise InputError(f"missing sensor(s) {_listing(absent)}: the model of territory {territory} needs a value "
                         f"for each of its {len(node_ids)} sensors at every step")
    times = localize(parse_timestamps(table.index), timezone)
    if times.has_duplicates:
        raise InputError(f"timestamp(s) {_listing(times[times.duplicated()].astype(str))} appear more than once")
    if len(times) < window:
        raise InputError(f"{len(times)} time step(s) given; the model needs the {window} most recent steps, "
                         f"{_fmt_interval(interval)} apart")
    order = np.argsort(times.asi8, kind="stable")[-window:]
    times = times[order]
    gaps = times[1:] - times[:-1]
    bad = np.flatnonzero(gaps != interval)
    if bad.size:
        i = int(bad[0])
        raise InputError(
            f"the {window} most recent steps must be {_fmt_interval(interval)} apart (the model's data interval), "
            f"but {times[i]} -> {times[i + 1]} is {_fmt_interval(gaps[i])}; resample the observations to "
            f"{_fmt_interval(interval)} or fill the gap"
        )
    rows = table.iloc[order]
    values = np.empty((window, len(node_ids)), dtype=np.float64)
    problems: list[tuple[int, int, str]] = []  # (step, node, "value (why)")
    for j, s in enumerate(node_ids):
        for i, v in enumerate(rows[s].tolist()):
            x, why = cell_value(v)
            if why is None and not np.isnan(x) and valid_range is not None:
                why = valid_range.problem(x, unit)
                x = np.nan if why else x
            values[i, j] = x
            if why:
                problems.append((i, j, f"{_shown(v)} ({why})"))
    if problems and invalid == "error":
        where = [f"sensor {node_ids[j]} at {times[i]}: {what}" for i, j, what in sorted(problems)]
        allowed = valid_range.describe(unit) if valid_range is not None else "finite numbers"
        raise InputError(
            f"invalid value(s) in the {window} most recent steps: {_listing(where, width=200)}; send plausible "
            "observations "
            f"({allowed}, null or an empty cell for a missing one), or mask invalid values "
            "(--invalid mask) to feed them to the model as missing entries"
        )
    flagged = np.zeros(values.shape, dtype=bool)
    for i, j, _ in problems:
        flagged[i, j] = True
    nan = np.isnan(values)
    gaps_only = nan & ~flagged
    missing = {node_ids[j]: int(gaps_only[:, j].sum()) for j in np.flatnonzero(gaps_only.any(axis=0))}
    if missing and not allow_missing:
        where = [f"{node_ids[j]} at {times[i]}" for i, j in zip(*np.nonzero(gaps_only))]
        raise InputError(
            f"missing value(s) (NaN or empty) in the {window} most recent steps: {_listing(where)}; "
            "send complete observations, or allow missing values (--allow-missing, \"allow_missing\": true) "
            "to feed them to the model as masked entries"
        )
    if nan.all():
        raise InputError(f"no valid observation in the {window} most recent steps: every value is missing or invalid; "
                         "no forecast can be made")
    masked = {node_ids[j]: int(flagged[:, j].sum()) for j in np.flatnonzero(flagged.any(axis=0))}
    unavailable = {node_ids[j]: f"no valid observation of this sensor in the {window} most recent steps"
                   for j in np.flatnonzero(nan.all(axis=0))}
    mask = (~nan).astype(np.float32)[:, :, None]
    values = np.where(nan, 0.0, values).astype(np.float32)[:, :, None]
    return InputWindow(values=values, mask=mask, times=times, missing=missing, invalid=masked, unavailable=unavailable)


def _fmt_interval(delta: pd.Timedelta) -> str:
    """``5min``, ``1h``, ``90s`` ..."""
    delta = pd.Timedelta(delta)
    secs = delta.total_seconds()
    if secs > 0 and secs % 3600 == 0:
        return f"{int(secs // 3600)}h"
    if secs > 0 and secs % 60 == 0:
        return f"{int(secs // 60)}min"
    return str(delta)
