"""Chronological splits, masked scaling and sliding windows of a territory's series.

The split is made on the time axis *before* windowing, so no window (input or target)
crosses a split boundary; the scaler is fitted on the training part only, ignoring masked
entries (as in TorchSpatiotemporal, tsl).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

SPLITS = ("train", "val", "test")


def split_bounds(num_steps: int, ratios: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, tuple[int, int]]:
    """Chronological ``[start, stop)`` step ranges of the train/val/test parts.

    ``train = [0, round(T*r0))``, ``val = [.., round(T*(r0+r1)))``, ``test = [.., T)``.

    Args:
        num_steps: T, the length of the series.
        ratios: fractions of (train, val, test); positive and summing to 1.

    Raises:
        ValueError: ratios invalid (named ``split.ratios``).
    """
    r = tuple(float(x) for x in ratios)
    if len(r) != 3 or any(x <= 0 for x in r) or abs(sum(r) - 1.0) > 1e-6:
        raise ValueError(f"split.ratios={list(ratios)} must be three positive fractions summing to 1")
    t1 = int(round(num_steps * r[0]))
    t2 = int(round(num_steps * (r[0] + r[1])))
    return {"train": (0, t1), "val": (t1, t2), "test": (t2, num_steps)}


def window_starts(bounds: tuple[int, int], window: int, horizon: int, split: str = "?", stride: int = 1) -> np.ndarray:
    """First input step of every ``stride``-th window lying wholly inside ``bounds``.

    A window starting at ``s`` reads inputs ``s .. s+window-1`` and targets
    ``s+window .. s+window+horizon-1``; all of them lie in ``[start, stop)``.

    Raises:
        ValueError: the part is too short for a single window (sizes named).
    """
    start, stop = bounds
    n = stop - start - window - horizon + 1
    if n <= 0:
        raise ValueError(
            f"the {split} part has {stop - start} steps, fewer than window+horizon="
            f"{window + horizon}: lengthen the series, change split.ratios or shorten window/horizon"
        )
    if stride < 1:
        raise ValueError(f"window stride must be >= 1, got {stride} (task.train_stride)")
    return np.arange(start, start + n, stride, dtype=np.int64)


class MaskedStandardScaler:
    """Z-score scaler fitted on valid entries only (mask = 1), with population std (ddof=0).

    Statistics are per node and channel (``per_node=True``) or per channel over all nodes.
    A node/channel with no valid training value gets mean 0, std 1; one whose valid values
    are constant gets std 1, so scaling never produces NaN or inf.

    Attributes (after :meth:`fit`):
        mean, std: float32 arrays broadcastable to ``[time, node, channel]``
            (shape ``[1, node, channel]`` or ``[1, 1, channel]``).
    """

    def __init__(self, per_node: bool = True, eps: float = 1e-6) -> None:
        self.per_node = per_node
        self.eps = eps
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, values: np.ndarray, mask: np.ndarray) -> "MaskedStandardScaler":
        """Fit on ``values``/``mask`` of shape ``[time, node, channel]`` (the training part)."""
        axes = (0,) if self.per_node else (0, 1)
        m = np.asarray(mask, dtype=np.float64)
        x = np.where(m > 0, np.asarray(values, dtype=np.float64), 0.0)
        count = m.sum(axis=axes, keepdims=True)
        safe = np.maximum(count, 1.0)
        mean = x.sum(axis=axes, keepdims=True) / safe
        var = (m * (x - mean) ** 2).sum(axis=axes, keepdims=True) / safe
        std = np.sqrt(var)
        mean = np.where(count > 0, mean, 0.0)
        std = np.where((count > 0) & (std > self.eps), std, 1.0)
        self.mean, self.std = mean.astype(np.float32), std.astype(np.float32)
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ((values - self.mean) / self.std).astype(np.float32)

    def inverse_transform(self, values: torch.Tensor) -> torch.Tensor:
        """Back to data units; ``values`` is ``[..., node, channel]``."""
        mean = torch.as_tensor(self.mean[0], dtype=values.dtype, device=values.device)
        std = torch.as_tensor(self.std[0], dtype=values.dtype, device=values.device)
        return values * std + mean

    def state(self) -> dict[str, list]:
        """JSON-able statistics (for model packages)."""
        return {"per_node": self.per_node, "mean": self.mean.tolist(), "std": self.std.tolist()}


def day_fraction(timestamps: pd.DatetimeIndex) -> np.ndarray:
    """``[time]`` float64 time of day as a fraction of a day (00:05 -> 0.003472), from the local
    wall-clock time: naive timestamps are read as local, tz-aware ones in their own time zone
    (so 01:30 PDT and 01:30 PST both give 0.0625)."""
    return (timestamps.hour * 3600 + timestamps.minute * 60 + timestamps.second).to_numpy() / 86400.0


def time_features(timestamps: pd.DatetimeIndex, time_of_day: bool, day_of_week: bool) -> np.ndarray:
    """Calendar covariates ``[time, k]`` float32: sin/cos of time of day (:func:`day_fraction`),
    one-hot weekday (Monday first), both from local wall-clock time."""
    cols = []
    if time_of_day:
        frac = day_fraction(timestamps)
        cols += [np.sin(2 * np.pi * frac), np.cos(2 * np.pi * frac)]
    if day_of_week:
        dow = timestamps.day_of_week.to_numpy()
        cols += [(dow == d).astype(np.float64) for d in range(7)]
    if not cols:
        return np.zeros((len(timestamps), 0), dtype=np.float32)
    return np.stack(cols, axis=1).astype(np.float32)


def model_inputs(
    values: np.ndarray,
    mask: np.ndarray,
    timestamps: pd.DatetimeIndex,
    scaler: MaskedStandardScaler,
    time_of_day: bool,
    day_of_week: bool,
    covariates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The model's input features built from raw observations (training, evaluation and deployment).

    Args:
        values: ``[time, node, channel]`` float32 observations in data units; entries with mask 0
            must hold a finite filler (fedldt uses 0), never NaN.
        mask: ``[time, node, channel]`` float32, 1 = valid, 0 = missing.
        timestamps: ``[time]`` local (naive) timestamps of the rows, for the calendar covariates.
        scaler: the territory's fitted :class:`MaskedStandardScaler`.
        time_of_day, day_of_week: calendar covariates to append (see :func:`time_features`).
        covariates: optional ``[time, k']`` float32 territory-level covariates, already scaled
            (e.g. z-scored weather), appended after the calendar ones.

    Returns:
        ``(scaled, features)``: ``scaled`` ``[time, node, channel]`` float32 z-scores times the
        mask (missing entries are 0); ``features`` ``[time, node, channel + k]`` float32, the
        scaled values followed by the ``k`` calendar covariates repeated on every node.
    """
    scaled = scaler.transform(values) * mask  # masked entries -> 0
    cal = time_features(timestamps, time_of_day, day_of_week)  # [T, k]
    if covariates is not None:
        cal = np.concatenate([cal, np.asarray(covariates, dtype=np.float32)], axis=1)
    cal = np.broadcast_to(cal[:, None, :], (values.shape[0], values.shape[1], cal.shape[1]))
    features = np.concatenate([scaled, cal], axis=-1).astype(np.float32)  # [T, N, F]
    return scaled, features


@dataclass
class WindowBatch:
    """One batch: ``x`` ``[batch, window, node, features]`` model input; ``y``, ``y_scaled``,
    ``mask`` ``[batch, horizon, node, channel]`` targets in data units, scaled, and validity;
    ``last`` ``[batch, node, channel]`` the last observed input value in data units."""

    x: torch.Tensor
    y: torch.Tensor
    y_scaled: torch.Tensor
    mask: torch.Tensor
    last: torch.Tensor


class WindowDataset(Dataset):
    """Sliding windows over a territory's prepared arrays (no copy per window).

    Args:
        features: ``[time, node, features]`` float32 model inputs.
        values: ``[time, node, channel]`` float32 targets in data units.
        scaled: ``[time, node, channel]`` float32 scaled targets.
        mask: ``[time, node, channel]`` float32 validity.
        starts: window start steps (see :func:`window_starts`).
        window, horizon: lookback and forecast lengths in steps.
    """

    def __init__(self, features, values, scaled, mask, starts, window: int, horizon: int) -> None:
        self.features = torch.as_tensor(features)
        self.values = torch.as_tensor(values)
        self.scaled = torch.as_tensor(scaled)
        self.mask = torch.as_tensor(mask)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.window, self.horizon = window, horizon

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def __getitem__(self, i: int):
        s = int(self.starts[i])
        w, h = self.window, self.horizon
        return (
            self.features[s : s + w],
            self.values[s + w : s + w + h],
            self.scaled[s + w : s + w + h],
            self.mask[s + w : s + w + h],
            self.values[s + w - 1],
        )


def collate(items) -> WindowBatch:
    x, y, ys, m, last = (torch.stack(t) for t in zip(*items))
    return WindowBatch(x=x, y=y, y_scaled=ys, mask=m, last=last)
