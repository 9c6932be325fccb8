"""Latest observations of a territory's sensors: reading them and checking them against a model.

A forecast needs, for every sensor of the territory, the ``window`` most recent values at the
data's fixed interval. Observations arrive as a table — a :class:`pandas.DataFrame` whose index
holds the timestamps and whose columns are sensor ids (read from a CSV file, from the JSON
``{"timestamps": [...], "sensors": {...}}`` form, or from NGSI-LD entities, see
:mod:`fedldt.deploy.ngsi`) — and :func:`select_window` turns the table into the model's input
arrays, matching columns by sensor id (never by position) and refusing, with a message naming
what is wrong, anything that would give a silently wrong forecast.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

#: At most this many offending items (sensors, timestamps) are listed in one error message.
MAX_LISTED = 8


class InputError(ValueError):
    """Observations that cannot give a correct forecast; the message names the field, the
    sensor or timestamp at fault, and what to change."""


def _listing(items: Sequence, limit: int = MAX_LISTED) -> str:
    shown = ", ".join(str(i) for i in list(items)[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


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
    try:
        return pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601"))
    except (ValueError, TypeError) as e:
        if "Mixed timezones" not in str(e):
            raise InputError(f"{where}: not ISO 8601 date-times ({e}); write them like 2012-03-07T10:05:00") from None
    stamps = [pd.Timestamp(v) for v in values]
    naive = [str(v) for v, s in zip(values, stamps) if s.tzinfo is None]
    if naive:
        raise InputError(f"{where}: some timestamps have a UTC offset and some ({_listing(naive)}) have none; "
                         "give all of them an offset (or none)")
    return pd.DatetimeIndex(pd.to_datetime(values, format="ISO8601", utc=True))


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

    Empty cells become NaN (missing). Sensor ids are read as text (``717804`` stays ``"717804"``).

    Args:
        path: the CSV file.
        time_column: name of the timestamp column.

    Returns:
        A table: index = timestamps as text (parsed later), columns = sensor ids, values as read.

    Raises:
        InputError: the file is unreadable, has no ``time_column`` or repeats a column name.
    """
    path = Path(path)
    try:
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
    except OSError as e:
        raise InputError(f"cannot read input file {path}: {e.strerror}") from None
    header = [h.strip() for h in header]
    dups = sorted({h for h in header if header.count(h) > 1})
    if dups:
        raise InputError(f"{path}: column(s) {_listing(dups)} appear more than once; give each sensor one column")
    if time_column not in header:
        raise InputError(f"{path}: no '{time_column}' column (columns: {_listing(header)}); "
                         f"name the time column '{time_column}' or pass --time-column")
    table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    table = table.set_index(time_column)
    return table.replace({"": np.nan, "NaN": np.nan, "nan": np.nan, "NA": np.nan})


def table_from_columns(timestamps: Sequence, sensors: dict[str, Sequence]) -> pd.DataFrame:
    """A table from the JSON column form ``{"timestamps": [...], "sensors": {"id": [...]}}``.

    ``null`` values become NaN (missing).

    Raises:
        InputError: a sensor's list is not as long as ``timestamps``.
    """
    n = len(timestamps)
    wrong = [f"{s} has {len(v)}" for s, v in sensors.items() if len(v) != n]
    if wrong:
        raise InputError(f"sensors: {_listing(wrong)} value(s) for {n} timestamps; give one value (or null) per timestamp")
    data = {str(s): [np.nan if v is None else v for v in vals] for s, vals in sensors.items()}
    return pd.DataFrame(data, index=pd.Index(list(timestamps), dtype=object))


@dataclass
class InputWindow:
    """The model input of one forecast, in the package's node order.

    Attributes:
        values: ``[window, node, channel]`` float32 observations in data units; missing entries 0.
        mask: ``[window, node, channel]`` float32, 1 = observed, 0 = missing (only with
            ``allow_missing``; otherwise all ones).
        times: ``[window]`` timestamps (tz-aware in the package's time zone, or naive).
        missing: sensor id -> number of missing values in the window (only sensors with some).
    """

    values: np.ndarray
    mask: np.ndarray
    times: pd.DatetimeIndex
    missing: dict[str, int] = field(default_factory=dict)


def select_window(
    table: pd.DataFrame,
    node_ids: Sequence[str],
    window: int,
    interval: pd.Timedelta,
    timezone: str | None = None,
    allow_missing: bool = False,
    territory: str = "?",
) -> InputWindow:
    """Check observations against a model and take the ``window`` most recent steps.

    Columns are matched to the model's sensors by id, so their order does not matter; rows
    are sorted by time. Only the ``window`` most recent rows are used (older rows are ignored).

    Args:
        table: index = timestamps (text or datetime), columns = sensor ids, one channel.
        node_ids: the model's sensor ids in node order.
        window: steps the model reads.
        interval: the data's fixed sampling interval.
        timezone: see :func:`localize`.
        allow_missing: treat NaN (or empty) values in the window as missing (mask 0, the model
            input is value x mask as in training) instead of refusing them.
        territory: territory id, for messages.

    Returns:
        An :class:`InputWindow` in ``node_ids`` order.

    Raises:
        InputError: an unknown or missing sensor, a repeated timestamp, fewer than ``window``
            steps, steps not ``interval`` apart, a non-numeric or infinite value, or NaN in the
            window without ``allow_missing``.
    """
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
    for j, s in enumerate(node_ids):
        try:
            values[:, j] = pd.to_numeric(rows[s], errors="raise").to_numpy(dtype=np.float64)
        except (ValueError, TypeError) as e:
            raise InputError(f"sensor {s}: non-numeric value in the {window} most recent steps ({e})") from None
    if np.isinf(values).any():
        j = int(np.flatnonzero(np.isinf(values).any(axis=0))[0])
        raise InputError(f"sensor {node_ids[j]}: infinite value in the {window} most recent steps")
    nan = np.isnan(values)
    missing = {node_ids[j]: int(nan[:, j].sum()) for j in np.flatnonzero(nan.any(axis=0))}
    if missing and not allow_missing:
        where = [f"{node_ids[j]} at {times[i]}" for i, j in zip(*np.nonzero(nan))]
        raise InputError(
            f"missing value(s) (NaN or empty) in the {window} most recent steps: {_listing(where)}; "
            "send complete observations, or allow missing values (--allow-missing, \"allow_missing\": true) "
            "to feed them to the model as masked entries"
        )
    mask = (~nan).astype(np.float32)[:, :, None]
    values = np.where(nan, 0.0, values).astype(np.float32)[:, :, None]
    return InputWindow(values=values, mask=mask, times=times, missing=missing)


def _fmt_interval(delta: pd.Timedelta) -> str:
    """``5min``, ``1h``, ``90s`` ..."""
    delta = pd.Timedelta(delta)
    secs = delta.total_seconds()
    if secs > 0 and secs % 3600 == 0:
        return f"{int(secs // 3600)}h"
    if secs > 0 and secs % 60 == 0:
        return f"{int(secs // 60)}min"
    return str(delta)
