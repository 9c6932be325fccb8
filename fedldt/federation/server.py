"""The federated run on the server side: discover territories, run FedAvg, test, write results.

Called by ``server/server_app.py`` with Flower's :class:`Grid`; the data never comes here,
only what territories report (sizes, parameters, error sums).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedldt.config import num_territories
from fedldt.engine import seed_everything
from fedldt.federation.strategy import FedLDTAvg, failure_reasons, reply_territory
from fedldt.metrics import MetricSums
from fedldt.models import build_model
from fedldt.results import REFERENCES, build_summary, write_run_outputs

CONFIG_KEY = "fedldt-config"


class FederationError(RuntimeError):
    """The federation cannot go on (missing territories, failed replies); the message says why."""


def config_record(cfg: dict[str, Any], **extra: Any) -> ConfigRecord:
    """The run config as it travels to territories: one JSON string plus flat extras."""
    return ConfigRecord({CONFIG_KEY: json.dumps(cfg, sort_keys=True), **extra})


def discover_territories(grid: Grid, cfg: dict[str, Any], timeout: float) -> dict[int, dict[str, Any]]:
    """Ask every connected SuperNode which territory it serves and its sizes (QUERY messages).

    Waits until as many nodes as the pilot has territories are connected.

    Returns:
        territory index -> info (``territory-id``, ``num-nodes``, window counts, model dims).

    Raises:
        FederationError: nodes missing after ``timeout`` s, a node failed, two nodes claim the
            same territory, or territories disagree on the model's input/output sizes.
    """
    expected = num_territories(cfg)
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(nodes)} of {expected} territory nodes connected within {timeout:.0f}s")
        time.sleep(1.0)
    msgs = [Message(RecordDict({"config": config_record(cfg)}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    failed = failure_reasons(replies)
    if failed:
        raise FederationError(f"territory discovery failed on {len(failed)} node(s): {failed}")
    infos: dict[int, dict[str, Any]] = {}
    for r in replies:
        info = dict(r.content["info"])
        idx = int(info["territory"])
        if idx in infos:
            raise FederationError(f"two SuperNodes serve territory {idx}; each territory needs exactly one")
        infos[idx] = info
    if sorted(infos) != list(range(expected)):
        raise FederationError(f"territories {sorted(infos)} answered; the pilot has {expected} (0..{expected - 1})")
    dims = {(i["in-channels"], i["out-channels"], i["horizon"]) for i in infos.values()}
    if len(dims) != 1:
        raise FederationError(f"territories disagree on model sizes (in, out, horizon): {sorted(dims)}")
    return dict(sorted(infos.items()))


def evaluate_split(grid: Grid, strategy: FedLDTAvg, arrays: ArrayRecord, cfg: dict[str, Any], split: str,
                   server_round: int, timeout: float) -> dict[int, dict[str, MetricSums]]:
    """Evaluate ``arrays`` on every territory's ``split``; returns per-territory model/persistence sums.

    Raises:
        FederationError: a territory failed or did not answer.
    """
    msgs = strategy.configure_evaluate(server_round, arrays, config_record(cfg, split=split), grid)
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    failed = failure_reasons(replies)
    if failed:
        raise FederationError(f"final {split} evaluation failed on {len(failed)} node(s): {failed}")
    out = {}
    for r in replies:
        rec = next(iter(r.content.metric_records.values()))
        out[reply_territory(r)] = {k: MetricSums.from_dict(rec, f"{k}.") for k in ("model", *REFERENCES)}
    expected = num_territories(cfg)
    if sorted(out) != list(range(expected)):
        raise FederationError(f"final {split} evaluation: territories {sorted(out)} answered, expected 0..{expected - 1}")
    return dict(sorted(out.items()))


def run_federated(grid: Grid, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run the pilot's federated training and write the results folder.

    Args:
        grid: Flower grid (simulation or deployment).
        cfg: resolved config (see :func:`fedldt.config.resolve_config`).
        run_dir: absolute output folder (created).

    Returns:
        The ``summary.json`` content.

    Raises:
        FederationError: see :func:`discover_territories`; also when every territory failed in a
            round (Flower itself would carry on silently).
    """
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg["seed"]))
    timeout = float(cfg["federation"]["timeout_s"])
    infos = discover_territories(grid, cfg, timeout)
    ids = {i: str(info["territory-id"]) for i, info in infos.items()}
    print(f"[fedldt] {len(infos)} territories: " + ", ".join(f"{ids[i]} ({infos[i]['num-nodes']} nodes)" for i in infos), flush=True)
    first = next(iter(infos.values()))
    model_cfg = {**cfg["model"], "in_channels": int(first["in-channels"]), "out_channels": int(first["out-channels"]),
                 "horizon": int(first["horizon"])}
    model = build_model(model_cfg)
    k = len(infos)
    rounds = int(cfg["train"]["rounds"])
    strategy = FedLDTAvg(
        territory_ids=ids, report_steps=list(cfg["task"]["report_steps"]), num_rounds=rounds,
        fraction_train=float(cfg["strategy"]["fraction_train"]), fraction_evaluate=float(cfg["strategy"]["fraction_evaluate"]),
        min_train_nodes=k, min_evaluate_nodes=k, min_available_nodes=k,
    )
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds, timeout=timeout,
        train_config=config_record(cfg), evaluate_config=config_record(cfg, split="val"),
    )
    if strategy.failures:
        print(f"[fedldt] WARNING: {len(strategy.failures)} failed replies: {strategy.failures}", flush=True)
    trained_rounds = {f["round"] for f in strategy.failures if f["phase"] == "train"}
    if any(sum(1 for f in strategy.failures if f["round"] == r and f["phase"] == "train") >= k for r in trained_rounds):
        raise FederationError(f"every territory failed in a training round: {strategy.failures}")
    test = evaluate_split(grid, strategy, result.arrays, cfg, "test", rounds + 1, timeout)
    territories = [
        {"id": ids[i], "num_nodes": int(infos[i]["num-nodes"]), "num_train_windows": int(infos[i]["num-train"]),
         "num_val_windows": int(infos[i]["num-val"]), "num_test_windows": int(infos[i]["num-test"])}
        for i in infos
    ]
    summary = build_summary(cfg, "federated", territories, {ids[i]: t for i, t in test.items()}, strategy.rounds,
                            strategy.failures, model_cfg, time.time() - t_start)
    final = build_model(model_cfg)
    final.load_state_dict(result.arrays.to_torch_state_dict())
    write_run_outputs(run_dir, cfg, summary, strategy.history, {"state_dict": final.state_dict(), "model_config": model_cfg})
    print(f"[fedldt] results written to {run_dir}", flush=True)
    return summary
