"""Plausible values of a dataset's channels and covariates: ``valid_range`` in ``conf/dataset/*.yaml``.

Declared per channel (and per covariate) in data units::

    valid_range:
      speed: {min: 0, max: 120, type: number}   # mph

``min`` and ``max`` are inclusive bounds (``null`` or absent = unbounded); ``type`` is ``number``
(the default) or ``integer`` (counts). The dataset loaders check the data against the declared
ranges, ``fedldt export`` writes the channels' ranges into the model package (``package.json``,
``task.valid_range``), and ``fedldt predict``/``serve`` refuse, or mask, observations outside
them (:mod:`fedldt.delivery.observations`). Whatever the declaration, a value is never plausible
beyond float32's range (about 3.4e38): the model computes in float32.

Forecasts stay in the declared range too: :func:`clip_forecast` sets a forecast below ``min`` to
``min`` (a count or an energy declared ``min: 0`` is never forecast below 0) and one above
``max`` to ``max``. It is applied wherever a model's forecast is made, so the published test
metrics measure the forecasts users get: :meth:`fedldt.engine.TerritoryTask.predict` (training
evaluation, test metrics, export checks), ``model.onnx``
(:class:`fedldt.delivery.onnx_export.FixedGraphForecaster`) and
:meth:`fedldt.delivery.package.ForecastPackage.predict_window` (``fedldt predict``, ``serve``,
NGSI-LD). ``type: integer`` does not round a forecast (it is an expected value); NaN stays NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

#: Largest float32 magnitude; values beyond it overflow to infinity in the model's float32 input.
FLOAT32_MAX = float(np.finfo(np.float32).max)
TYPES = ("number", "integer")


@dataclass(frozen=True)
class ValidRange:
    """Plausible values of one channel: ``min <= value <= max`` (``None`` = unbounded), and a
    whole number when ``type == "integer"``."""

    min: float | None = None
    max: float | None = None
    type: str = "number"

    def problem(self, value: float, unit: str = "") -> str | None:
        """Why a finite ``value`` (data units) is implausible, or ``None`` if it is plausible."""
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            return f"outside the valid range {self.describe(unit)}"
        if self.type == "integer" and not float(value).is_integer():
            return "not a whole number (this channel counts)"
        return None

    def violations(self, values: np.ndarray) -> np.ndarray:
        """Boolean array: where finite ``values`` are implausible (NaN entries are not flagged)."""
        v = np.asarray(values, dtype=np.float64)
        bad = np.zeros(v.shape, dtype=bool)
        with np.errstate(invalid="ignore"):
            if self.min is not None:
                bad |= v < self.min
            if self.max is not None:
                bad |= v > self.max
            if self.type == "integer":
                bad |= np.isfinite(v) & (v != np.round(v))
        return bad

    def describe(self, unit: str = "") -> str:
        """E.g. ``"0 to 120 mph"``, ``"at least 0 kWh"``, ``"any number"`` (no unit when
        unbounded)."""
        u = f" {unit}" if unit else ""
        kind = " (whole numbers)" if self.type == "integer" else ""
        if self.min is not None and self.max is not None:
            return f"{self.min:g} to {self.max:g}{u}{kind}"
        if self.min is not None:
            return f"at least {self.min:g}{u}{kind}"
        if self.max is not None:
            return f"at most {self.max:g}{u}{kind}"
        return "any whole number" if self.type == "integer" else "any number"

    def to_json(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "type": self.type}


def parse_valid_ranges(spec: Mapping[str, Any] | None, where: str = "valid_range") -> dict[str, ValidRange]:
    """Read a ``valid_range`` declaration (name -> ``{min, max, type}``).

    Args:
        spec: the mapping as written in the config or the package manifest; ``None`` = nothing declared.
        where: where the declaration is, for messages (e.g. ``"dataset.valid_range"``).

    Returns:
        name -> :class:`ValidRange`.

    Raises:
        ValueError: not a mapping, an unknown key, a bound that is not a finite number, ``min > max``,
            or an unknown ``type`` (the entry is named).
    """
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where}: expected a mapping channel -> {{min, max, type}}, got {type(spec).__name__}")
    out = {}
    for name, entry in spec.items():
        w = f"{where}.{name}"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{w}: expected {{min: ..., max: ..., type: number|integer}}, got {entry!r}")
        extra = sorted(set(entry) - {"min", "max", "type"})
        if extra:
            raise ValueError(f"{w}: unknown key(s) {extra}; use min, max and type")
        bounds = {}
        for key in ("min", "max"):
            b = entry.get(key)
            if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not np.isfinite(b)):
                raise ValueError(f"{w}.{key}: {b!r} is not a finite number (null = unbounded)")
            bounds[key] = None if b is None else float(b)
        if bounds["min"] is not None and bounds["max"] is not None and bounds["min"] > bounds["max"]:
            raise ValueError(f"{w}: min {bounds['min']:g} > max {bounds['max']:g}")
        kind = entry.get("type", "number")
        if kind not in TYPES:
            raise ValueError(f"{w}.type: {kind!r} must be one of {TYPES}")
        out[str(name)] = ValidRange(bounds["min"], bounds["max"], kind)
    return out


def check_data(values: np.ndarray, mask: np.ndarray | None, names: Sequence[str], ranges: Mapping[str, ValidRange],
               where: str, units: Sequence[str] | None = None) -> None:
    """Check loaded data against declared ranges (a wrong declaration, or wrong data, is caught at load time).

    Args:
        values: ``[..., k]`` values in data units, one slice per name (channels or covariates).
        mask: same shape (1 = observed) or ``None`` (all observed); unobserved entries are not checked.
        names: the ``k`` channel or covariate names; names without a declared range are not checked.
        ranges: see :func:`parse_valid_ranges`.
        where: the data, for messages (e.g. a file name).
        units: unit of each name, for messages.

    Raises:
        ValueError: a value is outside its declared range (the name, value and index are given).
    """
    values = np.asarray(values)
    for k, name in enumerate(names):
        if name not in ranges:
            continue
        v = values[..., k]
        bad = ranges[name].violations(v)
        if mask is not None:
            bad &= np.asarray(mask)[..., k] > 0
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            unit = units[k] if units else ""
            raise ValueError(f"{where}: {name} value {float(v[idx]):g} at index {idx} is outside the declared "
                             f"valid_range {ranges[name].describe(unit)} ({int(bad.sum())} such value(s)); fix the "
                             "data or the dataset config's valid_range")


def forecast_limits(channels: Sequence[str], ranges: Mapping[str, ValidRange] | None) -> np.ndarray:
    """``[2, C]`` float32: row 0 the lowest, row 1 the highest forecast of each channel (``-inf``/``inf``
    where the channel declares no bound, or no range), for :func:`clip_forecast`.

    Args:
        channels: the ``C`` channel names, in the order of the channel axis.
        ranges: see :func:`parse_valid_ranges` (``None`` = nothing declared).
    """
    ranges = ranges or {}
    out = np.empty((2, len(channels)), dtype=np.float32)
    for k, name in enumerate(channels):
        r = ranges.get(name, ValidRange())
        out[0, k] = -np.inf if r.min is None else r.min
        out[1, k] = np.inf if r.max is None else r.max
    return out


def clip_forecast(y: torch.Tensor | np.ndarray, limits: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """A forecast kept within its channels' declared valid ranges (see the module docstring).

    Args:
        y: ``[..., C]`` forecast in data units (torch tensor or numpy array).
        limits: ``[2, C]`` from :func:`forecast_limits`.

    Returns:
        ``y`` with each channel clipped to ``[limits[0], limits[1]]``, same type, shape and dtype;
        NaN entries stay NaN (a failed forecast is never turned into a bound).
    """
    if isinstance(y, torch.Tensor):
        lim = limits.to(dtype=y.dtype, device=y.device) if isinstance(limits, torch.Tensor) else \
            torch.as_tensor(limits, dtype=y.dtype, device=y.device)
        return torch.minimum(torch.maximum(y, lim[0]), lim[1])
    lim = np.asarray(limits).astype(y.dtype, copy=False)
    return np.minimum(np.maximum(y, lim[0]), lim[1])
