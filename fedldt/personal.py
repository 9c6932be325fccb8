"""Personalization after (or beside) federated training: fine-tuning that keeps the better model.

``personalization=finetune``: after the last federated round each territory fine-tunes the final
global model (with its own local entries) on its own training windows, with early stopping on
its own validation MAE, and keeps the global or the fine-tuned model, whichever validates better
(ties keep the global model), so that personalization cannot make a territory worse on its
validation windows. The same loop fine-tunes a held-out territory's zero-shot model
(``federation.holdout_finetune``). Usable without Flower (``clients/territory.py`` calls it).

Ditto (Li et al., "Ditto: Fair and Robust Federated Learning Through Personalization", ICML 2021)
is the proximal term of :func:`fedldt.engine.train_epochs` with ``proximal_reference`` = the global
model of the round (``clients/territory.py``).
"""

from __future__ import annotations

import copy
import json
import math
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from fedldt.engine import TerritoryTask, build_optimizer, derive_seed, train_epochs
from fedldt.metrics import MetricSums, mae, report

#: ``kept`` values of :func:`finetune` and their integer codes in a territory's reply (the egress
#: allows numbers and identifiers only: ``fedldt.egress.FINETUNE_METRICS``).
KEPT = ("global", "finetuned")
#: Fine-tuning options where ``personalization`` is not ``finetune`` (the held-out territory's
#: fine-tuning, ``federation.holdout_finetune``): those of ``conf/personalization/finetune.yaml``.
FINETUNE_DEFAULTS = {"epochs": 20, "lr": 0.001, "patience": 3}
#: Config key of the server's evaluate messages: which model a territory evaluates (``global``: the
#: global weights with its local entries; ``personal``: Ditto's personal model; ``kept``: the model
#: it kept after fine-tuning, from its own folder; absent = the personal model where there is one).
USE_MODEL = "use-model"
#: Config key of the held-out territory's finetune/evaluate messages: its fine-tuning history
#: (``federation.holdout_finetune``, e.g. ``"3D"``).
HISTORY = "finetune-history"
#: Ditto's keys in the territory's local state: ``PERSONAL_PREFIX + <state-dict key>``.
PERSONAL_PREFIX = "personal/"


def validation_mae(task: TerritoryTask, model: nn.Module) -> float | None:
    """Masked MAE over every validation window and horizon step, in data units; ``None`` when the
    split has no valid target, or the forecast is not finite (a diverged model)."""
    value = mae(task.evaluate(model, "val"))
    return None if value is None or not math.isfinite(value) else float(value)


def finetune(task: TerritoryTask, model: nn.Module, epochs: int, lr: float, patience: int, seed: int, *,
             optimizer: str = "torch.optim.Adam", weight_decay: float = 0.0,
             grad_clip: float | None = 5.0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Fine-tune ``model`` on ``task``'s training windows; keep it only if it validates better.

    One epoch at a time (:func:`fedldt.engine.train_epochs`, masked MAE on scaled targets, a
    fresh ``optimizer`` over every parameter, local entries included), the validation MAE after
    each; stops after ``epochs`` epochs, after ``patience`` epochs in a row without a new best, or
    when the training loss or the validation forecast is no longer finite. The fine-tuned
    candidate is the best epoch. It is kept only when its validation MAE is strictly lower than
    the starting (global) model's; a tie, a split without valid target or a diverged run keeps
    the global model.

    Args:
        task: the territory's task (its training and validation windows).
        model: the starting model (the final global model with the territory's local entries);
            changed in place, the returned state is what to keep.
        epochs: at most this many epochs (>= 0; 0 keeps the global model).
        lr: learning rate of the fine-tuning optimizer.
        patience: epochs without improvement before stopping (>= 1).
        seed: fixes shuffling and dropout (epoch ``e`` uses ``derive_seed(seed, e)``).
        optimizer: a key of :data:`fedldt.engine.OPTIMIZERS`.
        weight_decay, grad_clip: as in :meth:`fedldt.engine.TerritoryTask.fit`.

    Returns:
        ``(state, info)``: the kept model's state dict (copies), and ``{"kept": "global" |
        "finetuned", "val_mae_global": float | None, "val_mae_finetuned": float | None (best
        epoch; ``None`` when no epoch gave a finite one), "epochs_run": int}``.

    Raises:
        ValueError: ``epochs < 0``, ``patience < 1`` or ``lr <= 0``; an unknown optimizer.
    """
    if epochs < 0 or patience < 1 or not lr > 0:
        raise ValueError(f"finetune needs epochs >= 0, patience >= 1 and lr > 0 (got {epochs}, {patience}, {lr}); "
                         "see personalization.epochs/patience/lr")
    start = copy.deepcopy(model.state_dict())
    val_global = validation_mae(task, model)
    best, best_state, bad, run = None, None, 0, 0
    opt = build_optimizer(model.parameters(), optimizer, lr=lr, weight_decay=weight_decay)
    if val_global is not None:
        for epoch in range(int(epochs)):
            run += 1
            s = derive_seed(seed, epoch)
            loss = train_epochs(model, opt, [(task, s)], 1, s, grad_clip=grad_clip)
            value = validation_mae(task, model) if math.isfinite(loss) else None
            if value is None:  # diverged: nothing later can be trusted
                break
            if best is None or value < best:
                best, best_state, bad = value, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= patience:
                    break
    kept = "finetuned" if best is not None and val_global is not None and best < val_global else "global"
    state = best_state if kept == "finetuned" else start
    model.load_state_dict(state)
    return state, {"kept": kept, "val_mae_global": val_global, "val_mae_finetuned": best, "epochs_run": run}


def holdout_block(name: str, zero_shot: Mapping[str, MetricSums], finetuned: MetricSums | None,
                  history: str | None, steps: Sequence[int], trained: bool = True) -> dict[str, Any]:
    """``summary.json``'s ``holdout`` block (every mode writes the same).

    Args:
        name: the held-out territory (``federation.holdout``).
        zero_shot: its test sums (:func:`fedldt.results.evaluation_sums`): ``model`` = the final
            global (or centralized) model, never trained on it, and the reference forecasts.
        finetuned: test sums of the model it kept after fine-tuning (``None``: not asked).
        history: ``federation.holdout_finetune``.
        trained: ``False`` where no model can be applied to it (local mode: a territory without
            data of its own in training has no model): ``zero_shot`` is then ``null``.

    Returns:
        ``{"territory", "zero_shot", "finetuned", "finetune_history", "references": {<ref>: block}}``
        (blocks of :func:`fedldt.metrics.report`).
    """
    from fedldt.results import REFERENCES

    return {"territory": str(name), "zero_shot": report(zero_shot["model"], steps) if trained else None,
            "finetuned": None if finetuned is None else report(finetuned, steps),
            "finetune_history": None if history is None else str(history),
            "references": {ref: report(zero_shot[ref], steps) for ref in REFERENCES}}


def with_train_history(cfg: Mapping[str, Any], name: str, history: str) -> dict[str, Any]:
    """A copy of the run config in which territory ``name`` keeps only the last ``history`` (a
    pandas duration, e.g. ``"3D"``) of its training part: ``task.train_history[name] = history``,
    applied by :func:`fedldt.engine.task_from_config` (validation and test unchanged)."""
    out = json.loads(json.dumps(cfg))
    out["task"]["train_history"] = {**(out["task"].get("train_history") or {}), str(name): str(history)}
    return out


def finetune_from_config(task: TerritoryTask, model: nn.Module, cfg: Mapping[str, Any],
                         index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """:func:`finetune` with the run's options: ``personalization.epochs``/``lr``/``patience`` when
    ``personalization=finetune``, else :data:`FINETUNE_DEFAULTS` (the held-out territory's
    fine-tuning); optimizer, weight decay and gradient clipping of ``train``; seed from the run
    seed and the territory ``index``."""
    p = cfg["personalization"] if cfg.get("personalization", {}).get("name") == "finetune" else FINETUNE_DEFAULTS
    tr = cfg["train"]
    return finetune(task, model, int(p["epochs"]), float(p["lr"]), int(p["patience"]),
                    derive_seed(int(cfg["seed"]), index, 2**31 - 1), optimizer=tr["optimizer"]["_target_"],
                    weight_decay=tr["weight_decay"], grad_clip=tr["grad_clip"])
