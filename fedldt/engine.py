"""Local train/evaluate engine of one territory; usable without Flower.

A :class:`TerritoryTask` owns a territory's chronological split, its scaler (fitted on its
own training part) and its windows, and trains or evaluates any fedldt model on them.
"""

from __future__ import annotations

import random
from typing import Any, Collection, Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedldt.data.ranges import clip_forecast, forecast_limits, parse_valid_ranges
from fedldt.data.territory import TerritoryDataset
from fedldt.data.windows import (
    SPLITS,
    MaskedStandardScaler,
    WindowDataset,
    collate,
    model_inputs,
    split_bounds,
    window_starts,
)
from fedldt.metrics import MetricSums, masked_error_sums, windows_weighted_mean
from fedldt.schema import ConfigError, train_history_timedelta


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (e.g. run seed, territory index, round), stable across runs."""
    ss = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
    return int(ss.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1, 2**31], dtype=np.uint64)) & (2**63 - 1)


#: ``train.device`` values: ``auto`` = CUDA when this process sees a CUDA device, else the CPU.
DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of ``train.device`` in this process.

    ``auto`` picks ``cuda`` when ``torch.cuda.is_available()`` (a CUDA build of torch and a
    visible GPU: in a simulation, one that ``federation.client_gpus`` gives the territory's
    actor), else ``cpu``. Data windows, metrics, messages and files stay on the CPU; only the
    model and each batch move to the device (:func:`model_device`).

    Raises:
        ConfigError: an unknown name, or ``cuda`` where this process sees no CUDA device.
    """
    if name not in DEVICES:
        raise ConfigError(f"train.device={name!r} must be one of {list(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but this process sees no CUDA device (torch.cuda.is_available() is False: "
                          "a CPU build of torch, no GPU, or a simulated territory given no GPU share); use "
                          "train.device=auto or cpu, or set federation.client_gpus in a simulation")
    return torch.device(name)


def train_device(train_cfg: Mapping[str, Any]) -> torch.device:
    """:func:`resolve_device` of ``train.device`` (``cpu`` for configs written before the key)."""
    return resolve_device(str(train_cfg.get("device", "cpu")))


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (``cpu`` for a model with neither)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def cpu_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every tensor detached on the CPU (what goes into messages and
    files, so a model trained on a GPU loads on a machine without one). Always a copy, also of CPU
    tensors: later in-place training of the model never changes it."""
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def masked_mae_loss(y_hat: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over valid entries (0 when the batch has none)."""
    return (torch.abs(y_hat - y) * mask).sum() / mask.sum().clamp_min(1.0)


class TerritoryTask:
    """Windows, scaler and train/evaluate loops of one territory.

    Args:
        dataset: the territory's data (values ``[time, node, channel]``).
        window: lookback steps (default 12).
        horizon: forecast steps (default 12).
        split: (train, val, test) fractions of the time axis, split before windowing.
        scaler_per_node: z-score statistics per node (True) or per channel over all nodes.
        time_of_day, day_of_week: calendar covariates appended to the inputs.
        batch_size, eval_batch_size: mini-batch sizes.
        covariates: append the territory-level covariates ``dataset.extra["covariates"]``
            (``[time, k]``, e.g. weather), z-scored on the training part, to every node.
        ha_period: seasonal slot of the historical-average forecast: ``"day"`` (time of day)
            or ``"week"`` (weekday and time of day).
        train_stride: use every ``train_stride``-th training window (validation and test
            always use every window).
        valid_range: the dataset's declared plausible values per channel (``dataset.valid_range``
            of the config, see :func:`fedldt.data.ranges.parse_valid_ranges`); every forecast of
            :meth:`predict` is clipped to them (:func:`fedldt.data.ranges.clip_forecast`: a
            channel declared ``min: 0`` is never forecast below 0). ``None``: not clipped.
        train_history_steps: keep only the last ``train_history_steps`` steps of the training
            part (``task.train_history``, :func:`train_history_steps`): ``bounds["train"]``
            starts there, so the scaler, the historical-average table, the training windows and
            the seasonal-naive lag values use nothing before it; validation and test are
            unchanged. ``None``: all of it.

    Raises:
        ValueError: a split is too short for one window (see :func:`window_starts`).
        ConfigError: ``train_history_steps`` is shorter than one window (``window + horizon``)
            or longer than the training part (``task.train_history.<name>`` named).
    """

    def __init__(
        self,
        dataset: TerritoryDataset,
        window: int = 12,
        horizon: int = 12,
        split: tuple[float, float, float] = (0.7, 0.1, 0.2),
        scaler_per_node: bool = True,
        time_of_day: bool = True,
        day_of_week: bool = False,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        covariates: bool = False,
        ha_period: str = "day",
        train_stride: int = 1,
        valid_range: Mapping[str, Any] | None = None,
        train_history_steps: int | None = None,
    ) -> None:
        self.dataset = dataset
        #: [2, channel] lowest and highest forecast per channel (see :func:`clip_forecast`)
        self.forecast_limits = torch.from_numpy(forecast_limits(dataset.channels, parse_valid_ranges(valid_range)))
        self.window, self.horizon = int(window), int(horizon)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.bounds = split_bounds(dataset.num_steps, tuple(split))
        if train_history_steps is not None:
            self.bounds["train"] = kept_train_bounds(dataset, self.bounds["train"], int(train_history_steps),
                                                     self.window, self.horizon)
        t0, t1 = self.bounds["train"]
        self.scaler = MaskedStandardScaler(per_node=scaler_per_node).fit(
            dataset.values[t0:t1], dataset.mask[t0:t1]
        )
        self.time_of_day, self.day_of_week = bool(time_of_day), bool(day_of_week)
        cov = None
        if covariates:
            if "covariates" not in dataset.extra:
                raise ValueError(f"task.covariates=true but dataset '{dataset.name}' has no covariates")
            raw = np.asarray(dataset.extra["covariates"], dtype=np.float32)[:, None, :]  # [T, 1, k]
            self.covariate_scaler = MaskedStandardScaler(per_node=False).fit(raw[t0:t1], np.ones_like(raw[t0:t1]))
            cov = self.covariate_scaler.transform(raw)[:, 0, :]  # [T, k]
        scaled, features = model_inputs(  # [T, N, C], [T, N, F]
            dataset.values, dataset.mask, dataset.timestamps, self.scaler, self.time_of_day, self.day_of_week, cov
        )
        self.in_channels = int(features.shape[-1])
        self.out_channels = dataset.num_channels
        self.edge_index = dataset.edge_index
        self.edge_weight = dataset.edge_weight
        self._graphs: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: split -> the reference forecasts' sums (fedldt.results.reference_sums): they never change
        self.reference_cache: dict[str, Any] = {}
        if ha_period not in ("day", "week"):
            raise ValueError(f"task.ha_period={ha_period!r} must be 'day' or 'week'")
        self.ha_period = ha_period
        self._ha_table = self._fit_historical_average()
        self.windows = {
            s: WindowDataset(
                features, dataset.values, scaled, dataset.mask,
                window_starts(self.bounds[s], self.window, self.horizon, s, train_stride if s == "train" else 1),
                self.window, self.horizon,
            )
            for s in SPLITS
        }

    # ------------------------------------------------------------------ info
    def num_windows(self, split: str) -> int:
        return len(self.windows[split])

    def split_info(self, split: str) -> dict[str, Any]:
        """Window count and the first/last target timestamps of a split (ISO strings)."""
        starts = self.windows[split].starts
        ts = self.dataset.timestamps
        return {
            "num_windows": int(starts.shape[0]),
            "first_target": ts[int(starts[0]) + self.window].isoformat(),
            "last_target": ts[int(starts[-1]) + self.window + self.horizon - 1].isoformat(),
        }

    def model_dims(self) -> dict[str, int]:
        """Sizes the data injects into a model config."""
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "horizon": self.horizon}

    def graph_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(edge_index, edge_weight)`` on ``device`` (copied once per device; the CPU ones as they are)."""
        if device.type == "cpu":
            return self.edge_index, self.edge_weight
        if device not in self._graphs:
            w = self.edge_weight
            self._graphs[device] = (self.edge_index.to(device), None if w is None else w.to(device))
        return self._graphs[device]

    def loader(self, split: str, shuffle: bool = False, seed: int = 0) -> DataLoader:
        gen = torch.Generator().manual_seed(seed)
        bs = self.batch_size if split == "train" else self.eval_batch_size
        return DataLoader(self.windows[split], batch_size=bs, shuffle=shuffle, generator=gen, collate_fn=collate)

    # ------------------------------------------------------------------ historical average
    def _slots(self) -> np.ndarray:
        ts = self.dataset.timestamps
        slot_len = self.dataset.freq
        per_day = int(pd.Timedelta(days=1) / slot_len) if slot_len <= pd.Timedelta(days=1) else 1
        # local wall-clock seconds of the day (not time elapsed since midnight, which differs on
        # a daylight-saving day), in whole slots
        seconds = (ts.hour * 3600 + ts.minute * 60 + ts.second).to_numpy().astype(np.int64)
        tod = (seconds // int(slot_len.total_seconds())) % max(per_day, 1)
        if self.ha_period == "week":
            return ts.day_of_week.to_numpy().astype(np.int64) * per_day + tod
        return tod

    def _fit_historical_average(self) -> np.ndarray:
        """Masked mean of the training part per seasonal slot, node and channel; a slot never
        seen in training falls back to the node's training mean."""
        t0, t1 = self.bounds["train"]
        slots = self._slots()
        n_slots = int(slots.max()) + 1
        v = self.dataset.values[t0:t1].astype(np.float64)
        m = self.dataset.mask[t0:t1].astype(np.float64)
        sums = np.zeros((n_slots,) + v.shape[1:])
        counts = np.zeros_like(sums)
        np.add.at(sums, slots[t0:t1], v * m)
        np.add.at(counts, slots[t0:t1], m)
        node_mean = (v * m).sum(0) / np.maximum(m.sum(0), 1.0)
        table = np.where(counts > 0, sums / np.maximum(counts, 1.0), node_mean[None])
        self._slot_of_step = torch.from_numpy(slots)
        return table.astype(np.float32)

    def historical_average(self, split: str) -> MetricSums:
        """Error sums of the historical-average forecast (training mean of the target's slot)."""
        table = torch.from_numpy(self._ha_table)
        w, h = self.window, self.horizon
        total = MetricSums.zeros(self.horizon)
        starts = torch.from_numpy(self.windows[split].starts)
        offset = 0
        for batch in self.loader(split):  # unshuffled: batch k holds windows offset..offset+B-1
            b = batch.y.shape[0]
            steps = starts[offset : offset + b, None] + w + torch.arange(h)[None, :]  # [B, H]
            offset += b
            y_hat = table[self._slot_of_step[steps]]  # [B, H, N, C]
            total = total + masked_error_sums(y_hat, batch.y, batch.mask)
        return total

    # ------------------------------------------------------------------ train / evaluate
    def fit(
        self,
        model: nn.Module,
        epochs: int,
        lr: float,
        seed: int,
        weight_decay: float = 0.0,
        grad_clip: float | None = 5.0,
        proximal_mu: float = 0.0,
        proximal_names: Collection[str] | None = None,
        optimizer: str = "torch.optim.Adam",
        dp: Mapping[str, Any] | None = None,
        proximal_reference: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """Train ``model`` in place on the training windows with masked MAE (scaled units).

        Args:
            epochs: local epochs.
            lr: Adam learning rate.
            seed: fixes the shuffling and dropout.
            weight_decay: Adam weight decay.
            grad_clip: max gradient norm (``None`` = no clipping).
            proximal_mu: FedProx term ``mu/2 * ||w - w_global||^2`` (Li et al., MLSys 2020);
                ``w_global`` is the model's weights when ``fit`` is called.
            proximal_names: parameter names the proximal term covers (default: all; a
                territory passes its shared ones, so local parameters may move freely).
            proximal_reference: parameter name -> tensor ``w_global`` of the proximal term
                (default: the model's weights when ``fit`` is called, FedProx). Ditto's personal
                model passes the global model received this round (:func:`train_epochs`).
            optimizer: ``train.optimizer._target_``, a key of :data:`OPTIMIZERS`.
            dp: ``{"noise_multiplier", "clipping_norm", "batch_first"}``: sample-level DP-SGD
                with Opacus instead (:func:`train_epochs_dpsgd`; ``grad_clip`` and the proximal
                term do not apply).

        Returns:
            Training loss (scaled MAE) of the last epoch, a windows-weighted mean over its
            batches (:func:`train_epochs`).
        """
        opt = build_optimizer(model.parameters(), optimizer, lr=lr, weight_decay=weight_decay)
        if dp is not None:
            return train_epochs_dpsgd(model, opt, self, epochs, seed, float(dp["noise_multiplier"]),
                                      float(dp["clipping_norm"]), batch_first=bool(dp["batch_first"]))
        return train_epochs(model, opt, [(self, seed)], epochs, seed, grad_clip=grad_clip, proximal_mu=proximal_mu,
                            proximal_names=proximal_names, proximal_reference=proximal_reference)

    @torch.no_grad()
    def predict(self, model: nn.Module, batch) -> torch.Tensor:
        """Forecast ``[batch, horizon, node, channel]`` in data units, within the channels' valid ranges."""
        model.eval()
        dev = model_device(model)  # the model's device; the forecast comes back to the CPU
        y = model(batch.x.to(dev), *self.graph_on(dev)).cpu()
        return clip_forecast(self.scaler.inverse_transform(y), self.forecast_limits)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> MetricSums:
        """Masked error sums of ``model`` on a split, in data units."""
        total = MetricSums.zeros(self.horizon)
        for batch in self.loader(split):
            total = total + masked_error_sums(self.predict(model, batch), batch.y, batch.mask)
        return total

    def persistence(self, split: str) -> MetricSums:
        """Error sums of the last-value forecast (each horizon step = last input value)."""
        total = MetricSums.zeros(self.horizon)
        for batch in self.loader(split):
            y_hat = batch.last.unsqueeze(1).expand_as(batch.y)
            total = total + masked_error_sums(y_hat, batch.y, batch.mask)
        return total

    # ------------------------------------------------------------------ seasonal naive
    def seasonal_lag_steps(self, lag: str | pd.Timedelta) -> int | None:
        """The seasonal-naive lag in steps of ``dataset.freq``, or ``None`` where it is not defined.

        Args:
            lag: a pandas timedelta (or its string, e.g. ``"1D"``, ``"7D"``).

        Returns:
            ``lag / freq`` as an int; ``None`` when ``freq`` does not divide ``lag`` (e.g. 7-minute
            steps and one day) or the lag is shorter than the horizon in steps (the value one lag
            before a target would lie after the forecast origin, i.e. in the future).
        """
        lag, freq = pd.Timedelta(lag), self.dataset.freq
        if lag <= pd.Timedelta(0) or lag % freq != pd.Timedelta(0):
            return None
        steps = int(lag // freq)
        return steps if steps >= self.horizon else None

    def seasonal_naive(self, split: str, lag: str | pd.Timedelta) -> MetricSums:
        """Error sums of the seasonal naive forecast: target step ``s`` is forecast by the value at
        ``s - L``, ``L`` = ``lag`` in steps (:meth:`seasonal_lag_steps`), the "same time one day/week
        earlier" of Hyndman & Athanasopoulos, *Forecasting: Principles and Practice* (3rd ed.,
        section 5.2).

        Where the value at ``s - L`` is masked, or ``s - L`` lies before the usable history (the
        start of the training part, ``bounds["train"][0]``, which ``task.train_history`` moves),
        the forecast falls back to the window's last valid input value per node and channel
        (persistence; where no input of the window is valid, persistence's own last input value),
        so the forecast is defined on every window. ``L >= horizon``, so ``s - L`` always lies at or
        before the window's last input step: nothing after the forecast origin is used.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            lag: the season, a pandas timedelta (or its string, ``"1D"``, ``"7D"``).

        Returns:
            Sums of shape ``[horizon]`` in data units; all zero (every metric ``None``) when the lag
            is not defined for this data and horizon (:meth:`seasonal_lag_steps` is ``None``).
        """
        total = MetricSums.zeros(self.horizon)
        lag_steps = self.seasonal_lag_steps(lag)
        if lag_steps is None:
            return total
        values = torch.from_numpy(self.dataset.values)  # [T, N, C]
        mask = torch.from_numpy(self.dataset.mask)
        valid = mask > 0
        first = self.bounds["train"][0]
        w, h = self.window, self.horizon
        for starts in torch.from_numpy(self.windows[split].starts).split(self.eval_batch_size):
            inputs = starts[:, None] + torch.arange(w)[None, :]  # [B, W]
            targets = starts[:, None] + w + torch.arange(h)[None, :]  # [B, H]
            lagged = targets - lag_steps  # [B, H], <= the last input step since L >= H
            # last valid input per node and channel: its position in the window (-1: none valid)
            pos = torch.where(valid[inputs], torch.arange(w).view(1, w, 1, 1), -1).amax(dim=1)  # [B, N, C]
            last_valid = values[inputs].gather(1, pos.clamp_min(0).unsqueeze(1)).squeeze(1)
            fallback = torch.where(pos >= 0, last_valid, values[inputs[:, -1]])  # [B, N, C]
            at = lagged.clamp_min(0)
            usable = (lagged >= first)[:, :, None, None] & valid[at]  # [B, H, N, C]
            y_hat = torch.where(usable, values[at], fallback[:, None])
            total = total + masked_error_sums(y_hat, values[targets], mask[targets])
        return total


#: ``train.optimizer._target_`` -> optimizer class: the only optimizers built from a config (the
#: config is data; nothing named in it is imported).
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {"torch.optim.Adam": torch.optim.Adam,
                                                      "torch.optim.AdamW": torch.optim.AdamW,
                                                      "torch.optim.SGD": torch.optim.SGD}


def build_optimizer(params: Iterable[nn.Parameter], target: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer._target_`` names, over ``params``.

    Args:
        target: a key of :data:`OPTIMIZERS` (e.g. ``"torch.optim.Adam"``).
        lr: learning rate (``train.lr``).
        weight_decay: ``train.weight_decay``.

    Raises:
        ValueError: ``target`` is not in :data:`OPTIMIZERS` (the allowed list is named).
    """
    if target not in OPTIMIZERS:
        raise ValueError(f"train.optimizer._target_={target!r} is not a registered optimizer; allowed: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[target](params, lr=float(lr), weight_decay=float(weight_decay))


def train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    tasks: list[tuple["TerritoryTask", int]],
    epochs: int,
    seed: int,
    grad_clip: float | None = 5.0,
    proximal_mu: float = 0.0,
    proximal_names: Collection[str] | None = None,
    proximal_reference: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Train ``model`` in place on the training windows of one or more territories.

    Each batch comes from one territory (with its own graph); with several territories the
    batches of an epoch are interleaved in a seeded random order (centralized training on the
    union of windows). Loss: masked MAE on scaled targets, plus the FedProx term
    ``mu/2 * ||w - w_ref||^2`` when ``proximal_mu > 0``: ``w_ref`` is the model's weights at the
    start (FedProx, Li et al., MLSys 2020) or ``proximal_reference`` (Ditto's personal objective
    ``F_k(v) + lam/2 ||v - w_global||^2``, Li et al., ICML 2021, with ``w_global`` the global
    model received this round, not ``v``'s start value).

    Args:
        tasks: ``(task, shuffle_seed)`` pairs; epoch ``e`` shuffles with ``shuffle_seed + e``.
        seed: seeds dropout and the interleaving.
        proximal_names: parameters under the proximal term (default: all).
        proximal_reference: name -> reference tensor (same shape) for every parameter under the
            proximal term; ``None``: the model's weights at the start.

    Raises:
        ValueError: ``proximal_reference`` lacks a parameter under the term or has another shape.

    Returns:
        The last epoch's training loss: the batch losses' windows-weighted mean
        (:func:`fedldt.metrics.windows_weighted_mean`); 0.0 when there was no batch.
    """
    seed_everything(seed)
    model.train()
    prox_params = [p for name, p in model.named_parameters() if proximal_names is None or name in proximal_names]
    start_params = None
    if proximal_mu > 0 and proximal_reference is None:
        start_params = [p.detach().clone() for p in prox_params]
    elif proximal_mu > 0:
        names = [name for name, _ in model.named_parameters() if proximal_names is None or name in proximal_names]
        bad = [n for n, p in zip(names, prox_params)
               if n not in proximal_reference or tuple(proximal_reference[n].shape) != tuple(p.shape)]
        if bad:
            raise ValueError(f"proximal_reference lacks or mis-shapes parameters {bad}")
        start_params = [proximal_reference[n].detach().to(device=p.device, dtype=p.dtype).clone()
                        for n, p in zip(names, prox_params)]
    dev = model_device(model)  # batches follow the model (train.device: resolve_device)
    last_loss = float("nan")
    for epoch in range(int(epochs)):
        losses: list[tuple[float, int]] = []  # (batch loss, windows in the batch)
        batches = [(task, b) for task, s in tasks for b in task.loader("train", shuffle=True, seed=s + epoch)]
        order = np.random.default_rng(seed + epoch).permutation(len(batches)) if len(tasks) > 1 else range(len(batches))
        for i in order:
            task, batch = batches[i]
            opt.zero_grad()
            y_hat = model(batch.x.to(dev), *task.graph_on(dev))
            loss = masked_mae_loss(y_hat, batch.y_scaled.to(dev), batch.mask.to(dev))
            if start_params is not None:
                prox = sum(((p - g) ** 2).sum() for p, g in zip(prox_params, start_params))
                loss = loss + 0.5 * proximal_mu * prox
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            losses.append((float(loss.detach()), int(batch.x.shape[0])))
        last_loss = windows_weighted_mean(losses) or 0.0
    return last_loss


def train_history_steps(dataset: TerritoryDataset, text: str) -> int:
    """``task.train_history.<dataset.name>`` in steps of ``dataset.freq``.

    Args:
        text: a pandas timedelta string (``"1D"``, ``"12h"``; :func:`fedldt.schema.train_history_timedelta`).

    Returns:
        N = duration / ``dataset.freq`` (e.g. ``"1D"`` on 5-minute data: 288).

    Raises:
        ConfigError: not a positive duration, or not a whole number of the data's steps (the key,
            the value and the step named).
    """
    delta, freq = train_history_timedelta(dataset.name, text), dataset.freq
    if delta % freq != pd.Timedelta(0):
        raise ConfigError(f"task.train_history.{dataset.name}={str(text)[:40]!r} is not a whole number of the data's "
                          f"{duration_text(freq)} steps: give a multiple of {duration_text(freq)}")
    return int(delta // freq)


def duration_text(delta: pd.Timedelta) -> str:
    """A duration as a pandas timedelta string that reads back (``4D21h35min``, ``5min``, ``0s``)."""
    c = pd.Timedelta(delta).components
    parts = [(c.days, "D"), (c.hours, "h"), (c.minutes, "min"), (c.seconds, "s"), (c.milliseconds, "ms")]
    return "".join(f"{v}{unit}" for v, unit in parts if v) or "0s"


def kept_train_bounds(dataset: TerritoryDataset, train: tuple[int, int], n: int, window: int,
                      horizon: int) -> tuple[int, int]:
    """The last ``n`` steps ``[t1 - n, t1)`` of the training part ``train = [t0, t1)``
    (``task.train_history``).

    Raises:
        ConfigError: ``n`` is shorter than one window (``window + horizon``), longer than the
            training part, or keeps only missing values (``task.train_history.<dataset.name>`` and
            the fix named).
    """
    t0, t1 = train
    key, need = f"task.train_history.{dataset.name}", window + horizon
    span = lambda k: f"{k} steps ({duration_text(k * dataset.freq)})"  # noqa: E731
    if n < need:
        raise ConfigError(f"{key} keeps {span(n)} of the training part, fewer than one window (task.window + "
                          f"task.horizon = {span(need)}): keep at least {duration_text(need * dataset.freq)}, or null for all")
    if n > t1 - t0:
        raise ConfigError(f"{key} keeps {span(n)} but the training part of territory '{dataset.name}' has {span(t1 - t0)}: "
                          f"keep at most {duration_text((t1 - t0) * dataset.freq)}, or null for all")
    if not (dataset.mask[t1 - n:t1] > 0).any():  # nothing to fit the scaler or train on: a silent 0 loss
        raise ConfigError(f"{key} keeps {span(n)} of territory '{dataset.name}''s training part, in which every value "
                          "is missing (mask 0): keep a longer history, or null for all")
    return t1 - n, t1


def check_train_history_names(task_cfg: Mapping[str, Any], names: Collection[str]) -> None:
    """Check that every territory ``task.train_history`` names exists.

    Args:
        task_cfg: the ``task`` config block (``train_history`` absent or ``{}``: nothing to check).
        names: the territories' names (``dataset.name`` of each territory).

    Raises:
        ConfigError: a name in ``task.train_history`` that is no territory's; the known names given.
    """
    unknown = sorted(set(task_cfg.get("train_history") or {}) - set(names))
    if unknown:
        shown = [str(u)[:64] for u in unknown[:5]] + ([f"... {len(unknown) - 5} more"] if len(unknown) > 5 else [])
        raise ConfigError(f"task.train_history names no territory {shown}: the territories are {sorted(names)}; "
                          "use their names (or remove the key)")


def task_from_config(dataset: TerritoryDataset, task_cfg: Mapping[str, Any], train_cfg: Mapping[str, Any],
                     valid_range: Mapping[str, Any] | None = None) -> TerritoryTask:
    """Build a :class:`TerritoryTask` from the ``task`` and ``train`` config blocks and the
    dataset's ``valid_range`` (``cfg["dataset"].get("valid_range")``: forecasts are clipped to it);
    when that is ``None``, the territory's own (``dataset.extra["valid_range"]``, from a territory
    data package's ``territory.yaml``). ``task.train_history.<dataset.name>``, when set, keeps
    only the last that-long part of the training part (:func:`train_history_steps`).

    Raises:
        ConfigError: a bad ``task.train_history`` entry for this territory; see also :class:`TerritoryTask`.
    """
    if valid_range is None:
        valid_range = dataset.extra.get("valid_range")
    history = (task_cfg.get("train_history") or {}).get(dataset.name)
    return TerritoryTask(
        dataset,
        window=task_cfg["window"],
        horizon=task_cfg["horizon"],
        split=tuple(task_cfg["split"]),
        scaler_per_node=task_cfg["scaler_per_node"],
        time_of_day=task_cfg["time_of_day"],
        day_of_week=task_cfg["day_of_week"],
        batch_size=train_cfg["batch_size"],
        eval_batch_size=train_cfg["eval_batch_size"],
        covariates=task_cfg.get("covariates", False),
        ha_period=task_cfg.get("ha_period", "day"),
        train_stride=task_cfg.get("train_stride", 1),
        valid_range=valid_range,
        train_history_steps=None if history is None else train_history_steps(dataset, history),
    )


def train_epochs_dpsgd(model: nn.Module, opt: torch.optim.Optimizer, task: "TerritoryTask", epochs: int, seed: int,
                       noise_multiplier: float, clipping_norm: float, batch_first: bool) -> float:
    """DP-SGD (Abadi et al., CCS 2016) with Opacus on one territory's training windows, in place.

    Batches are Poisson-sampled (``opacus.utils.uniform_sampler.UniformWithReplacementSampler``,
    rate and steps of :func:`fedldt.privacy.dpsgd_schedule`); each window's gradient of its own
    masked MAE (:func:`fedldt.privacy.per_window_masked_mae`) is clipped to ``clipping_norm``
    (L2, over all trainable parameters) and Gaussian noise of std ``noise_multiplier *
    clipping_norm`` is added to their sum (``opacus.optimizers.DPOptimizer``). Sampling and noise
    use generators seeded from ``seed`` (the run seed, territory and round: same seed, same
    noise). A batch that Poisson sampling leaves empty (probability ``(1-q)^N``, about
    ``e^-batch_size``) is skipped.

    Args:
        batch_first: whether the model's layers see the batch in dimension 0 (Opacus'
            ``GradSampleModule(batch_first=...)``; DCRNN's see ``[node, batch, feature]``).

    Returns:
        The last epoch's training loss, as :func:`train_epochs`.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from fedldt.models.diffusion import per_term_linears
    from fedldt.privacy import dpsgd_schedule, per_window_masked_mae

    seed_everything(seed)
    model.train()
    data = task.windows["train"]
    q, steps = dpsgd_schedule(len(data), task.batch_size, 1)
    gen_sample = torch.Generator().manual_seed(derive_seed(seed, 1))
    dev = model_device(model)
    gen_noise = torch.Generator(device=dev).manual_seed(derive_seed(seed, 2))  # Opacus draws noise on the parameters' device
    with per_term_linears(model):  # Opacus needs each nn.Linear's own forward
        gsm = GradSampleModule(model, batch_first=batch_first, loss_reduction="mean")
        dp_opt = DPOptimizer(opt, noise_multiplier=noise_multiplier, max_grad_norm=clipping_norm,
                             expected_batch_size=max(1, int(len(data) * q)), loss_reduction="mean", generator=gen_noise)
        last_loss = float("nan")
        try:
            for _ in range(int(epochs)):
                sampler = UniformWithReplacementSampler(num_samples=len(data), sample_rate=q, generator=gen_sample, steps=steps)
                losses: list[tuple[float, int]] = []
                for idx in sampler:
                    if not idx:
                        continue
                    batch = collate([data[i] for i in idx])
                    dp_opt.zero_grad()
                    loss = per_window_masked_mae(gsm(batch.x.to(dev), *task.graph_on(dev)), batch.y_scaled.to(dev),
                                                 batch.mask.to(dev))
                    loss.backward()
                    dp_opt.step()
                    losses.append((float(loss.detach()), int(batch.x.shape[0])))
                last_loss = windows_weighted_mean(losses) or 0.0
        finally:
            gsm._close()  # remove Opacus' hooks and grad_sample attributes: the model is a plain module again
    return last_loss
