"""The federated run on the server side: discover territories, run FedAvg, test, write results.

Called by ``server/server_app.py`` with Flower's :class:`Grid`; the data never comes here,
only what territories report (sizes, parameters, error sums).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedldt.config import num_territories, territory_view
from fedldt.egress import CONFIG_KEY
from fedldt.engine import seed_everything
from fedldt.metrics import MetricSums
from fedldt.models import build_model, split_state
from fedldt.results import build_summary, sums_from_record, territory_row, write_run_outputs
from fedldt.privacy import round_events
from server.strategy import FedLDTStrategy, FederationError, build_strategy, failure_reasons, reply_territory, with_privacy


def config_record(cfg: dict[str, Any], **extra: Any) -> ConfigRecord:
    """The run config as it travels to territories: one JSON string (without the script-only
    ``sweep``/``compare`` blocks, :func:`fedldt.config.territory_view`) plus flat extras."""
    return ConfigRecord({CONFIG_KEY: json.dumps(territory_view(cfg), sort_keys=True, allow_nan=False), **extra})


def discover_territories(grid: Grid, cfg: dict[str, Any], timeout: float) -> dict[int, dict[str, Any]]:
    """Ask every connected SuperNode which territory it serves and its sizes (QUERY messages).

    Waits until as many nodes as the pilot has territories are connected.

    Returns:
        territory index -> info (``territory-id``, ``num-nodes``, window counts, model dims,
        and ``node_id``: the SuperNode that serves it).

    Raises:
        FederationError: nodes missing after ``timeout`` s, a node failed, two nodes claim the
            same territory, two territories have the same name (``territory-id``), or territories
            disagree on the model's input/output sizes.
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
        infos[idx] = {**info, "node_id": int(r.metadata.src_node_id)}
    if sorted(infos) != list(range(expected)):
        raise FederationError(f"territories {sorted(infos)} answered; the pilot has {expected} (0..{expected - 1})")
    names: dict[str, int] = {}
    for idx, info in sorted(infos.items()):  # a territory's name comes from its own data (e.g. its package)
        other = names.setdefault(str(info["territory-id"]), idx)
        if other != idx:
            raise FederationError(f"territories {other} and {idx} are both named {str(info['territory-id'])!r}; each "
                                  "territory needs its own name (territory.yaml 'name' of its data package)")
    dims = {(i["in-channels"], i["out-channels"], i["horizon"]) for i in infos.values()}
    if len(dims) != 1:
        raise FederationError(f"territories disagree on model sizes (in, out, horizon): {sorted(dims)}")
    return dict(sorted(infos.items()))


def evaluate_split(grid: Grid, strategy: FedLDTStrategy, arrays: ArrayRecord, cfg: dict[str, Any], split: str,
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
        out[reply_territory(r)] = sums_from_record(rec)
    expected = num_territories(cfg)
    if sorted(out) != list(range(expected)):
        raise FederationError(f"final {split} evaluation: territories {sorted(out)} answered, expected 0..{expected - 1}")
    return dict(sorted(out.items()))


def min_train_territories(cfg: dict[str, Any]) -> int:
    """``federation.min_train_territories``: successful training replies a round needs
    (``null``/absent = every territory).

    Raises:
        ValueError: not an integer in 1..number of territories.
    """
    k = num_territories(cfg)
    value = cfg.get("federation", {}).get("min_train_territories")
    if value is None:
        return k
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= k:
        raise ValueError(f"federation.min_train_territories={value!r} must be an integer in 1..{k} "
                         f"(partition.num_territories), or null for all")
    return value


def run_federated(grid: Grid, cfg: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """Run the pilot's federated training and write the results folder.

    Args:
        grid: Flower grid (simulation or deployment).
        cfg: resolved config (see :func:`fedldt.config.resolve_config`).
        run_dir: absolute output folder (created).

    Returns:
        The ``summary.json`` content.

    Raises:
        FederationError: see :func:`discover_territories`; also when fewer than
            ``federation.min_train_territories`` territories trained in a round (Flower itself
            would carry on silently). Failed replies of a round that still had enough are
            recorded in ``summary.json`` (``failures``) and ``history.csv`` (``train_status``,
            ``eval_status``, ``error``).
        ValueError: ``federation.min_train_territories`` is invalid.
    """
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg["seed"]))
    timeout = float(cfg["federation"]["timeout_s"])
    min_train = min_train_territories(cfg)
    infos = discover_territories(grid, cfg, timeout)
    ids = {i: str(info["territory-id"]) for i, info in infos.items()}
    print(f"[fedldt] {len(infos)} territories: " + ", ".join(f"{ids[i]} ({infos[i]['num-nodes']} nodes)" for i in infos), flush=True)
    first = next(iter(infos.values()))
    model_cfg = {**cfg["model"], "in_channels": int(first["in-channels"]), "out_channels": int(first["out-channels"]),
                 "horizon": int(first["horizon"])}
    # The global model is the shared part only. Its shapes do not depend on the territory (any
    # territory's node count builds it); node-dependent parameters, integer buffers and the
    # personalized layers are initialised and kept by each territory (fedldt.models.local_state_names).
    personalization = str(cfg["personalization"]["name"])
    model = build_model(model_cfg, num_nodes=int(first["num-nodes"]))
    shared, local = split_state(model, personalization)
    rounds = int(cfg["train"]["rounds"])
    # Rounds start as soon as min_train territories are connected and use every connected one:
    # a territory that is offline for a round rejoins in a later one.
    strategy = build_strategy(
        cfg["strategy"], territory_ids=ids, report_steps=list(cfg["task"]["report_steps"]), num_rounds=rounds,
        node_territories={int(info["node_id"]): i for i, info in infos.items()}, min_train_territories=min_train,
        buffer_keys=[k for k, _ in model.named_buffers() if k in shared],
        min_train_nodes=min_train, min_evaluate_nodes=min_train, min_available_nodes=min_train,
    )
    print(f"[fedldt] strategy {type(strategy).__name__}, personalization {personalization}: "
          f"{len(shared)} shared tensors, {len(local)} kept by each territory", flush=True)
    strategy = with_privacy(strategy, cfg)
    ledger = strategy.privacy
    run_rounds = rounds
    if ledger is not None:
        windows = {ids[i]: int(info["num-train"]) for i, info in infos.items()}
        run_rounds = ledger.rounds_within_budget(rounds, windows)
        if run_rounds == 0:
            first = ledger.accountant.epsilon_after(round_events(ledger.privacy, cfg["train"], windows))
            raise FederationError(f"privacy.max_epsilon={ledger.privacy['max_epsilon']} is exceeded by the first round "
                                  f"already (epsilon after one round: {first:.4g}); raise privacy.max_epsilon or "
                                  "privacy.noise_multiplier")
        if run_rounds < rounds:
            print(f"[fedldt] privacy budget max_epsilon={ledger.privacy['max_epsilon']} fits {run_rounds} of {rounds} "
                  f"rounds: the run ends after round {run_rounds}", flush=True)
            for s in {strategy, getattr(strategy, "strategy", strategy)}:
                s.num_rounds = run_rounds
    result = strategy.start(
        grid=grid, initial_arrays=ArrayRecord(shared), num_rounds=run_rounds, timeout=timeout,
        train_config=config_record(cfg), evaluate_config=config_record(cfg, split="val"),
    )
    if strategy.failures:
        print(f"[fedldt] WARNING: {len(strategy.failures)} failed replies: {strategy.failures}", flush=True)
    test = evaluate_split(grid, strategy, result.arrays, cfg, "test", run_rounds + 1, timeout)
    summary = build_summary(cfg, "federated", [territory_row(info) for info in infos.values()], {ids[i]: t for i, t in test.items()}, strategy.rounds,
                            strategy.failures, model_cfg, time.time() - t_start)
    history = strategy.history
    if ledger is not None:
        summary["privacy"] = ledger.summary(rounds, run_rounds)
        # the epsilon spent after each round (the same for every territory row of the round)
        history = [{**row, "privacy_epsilon": ledger.epsilon_by_round.get(int(row["round"]))} for row in history]
        print(f"[fedldt] privacy: epsilon={summary['privacy']['epsilon']:.4g} at delta={ledger.accountant.delta:g} "
              f"after {run_rounds} round(s) ({ledger.privacy['mode']}-level, {summary['privacy']['accountant']})", flush=True)
    final = result.arrays.to_torch_state_dict()
    if set(final) != set(shared):
        raise FederationError(f"the final global model has keys {sorted(set(final) ^ set(shared))} that differ from the shared part")
    # model.pt holds the global (shared) weights; "local_keys" are the entries each territory kept.
    write_run_outputs(run_dir, cfg, summary, history,
                      {"state_dict": final, "model_config": model_cfg, "personalization": personalization,
                       "local_keys": list(local)})
    print(f"[fedldt] results written to {run_dir}", flush=True)
    return summary
