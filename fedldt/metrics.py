"""Masked forecasting metrics kept as sums and counts, so that they pool exactly.

A territory never reports a mean: it reports, per horizon step, the sum of absolute errors,
the sum of squared errors, the sum of absolute percentage errors and the number of valid
entries. Adding these sums across batches and territories and dividing at the end gives
the exact global MAE/RMSE/MAPE (averaging per-territory RMSE or MAPE would not).
This follows the running-sum metrics of TorchSpatiotemporal (tsl) and the per-horizon
reporting of DCRNN (Li et al., ICLR 2018) and BasicTS.

Conventions:
    * tensors are ``[batch, horizon, node, channel]`` (any leading shape works as long as
      axis 1 is the horizon step);
    * ``mask`` is 1 where the target is valid, 0 where it is missing;
    * MAPE additionally ignores valid targets equal to 0 and is a fraction (0.625 = 62.5 %);
    * a metric with no valid entry is ``None`` (JSON ``null``), never NaN and never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

#: Keys of the sums as they travel in a Flower ``MetricRecord`` (after a prefix).
SUM_KEYS = ("abs_err_sum", "sq_err_sum", "ape_sum", "abs_target_sum", "num_valid", "num_valid_ape")


@dataclass
class MetricSums:
    """Per-horizon-step error sums and valid counts (all arrays have shape ``[horizon]``).

    Attributes:
        abs_err_sum: sum of ``|y_hat - y|`` over valid entries, data units, float64.
        sq_err_sum: sum of ``(y_hat - y)**2`` over valid entries, squared data units, float64.
        ape_sum: sum of ``|y_hat - y| / |y|`` over valid entries with ``y != 0``, float64.
        abs_target_sum: sum of ``|y|`` over valid entries (for the scale-free WAPE), float64.
        num_valid: number of valid entries (mask == 1), int64.
        num_valid_ape: number of valid entries with ``y != 0``, int64.
    """

    abs_err_sum: np.ndarray
    sq_err_sum: np.ndarray
    ape_sum: np.ndarray
    abs_target_sum: np.ndarray
    num_valid: np.ndarray
    num_valid_ape: np.ndarray

    @classmethod
    def zeros(cls, horizon: int) -> "MetricSums":
        """Empty sums for ``horizon`` steps (the neutral element of ``+``)."""
        f = np.zeros(horizon, dtype=np.float64)
        i = np.zeros(horizon, dtype=np.int64)
        return cls(f.copy(), f.copy(), f.copy(), f.copy(), i.copy(), i.copy())

    @property
    def horizon(self) -> int:
        return int(self.abs_err_sum.shape[0])

    def __add__(self, other: "MetricSums") -> "MetricSums":
        if self.horizon != other.horizon:
            raise ValueError(
                f"cannot add metric sums over {self.horizon} and {other.horizon} horizon steps"
            )
        return MetricSums(*(getattr(self, k) + getattr(other, k) for k in SUM_KEYS))

    def to_dict(self, prefix: str = "") -> dict[str, list[float] | list[int]]:
        """Plain lists keyed ``prefix + key`` (the content of a Flower MetricRecord)."""
        out: dict[str, list] = {}
        for k in SUM_KEYS:
            arr = getattr(self, k)
            out[prefix + k] = [int(v) for v in arr] if arr.dtype.kind == "i" else [float(v) for v in arr]
        return out

    @classmethod
    def from_dict(cls, record: Mapping[str, Sequence[float]], prefix: str = "") -> "MetricSums":
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError: a sum is missing from ``record`` (the key is named).
            ValueError: the sums have different lengths, negative counts, or a NaN/inf (a record
                from a territory is data; summary.json never holds NaN).
        """
        vals = {}
        for k in SUM_KEYS:
            if prefix + k not in record:
                raise KeyError(f"metric record lacks '{prefix + k}' (has {sorted(record)})")
            dtype = np.int64 if k.startswith("num_") else np.float64
            vals[k] = np.asarray(list(record[prefix + k]), dtype=dtype)
        lengths = {v.shape[0] for v in vals.values()}
        if len(lengths) != 1:
            raise ValueError(f"metric sums with prefix '{prefix}' have unequal lengths {lengths}")
        if (vals["num_valid"] < 0).any() or (vals["num_valid_ape"] < 0).any():
            raise ValueError(f"metric sums with prefix '{prefix}' have negative counts")
        bad = [k for k, v in vals.items() if not np.isfinite(v).all()]
        if bad:
            raise ValueError(f"metric sums with prefix '{prefix}' hold NaN or inf in {bad}")
        return cls(**vals)


def masked_error_sums(
    y_hat: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray | None = None,
) -> MetricSums:
    """Error sums of a batch of forecasts, per horizon step.

    Args:
        y_hat: forecasts ``[batch, horizon, ...]`` in data units.
        y: targets, same shape, data units.
        mask: 1 = valid target, 0 = missing; same shape (``None`` = all valid). Entries
            with mask 0 contribute nothing, so an all-missing batch adds only zeros.

    Returns:
        :class:`MetricSums` with arrays of shape ``[horizon]``.

    Raises:
        ValueError: shapes differ or the input has fewer than 2 dimensions.
    """
    y_hat_np = _to_f64(y_hat)
    y_np = _to_f64(y)
    if y_hat_np.shape != y_np.shape:
        raise ValueError(f"y_hat shape {y_hat_np.shape} != y shape {y_np.shape}")
    if y_np.ndim < 2:
        raise ValueError(f"expected [batch, horizon, ...] tensors, got shape {y_np.shape}")
    m = np.ones_like(y_np, dtype=bool) if mask is None else _to_f64(mask) > 0
    if m.shape != y_np.shape:
        raise ValueError(f"mask shape {m.shape} != y shape {y_np.shape}")
    # A masked target may hold NaN; it must not leak into the sums.
    m = m & np.isfinite(y_np)
    red = (0,) + tuple(range(2, y_np.ndim))
    err = np.where(m, y_hat_np - np.where(m, y_np, 0.0), 0.0)
    abs_err = np.abs(err)
    m_ape = m & (y_np != 0)
    safe_y = np.where(m_ape, np.abs(np.where(m, y_np, 1.0)), 1.0)
    return MetricSums(
        abs_err_sum=abs_err.sum(axis=red),
        sq_err_sum=(err * err).sum(axis=red),
        ape_sum=np.where(m_ape, abs_err / safe_y, 0.0).sum(axis=red),
        abs_target_sum=np.where(m, np.abs(np.where(m, y_np, 0.0)), 0.0).sum(axis=red),
        num_valid=m.sum(axis=red).astype(np.int64),
        num_valid_ape=m_ape.sum(axis=red).astype(np.int64),
    )


def _to_f64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _safe_div(num: float, den: int) -> float | None:
    return None if den == 0 else float(num) / float(den)


def mae(s: MetricSums, step: int | None = None) -> float | None:
    """Masked MAE in data units at 1-based horizon ``step`` (``None`` = all steps pooled)."""
    sl = slice(None) if step is None else step - 1
    return _safe_div(np.sum(s.abs_err_sum[sl]), int(np.sum(s.num_valid[sl])))


def rmse(s: MetricSums, step: int | None = None) -> float | None:
    """Masked RMSE in data units at 1-based horizon ``step`` (``None`` = all steps pooled)."""
    sl = slice(None) if step is None else step - 1
    mse = _safe_div(np.sum(s.sq_err_sum[sl]), int(np.sum(s.num_valid[sl])))
    return None if mse is None else float(np.sqrt(mse))


def mape(s: MetricSums, step: int | None = None) -> float | None:
    """Masked MAPE as a fraction (ignores zero targets) at 1-based ``step`` (``None`` = all)."""
    sl = slice(None) if step is None else step - 1
    return _safe_div(np.sum(s.ape_sum[sl]), int(np.sum(s.num_valid_ape[sl])))


def wape(s: MetricSums, step: int | None = None) -> float | None:
    """Weighted absolute percentage error ``sum|y_hat - y| / sum|y|`` (a fraction; scale-free,
    so territories of very different volume compare), at 1-based ``step`` (``None`` = all)."""
    sl = slice(None) if step is None else step - 1
    den = float(np.sum(s.abs_target_sum[sl]))
    return None if den == 0 else float(np.sum(s.abs_err_sum[sl])) / den


def report(s: MetricSums, steps: Iterable[int] = (3, 6, 12)) -> dict[str, dict[str, float | None]]:
    """The ``summary.json`` metric block: ``{"mae"|"rmse"|"mape"|"wape": {"h3": .., "all": ..}}``.

    Args:
        s: pooled sums.
        steps: 1-based horizon steps to report (steps beyond ``s.horizon`` raise).

    Raises:
        ValueError: a requested step is outside ``1..horizon``.
    """
    steps = list(steps)
    bad = [h for h in steps if not 1 <= h <= s.horizon]
    if bad:
        raise ValueError(f"report steps {bad} are outside the horizon 1..{s.horizon}")
    out: dict[str, dict[str, float | None]] = {}
    for name, fn in (("mae", mae), ("rmse", rmse), ("mape", mape), ("wape", wape)):
        block = {f"h{h}": fn(s, h) for h in steps}
        block["all"] = fn(s)
        out[name] = block
    return out


def pool(sums: Iterable[MetricSums]) -> MetricSums:
    """Exact pooling of sums from several batches or territories.

    Raises:
        ValueError: ``sums`` is empty or horizons differ.
    """
    sums = list(sums)
    if not sums:
        raise ValueError("nothing to pool: no metric sums were given")
    total = MetricSums.zeros(sums[0].horizon)
    for s in sums:
        total = total + s
    return total


def windows_weighted_mean(values: Iterable[tuple[float, int]]) -> float | None:
    """``Σ v·n / Σ n`` over ``(value, windows)`` pairs: the one definition of ``train_loss``.

    A training loss is a mean over windows: within a territory over its batches (``n`` = the
    batch's windows, so a short last batch counts for what it holds), and across territories
    over their mean losses (``n`` = the territory's training windows, the FedAvg weight), so a
    round's loss is the same whether territories trained together (centralized), apart (local)
    or federated. Pairs with ``n == 0`` add nothing.

    Returns:
        The weighted mean, or ``None`` (JSON ``null``) when no pair has a window.

    Raises:
        ValueError: a negative window count.
    """
    num, den = 0.0, 0
    for value, n in values:
        if n < 0:
            raise ValueError(f"window count {n} < 0 in a windows-weighted mean")
        if n:
            num += float(value) * int(n)
            den += int(n)
    return num / den if den else None
