"""Data-quality checks of a territory's data, shared by the package loader and ``fedldt validate``.

A problem is a JSON-able dict ``{code, severity, message, sensors, timestamps}``: ``code`` a
fixed identifier (the only part meant to leave a territory), ``severity`` ``error`` (the data is
not usable for training), ``warning`` or ``info``, ``message`` a sentence for the territory's
operator, ``sensors``/``timestamps`` at most :data:`MAX_LISTED` examples as text.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import pandas as pd

from fedldt.data.territory import TerritoryDataset
from fedldt.data.windows import split_bounds, window_starts

#: At most this many sensors or timestamps are named in one problem.
MAX_LISTED = 8
SEVERITIES = ("error", "warning", "info")


def problem(problems: list, code: str, severity: str, message: str, sensors: Iterable = (),
            timestamps: Iterable = ()) -> None:
    """Append one problem to ``problems`` (sensors and timestamps cut to :data:`MAX_LISTED`, as text)."""
    assert severity in SEVERITIES, severity
    problems.append({"code": code, "severity": severity, "message": message,
                     "sensors": [str(s) for s in list(sensors)[:MAX_LISTED]],
                     "timestamps": [str(t) for t in list(timestamps)[:MAX_LISTED]]})


def dataset_problems(ds: TerritoryDataset) -> list[dict[str, Any]]:
    """Checks of loaded data (values ``[time, node, channel]`` and mask), per sensor and channel.

    * ``no_valid_data`` (error): not one valid value in the whole dataset;
    * ``all_zero_sensor`` (warning): a sensor whose valid values of a channel are all 0 (an
      outage written as zeros, or a sensor that never counts anything);
    * ``constant_sensor`` (warning): a sensor whose (at least two) valid values of a channel are
      all the same non-zero number (a stuck sensor);
    * ``negative_values`` (info): valid negative values in a channel without a declared minimum
      (a package channel that writes ``min: null`` declares that negative values are intended).
    """
    out: list[dict[str, Any]] = []
    if ds.mask.sum() == 0:
        problem(out, "no_valid_data", "error", "the data holds no valid value at all")
        return out
    declared = ds.extra.get("valid_range", {})
    for k, (name, unit) in enumerate(zip(ds.channels, ds.units)):
        v, m = ds.values[:, :, k].astype(np.float64), ds.mask[:, :, k] > 0
        count = m.sum(axis=0)
        vmax = np.where(m, v, -np.inf).max(axis=0)
        vmin = np.where(m, v, np.inf).min(axis=0)
        zero = (count > 0) & (vmax == 0) & (vmin == 0)
        if zero.any():
            problem(out, "all_zero_sensor", "warning", f"{int(zero.sum())} sensor(s) have only zeros as valid {name} "
                    "values (an outage written as 0? declare 0 in missing_values if so)", sensors=ds.node_ids[zero])
        const = (count > 1) & (vmax == vmin) & ~zero
        if const.any():
            problem(out, "constant_sensor", "warning", f"{int(const.sum())} sensor(s) never change their valid {name} "
                    "value (a stuck sensor?)", sensors=ds.node_ids[const])
        if declared.get(name, {}).get("min") is None and name not in ds.extra.get("min_declared", ()):
            neg = m & (v < 0)
            if neg.any():
                problem(out, "negative_values", "info", f"{int(neg.sum())} valid {name} value(s) are negative; declare "
                        f"min: 0 for channel {name} ({unit}) if they are impossible", sensors=ds.node_ids[neg.any(axis=0)])
    return out


def constant_runs(values: np.ndarray, mask: np.ndarray, min_steps: int) -> np.ndarray:
    """Steps inside runs of identical valid values longer than ``min_steps`` steps.

    Args:
        values: ``[time, node, channel]`` observations.
        mask: same shape, 1 = valid; a masked step ends a run.
        min_steps: a run of more than this many consecutive valid steps holding the same value
            (zeros included) is marked.

    Returns:
        ``[time, node, channel]`` bool, True on every step of such a run (valid steps only).
        Example: one series ``5 5 5 5 1 2 2`` with ``min_steps=2`` marks the first four steps.
    """
    t = values.shape[0]
    if t == 0:
        return np.zeros(values.shape, dtype=bool)
    v = values.reshape(t, -1)
    m = mask.reshape(t, -1) > 0
    same = (v[1:] == v[:-1]) & m[1:] & m[:-1]
    starts = np.concatenate([np.ones((1, v.shape[1]), dtype=bool), ~same], axis=0)
    run_id = np.cumsum(starts.T.reshape(-1)) - 1  # column by column: a new column always starts a run
    lengths = np.bincount(run_id)
    long = (lengths[run_id] > min_steps).reshape(v.shape[1], t).T & m
    return long.reshape(values.shape)


def outage_problems(values: np.ndarray, mask: np.ndarray, node_ids: np.ndarray, channels: Iterable[str],
                    interval: pd.Timedelta, max_constant: pd.Timedelta, masked: bool) -> tuple[list[dict[str, Any]], np.ndarray]:
    """``suspected_outage`` (warning): runs of one repeated value (zeros included) lasting longer
    than ``max_constant`` (a sensor that stopped and kept writing its last value or 0).

    Args:
        values, mask: ``[time, node, channel]``; interval: the grid step.
        max_constant: the longest plausible run of one value; masked: whether the runs are masked.

    Returns:
        the problems and the ``[time, node, channel]`` bool array of the steps in such runs.
    """
    min_steps = int(max_constant // interval)
    runs = constant_runs(values, mask, min_steps)
    out: list[dict[str, Any]] = []
    for k, name in enumerate(channels):
        hit = runs[:, :, k]
        if hit.any():
            action = "masked" if masked else "kept (set outages.mask: true to mask them)"
            problem(out, "suspected_outage", "warning",
                    f"{int(hit.sum())} valid {name} value(s) of {int(hit.any(axis=0).sum())} sensor(s) lie in runs of one "
                    f"repeated value longer than {max_constant} (outages.max_constant): {action}",
                    sensors=np.asarray(node_ids)[hit.any(axis=0)])
    return out, runs


def history_problems(num_steps: int, window: int, horizon: int,
                     split: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> list[dict[str, Any]]:
    """``too_little_history`` (error) when a chronological train/val/test part of ``num_steps``
    steps (:func:`fedldt.data.windows.split_bounds`) cannot hold one window of ``window`` input
    and ``horizon`` target steps."""
    out: list[dict[str, Any]] = []
    for part, bounds in split_bounds(num_steps, split).items():
        try:
            window_starts(bounds, window, horizon, part)
        except ValueError as e:
            problem(out, "too_little_history", "error",
                    str(e).replace("change split.ratios", "change split.ratios (fedldt validate --split)"))
            break
    return out


def is_usable(problems: list[dict[str, Any]]) -> bool:
    """Whether the data can be trained on: no problem of severity ``error``."""
    return not any(p["severity"] == "error" for p in problems)


#: Every problem code the checks give: the only words about a territory's data that may leave it
#: (a territory that refuses to train tells the server these, nothing else; :class:`UnusableData`).
PROBLEM_CODES = ("gaps", "missing_values", "infinite", "out_of_range", "duplicates", "sensor_without_data",
                 "isolated_sensor", "low_coverage", "weights_above_one", "no_coordinates", "all_zero_sensor", "constant_sensor",
                 "negative_values", "no_valid_data", "too_little_history", "unreadable", "suspected_outage")


class UnusableData(ValueError):
    """A territory's data has a problem of severity ``error``: fedldt does not train on it.

    Attributes:
        codes: the sorted error codes, each one of :data:`PROBLEM_CODES` (any other becomes
            ``"other"``): what a territory's error reply may say (:func:`fedldt.egress.error_reason`);
            the message (with names and paths) stays in the territory's own log.
    """

    def __init__(self, message: str, codes: Iterable[str]) -> None:
        super().__init__(message)
        self.codes = tuple(sorted({c if c in PROBLEM_CODES else "other" for c in codes})) or ("other",)


def require_usable(ds: TerritoryDataset, window: int, horizon: int,
                   split: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> None:
    """Refuse data that cannot be trained on: the problems the loader found
    (``ds.extra["problems"]`` of a territory data package, else :func:`dataset_problems`) and
    :func:`history_problems` for the task's ``window``, ``horizon`` and ``split``.

    Raises:
        UnusableData: a problem of severity ``error``; the message lists them, ``codes`` names them.
    """
    problems = list(ds.extra["problems"]) if "problems" in ds.extra else dataset_problems(ds)
    problems += history_problems(ds.num_steps, window, horizon, split)
    errors = [p for p in problems if p["severity"] == "error"]
    if errors:
        raise UnusableData(f"territory {ds.name}: data not usable for training: "
                           + "; ".join(f"{p['code']}: {p['message']}" for p in errors)
                           + " (run `fedldt validate` on its package for the full report)", [p["code"] for p in errors])
