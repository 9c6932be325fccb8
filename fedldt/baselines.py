"""Reference training modes on the very same territory splits as the federated run.

* ``centralized``: one model trained on the union of all territories' training windows
  (each territory still scaled by its own training statistics; each batch comes from one
  territory and its graph), evaluated per territory and pooled. The privacy-free reference.
* ``local``: each territory trains its own model on its own data only.

With ``federation.holdout`` the held-out territory takes no part in training in either mode (the
pooled test covers the others) and ``summary.json`` gets the ``holdout`` block
(:func:`fedldt.personal.holdout_block`): ``centralized`` evaluates it zero-shot with the
centralized model (and, with ``federation.holdout_finetune``, after fine-tuning a copy on the last
that-long part of its training part); ``local`` has no model for it (a territory without training
has none): its ``zero_shot`` and ``finetuned`` are ``null``, only its reference forecasts are
reported.

Both train for ``train.rounds * train.local_epochs`` epochs with one optimizer (``train.optimizer``), start
from the same initial weights as the federated run (``seed``), evaluate on the validation
windows every ``train.local_epochs`` epochs (one "round") and write the same results folder
and ``summary.json`` schema as the federated run.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from fedldt.config import load_territories
from fedldt.engine import (TerritoryTask, build_optimizer, cpu_state, derive_seed, seed_everything, task_from_config,
                           train_device, train_epochs)
from fedldt.launch.progress import RunProgress, round_line
from fedldt.metrics import pool, report
from fedldt.models import build_model
from fedldt.personal import finetune_from_config, holdout_block, with_train_history
from fedldt.results import (build_summary, evaluation_sums, history_row, round_row, territory_info, territory_row,
                            write_run_outputs)

MODES = ("federated", "centralized", "local")


def build_tasks(cfg: dict[str, Any]) -> list[TerritoryTask]:
    """Every territory's task (split, scaler, windows), exactly as its federated client builds it."""
    torch.set_num_threads(int(cfg["train"].get("torch_threads", 1)))
    return [task_from_config(t, cfg["task"], cfg["train"], cfg["dataset"].get("valid_range")) for t in load_territories(cfg)]


def initial_model(cfg: dict[str, Any], task: TerritoryTask, per_territory: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model the federated server would start from (same seed, same sizes); with
    ``per_territory`` it is built for ``task``'s nodes (node-specific parameters allowed), on
    ``train.device`` (:func:`fedldt.engine.train_device`; built on the CPU first, so the initial
    weights do not depend on the device)."""
    seed_everything(int(cfg["seed"]))
    model_cfg = {**cfg["model"], **task.model_dims()}
    model = build_model(model_cfg, num_nodes=task.dataset.num_nodes if per_territory else None)
    return model.to(train_device(cfg["train"])), model_cfg


def split_holdout(cfg: dict[str, Any], tasks: list[TerritoryTask]
                  ) -> tuple[list[tuple[int, TerritoryTask]], tuple[int, TerritoryTask] | None]:
    """``(training territories as (index, task), the held-out one or None)`` by ``federation.holdout``.

    Raises:
        ValueError: no territory has that name (the names listed), or it is the only territory.
    """
    name = cfg.get("federation", {}).get("holdout")
    indexed = list(enumerate(tasks))
    if name is None:
        return indexed, None
    held = [(i, t) for i, t in indexed if t.dataset.name == str(name)]
    if not held:
        raise ValueError(f"federation.holdout={name!r} is not a territory of pilot '{cfg['name']}'; its territories are "
                         f"{[t.dataset.name for t in tasks]}")
    if len(tasks) < 2:
        raise ValueError(f"federation.holdout={name!r} leaves no territory to train")
    return [(i, t) for i, t in indexed if t.dataset.name != str(name)], held[0]


def evaluate_holdout(cfg: dict[str, Any], held: tuple[int, TerritoryTask], model: torch.nn.Module | None) -> dict[str, Any]:
    """The ``holdout`` block of a centralized (``model``) or local (``None``: no model) run:
    zero-shot test sums of ``model`` on the held-out territory and, with
    ``federation.holdout_finetune``, those of a fine-tuned copy kept by
    :func:`fedldt.personal.finetune` on the last that-long part of its training part (its task
    rebuilt with that history, as the federated territory does)."""
    idx, task = held
    steps = list(cfg["task"]["report_steps"])
    history = cfg["federation"].get("holdout_finetune")
    if model is None:
        refs = evaluation_sums(task, initial_model(cfg, task, per_territory=True)[0], "test")
        return holdout_block(task.dataset.name, refs, None, history, steps, trained=False)
    zero, finetuned = evaluation_sums(task, model, "test"), None
    if history is not None:
        short_cfg = with_train_history(cfg, task.dataset.name, history)
        short = task_from_config(task.dataset, short_cfg["task"], cfg["train"], cfg["dataset"].get("valid_range"))
        tuned = copy.deepcopy(model)
        finetune_from_config(short, tuned, cfg, idx)
        finetuned = short.evaluate(tuned, "test")
    return holdout_block(task.dataset.name, zero, finetuned, history, steps)


def _train_rounds(cfg: dict[str, Any], model: torch.nn.Module, tasks: list[tuple[int, TerritoryTask]],
                  history: list[dict[str, Any]], val: dict[int, dict[str, tuple[tuple[float, int], Any]]],
                  label: str | None) -> None:
    """Train ``model`` on ``tasks`` (index, task) round by round, appending per-territory history
    rows (:func:`~fedldt.results.history_row`) and, per round, each territory's
    ``((train loss, training windows), validation sums)`` to ``val[round][territory id]``. With
    ``tasks`` trained together (centralized) every territory's loss is the joint one. With a
    ``label``, each round prints its progress line (train loss, pooled validation MAE) and shows it
    in a :class:`~fedldt.launch.progress.RunProgress` display."""
    tr = cfg["train"]
    opt = build_optimizer(model.parameters(), tr["optimizer"]["_target_"], lr=tr["lr"], weight_decay=tr["weight_decay"])
    steps = list(cfg["task"]["report_steps"])
    rounds = int(tr["rounds"])
    with RunProgress(label) if label else nullcontext() as progress:
        for rnd in range(1, rounds + 1):
            seeds = [(task, derive_seed(cfg["seed"], idx, rnd)) for idx, task in tasks]
            loss = train_epochs(model, opt, seeds, int(tr["local_epochs"]), seed=derive_seed(cfg["seed"], 10_000, rnd),
                                grad_clip=tr["grad_clip"])
            this_round = {}
            for idx, task in tasks:
                train, sums = (loss, task.num_windows("train")), task.evaluate(model, "val")
                this_round[task.dataset.name] = (train, sums)
                history.append(history_row(rnd, task.dataset.name, steps, train=train, val=sums))
            val.setdefault(rnd, {}).update(this_round)
            if progress is not None:
                mae = report(pool(sums for _, sums in this_round.values()), [])["mae"]["all"]
                line = round_line(rnd, rounds, loss, mae, label)
                print(line, flush=True)
                progress.feed(line)


def _pooled_rounds(cfg: dict[str, Any], val: dict[int, dict[str, tuple[tuple[float, int], Any]]]) -> list[dict[str, Any]]:
    """``summary.json``'s ``history``: one :func:`~fedldt.results.round_row` per round."""
    steps = list(cfg["task"]["report_steps"])
    return [round_row(rnd, [train for train, _ in per.values()], {tid: sums for tid, (_, sums) in per.items()}, steps)
            for rnd, per in sorted(val.items())]


def run_centralized(cfg: dict[str, Any], run_dir: Path, tasks: list[TerritoryTask] | None = None) -> dict[str, Any]:
    """Train one model on all territories' training windows; write the results folder.

    Returns:
        The ``summary.json`` content (``mode = "centralized"``).
    """
    t0 = time.time()
    tasks = tasks if tasks is not None else build_tasks(cfg)
    trained, held = split_holdout(cfg, tasks)
    model, model_cfg = initial_model(cfg, trained[0][1])
    history: list[dict[str, Any]] = []
    val: dict[int, dict[str, Any]] = {}
    _train_rounds(cfg, model, trained, history, val, "centralized")
    test = {t.dataset.name: evaluation_sums(t, model, "test") for _, t in trained}
    summary = build_summary(cfg, "centralized", [territory_row(territory_info(t)) for _, t in trained], test,
                            _pooled_rounds(cfg, val), [],
                            model_cfg, time.time() - t0)
    if held is not None:
        summary["holdout"] = evaluate_holdout(cfg, held, model)
    write_run_outputs(Path(run_dir), cfg, summary, history, {"state_dict": cpu_state(model.state_dict()), "model_config": model_cfg})
    return summary


def run_local(cfg: dict[str, Any], run_dir: Path, tasks: list[TerritoryTask] | None = None) -> dict[str, Any]:
    """Train one model per territory on its own data only; write the results folder.

    ``model.pt`` holds ``{"state_dicts": {territory id: state dict}, "model_config"}``.

    Returns:
        The ``summary.json`` content (``mode = "local"``).
    """
    t0 = time.time()
    tasks = tasks if tasks is not None else build_tasks(cfg)
    history: list[dict[str, Any]] = []
    val: dict[int, dict[str, Any]] = {}
    test, states = {}, {}
    model_cfg: dict[str, Any] = {}
    trained, held = split_holdout(cfg, tasks)
    for idx, task in trained:
        model, model_cfg = initial_model(cfg, task, per_territory=True)
        _train_rounds(cfg, model, [(idx, task)], history, val, f"local {task.dataset.name}")
        test[task.dataset.name] = evaluation_sums(task, model, "test")
        states[task.dataset.name] = cpu_state(model.state_dict())
    history.sort(key=lambda r: (r["round"], [t.dataset.name for t in tasks].index(r["territory"])))
    summary = build_summary(cfg, "local", [territory_row(territory_info(t)) for _, t in trained], test,
                            _pooled_rounds(cfg, val), [],
                            model_cfg, time.time() - t0)
    if held is not None:
        summary["holdout"] = evaluate_holdout(cfg, held, None)
    write_run_outputs(Path(run_dir), cfg, summary, history, {"state_dicts": states, "model_config": model_cfg})
    return summary

