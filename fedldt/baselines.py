"""Reference training modes on the very same territory splits as the federated run.

* ``centralized``: one model trained on the union of all territories' training windows
  (each territory still scaled by its own training statistics; each batch comes from one
  territory and its graph), evaluated per territory and pooled. The privacy-free reference.
* ``local``: each territory trains its own model on its own data only.

Both train for ``train.rounds * train.local_epochs`` epochs with one optimizer (``train.optimizer``), start
from the same initial weights as the federated run (``seed``), evaluate on the validation
windows every ``train.local_epochs`` epochs (one "round") and write the same results folder
and ``summary.json`` schema as the federated run.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from fedldt.config import load_territories
from fedldt.engine import TerritoryTask, build_optimizer, derive_seed, seed_everything, task_from_config, train_epochs
from fedldt.launch.progress import RunProgress, round_line
from fedldt.metrics import pool, report
from fedldt.models import build_model
from fedldt.results import (build_summary, evaluation_sums, history_row, round_row, territory_info, territory_row,
                            write_run_outputs)

MODES = ("federated", "centralized", "local")


def build_tasks(cfg: dict[str, Any]) -> list[TerritoryTask]:
    """Every territory's task (split, scaler, windows), exactly as its federated client builds it."""
    torch.set_num_threads(int(cfg["train"].get("torch_threads", 1)))
    return [task_from_config(t, cfg["task"], cfg["train"], cfg["dataset"].get("valid_range")) for t in load_territories(cfg)]


def initial_model(cfg: dict[str, Any], task: TerritoryTask, per_territory: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model the federated server would start from (same seed, same sizes); with
    ``per_territory`` it is built for ``task``'s nodes (node-specific parameters allowed)."""
    seed_everything(int(cfg["seed"]))
    model_cfg = {**cfg["model"], **task.model_dims()}
    return build_model(model_cfg, num_nodes=task.dataset.num_nodes if per_territory else None), model_cfg


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
    model, model_cfg = initial_model(cfg, tasks[0])
    history: list[dict[str, Any]] = []
    val: dict[int, dict[str, Any]] = {}
    _train_rounds(cfg, model, list(enumerate(tasks)), history, val, "centralized")
    test = {t.dataset.name: evaluation_sums(t, model, "test") for t in tasks}
    summary = build_summary(cfg, "centralized", [territory_row(territory_info(t)) for t in tasks], test,
                            _pooled_rounds(cfg, val), [],
                            model_cfg, time.time() - t0)
    write_run_outputs(Path(run_dir), cfg, summary, history, {"state_dict": model.state_dict(), "model_config": model_cfg})
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
    for idx, task in enumerate(tasks):
        model, model_cfg = initial_model(cfg, task, per_territory=True)
        _train_rounds(cfg, model, [(idx, task)], history, val, f"local {task.dataset.name}")
        test[task.dataset.name] = evaluation_sums(task, model, "test")
        states[task.dataset.name] = model.state_dict()
    history.sort(key=lambda r: (r["round"], [t.dataset.name for t in tasks].index(r["territory"])))
    summary = build_summary(cfg, "local", [territory_row(territory_info(t)) for t in tasks], test,
                            _pooled_rounds(cfg, val), [],
                            model_cfg, time.time() - t0)
    write_run_outputs(Path(run_dir), cfg, summary, history, {"state_dicts": states, "model_config": model_cfg})
    return summary

