"""The federated run on the server side: discover territories, run FedAvg, test, write results.

Called by ``server/server_app.py`` with Flower's :class:`Grid`; the data never comes here,
only what territories report (sizes, parameters, error sums).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid

from fedldt.checkpoint import (Checkpoint, Checkpointable, CheckpointError, check_global_arrays, load_checkpoint,
                               restore_components, save_checkpoint)
from fedldt.config import num_territories, territory_view
from fedldt.egress import CONFIG_KEY, FINETUNE_MESSAGE, FINETUNE_METRICS, EgressRefused, check_values
from fedldt.engine import check_train_history_names, seed_everything
from fedldt.metrics import MetricSums, mae, pool, report
from fedldt.models import build_model, split_state
from fedldt.personal import HISTORY, KEPT, USE_MODEL, holdout_block
from fedldt.privacy import round_events
from fedldt.results import build_summary, sums_from_record, territory_row, write_run_outputs
from server.strategy import FedLDTStrategy, FederationError, build_strategy, failure_reasons, reply_territory, with_privacy

#: Config key of every train/evaluate message: the run key (:data:`fedldt.checkpoint.RUN_KEY`),
#: which names the territory's checkpoint folder of this run.
RUN_KEY = "run-key"
#: Config key of evaluate messages: the round whose local state (after its training) the
#: territory evaluates with (train messages use ``server-round - 1``).
LOCAL_ROUND = "local-round"


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
        ConfigError: ``task.train_history`` names no territory that answered.
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
    check_train_history_names(cfg["task"], names)  # a territory with its own package knows only its own name
    dims = {(i["in-channels"], i["out-channels"], i["horizon"]) for i in infos.values()}
    if len(dims) != 1:
        raise FederationError(f"territories disagree on model sizes (in, out, horizon): {sorted(dims)}")
    return dict(sorted(infos.items()))


def evaluate_split(grid: Grid, strategy: FedLDTStrategy, arrays: ArrayRecord, cfg: dict[str, Any], split: str,
                   server_round: int, timeout: float, territories: list[int] | None = None,
                   **extra: Any) -> dict[int, dict[str, MetricSums]]:
    """Evaluate ``arrays`` on every territory's ``split``; returns per-territory sums of the model and
    of each reference (:func:`fedldt.results.sums_from_record`).

    Args:
        territories: the territory indexes that must answer (default: all of the pilot's); the
            strategy asks the nodes of ``grid``.
        **extra: more config entries for the territories (e.g. :data:`RUN_KEY`, :data:`LOCAL_ROUND`,
            :data:`USE_MODEL`).

    Raises:
        FederationError: a territory failed or did not answer.
    """
    msgs = strategy.configure_evaluate(server_round, arrays, config_record(cfg, split=split, **extra), grid)
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    failed = failure_reasons(replies)
    if failed:
        raise FederationError(f"final {split} evaluation failed on {len(failed)} node(s): {failed}")
    out = {}
    for r in replies:
        rec = next(iter(r.content.metric_records.values()))
        out[reply_territory(r, getattr(getattr(strategy, 'strategy', strategy), 'node_territories', None))] = sums_from_record(rec)
    expected = list(range(num_territories(cfg))) if territories is None else sorted(territories)
    if sorted(out) != expected:
        raise FederationError(f"final {split} evaluation: territories {sorted(out)} answered, expected {expected}")
    return dict(sorted(out.items()))


class TrainingGrid:
    """The grid as the round loop sees it: only the nodes of the training territories (a
    held-out territory's SuperNode is connected but gets no train or per-round evaluate message).
    Everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, nodes: list[int]) -> None:
        self.grid, self.nodes = grid, set(int(n) for n in nodes)

    def get_node_ids(self):
        return [n for n in self.grid.get_node_ids() if int(n) in self.nodes]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


class WaveGrid:
    """The grid with :meth:`send_and_receive` in waves of at most ``max_in_flight`` messages
    (``federation.max_in_flight``), each wave sent after the previous one's replies, the replies
    of all waves returned together; ``timeout`` bounds all waves together. Everything else is the
    wrapped grid's. Past ``timeout`` no further wave is sent (its territories count as not
    answering). For the simulation engine; a deployment's grid polls for replies every few
    seconds, so each wave there adds up to that delay.

    Why: Flower 1.42's simulation engine (``vce_api.add_messages_to_queue``) asks the in-memory
    LinkState for each SuperNode's messages every 0.1 s, and each ask scans every stored message,
    so with ``N`` territories and ``M`` messages out one sweep costs ``N x M`` checks: with 1000
    territories and a round's 1000 messages out at once the engine's thread holds the CPU and the
    round crawls (``docs/benchmarks.md``, "Scale"). Waves bound ``M``.
    """

    def __init__(self, grid: Grid, max_in_flight: int) -> None:
        self.grid, self.max_in_flight = grid, int(max_in_flight)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        msgs = list(messages)
        deadline = None if timeout is None else time.monotonic() + float(timeout)
        replies: list[Message] = []
        for start in range(0, len(msgs), self.max_in_flight):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break  # out of time: the waves not sent are missing replies, as unanswered messages are
            replies.extend(self.grid.send_and_receive(msgs[start:start + self.max_in_flight], timeout=left))
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)


def holdout_index(cfg: dict[str, Any], ids: Mapping[int, str]) -> int | None:
    """The index of ``federation.holdout`` among the discovered territories (``None``: no holdout).

    Raises:
        FederationError: no territory has that name (the names are listed), or it is the only one.
    """
    name = cfg.get("federation", {}).get("holdout")
    if name is None:
        return None
    match = [i for i, tid in ids.items() if tid == str(name)]
    if not match:
        raise FederationError(f"federation.holdout={name!r} is not a territory of this run; its territories are "
                              f"{sorted(ids.values())}")
    if len(ids) < 2:
        raise FederationError(f"federation.holdout={name!r} leaves no territory to train")
    return match[0]


def send_to(grid: Grid, node: int, message_type: str, arrays: ArrayRecord, config: ConfigRecord, timeout: float,
            what: str) -> Message:
    """One message to one SuperNode and its reply.

    Raises:
        FederationError: no reply, or an error reply (its coded reason named).
    """
    msg = Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=int(node), message_type=message_type)
    replies = list(grid.send_and_receive([msg], timeout=timeout))
    if not replies:
        raise FederationError(f"{what}: no reply within federation.timeout_s")
    if replies[0].has_error():
        raise FederationError(f"{what} failed: {replies[0].error.reason}")
    return replies[0]


def finetune_territories(grid: Grid, nodes: Mapping[int, int], arrays: ArrayRecord, cfg: dict[str, Any],
                         timeout: float, **extra: Any) -> dict[int, dict[str, Any]]:
    """Ask each territory (index -> node) to fine-tune ``arrays`` and keep the better model at home
    (``train.finetune``, :func:`clients.client_app.finetune`); returns index -> reply metrics.

    Raises:
        FederationError: a territory failed or did not answer.
    """
    msgs = [Message(RecordDict({"arrays": arrays, "config": config_record(cfg, **extra)}), dst_node_id=int(n),
                    message_type=FINETUNE_MESSAGE) for n in nodes.values()]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    failed = failure_reasons(replies)
    if failed:
        raise FederationError(f"fine-tuning failed on {len(failed)} node(s): {failed}")
    territory_of = {int(n): i for i, n in nodes.items()}
    out: dict[int, dict[str, Any]] = {}
    for r in replies:
        node = int(r.metadata.src_node_id)
        records = r.content.metric_records
        metrics = dict(next(iter(records.values()))) if len(records) == 1 else {}
        finetune_result(metrics, f"node {node}")  # raises on a forged reply before anything trusts it
        if node not in territory_of or int(metrics["territory"]) != territory_of[node] or territory_of[node] in out:
            raise FederationError(f"fine-tuning: node {node} answered for territory {metrics['territory']}, but the "
                                  f"server asked it for territory {territory_of.get(node)}")
        out[territory_of[node]] = metrics
    if sorted(out) != sorted(nodes):
        raise FederationError(f"fine-tuning: territories {sorted(out)} answered, expected {sorted(nodes)}")
    return dict(sorted(out.items()))


def finetune_result(metrics: Mapping[str, Any], where: str = "fine-tuning reply") -> dict[str, Any]:
    """summary.json ``personalization_result`` entry of a fine-tuning reply.

    The reply comes from a territory, so it is checked first: exactly the keys of
    :data:`fedldt.egress.FINETUNE_METRICS` (each of its kind, finite, >= 0), ``kept`` an index of
    :data:`fedldt.personal.KEPT`.

    Raises:
        FederationError: the reply breaks one of those rules (``where`` and the key named, no value).
    """
    try:
        check_values(metrics, FINETUNE_METRICS, None, f"{where}: fine-tuning reply")
    except EgressRefused as e:
        raise FederationError(str(e.detail)) from None
    if int(metrics["kept"]) >= len(KEPT):
        raise FederationError(f"{where}: fine-tuning reply 'kept' must be 0 (global) or 1 (finetuned)")
    value = metrics.get
    return {"kept": KEPT[int(metrics["kept"])], "val_mae_global": value("val_mae_global"),
            "val_mae_finetuned": value("val_mae_finetuned"), "epochs_run": int(metrics["epochs_run"])}


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


def evaluate_holdout(grid: Grid, cfg: dict[str, Any], node: int, index: int, name: str, arrays: ArrayRecord,
                     server_round: int, timeout: float, keyed: Mapping[str, Any]) -> dict[str, Any]:
    """summary.json ``holdout`` block: the held-out territory (``index`` on SuperNode ``node``)
    evaluated zero-shot on its test windows with the final global model ``arrays`` (its local
    entries, e.g. Graph WaveNet node embeddings, are those of the run seed: it never trained),
    then, with ``federation.holdout_finetune``, fine-tuned on the last that-long part of its
    training part (``train.finetune``) and tested again with the model it kept.

    Raises:
        FederationError: the territory failed or did not answer.
    """
    steps = list(cfg["task"]["report_steps"])
    history = cfg["federation"].get("holdout_finetune")

    def test(use: str, **more: Any) -> dict[str, MetricSums]:
        conf = config_record(cfg, split="test", **{**keyed, LOCAL_ROUND: 0, USE_MODEL: use, **more})
        conf["server-round"] = server_round
        reply = send_to(grid, node, MessageType.EVALUATE, arrays, conf, timeout, f"held-out territory {name} test")
        return sums_from_record(next(iter(reply.content.metric_records.values())))

    zero, finetuned = test("global"), None
    if history is not None:
        conf = config_record(cfg, **{**keyed, LOCAL_ROUND: 0, HISTORY: str(history)})
        conf["server-round"] = server_round
        reply = send_to(grid, node, FINETUNE_MESSAGE, arrays, conf, timeout, f"held-out territory {name} fine-tuning")
        records = reply.content.metric_records
        kept = finetune_result(dict(next(iter(records.values()))) if len(records) == 1 else {},
                               f"held-out territory {name}")
        print(f"[fedldt] held-out territory {name} fine-tuned on its last {history}: kept the {kept['kept']} model "
              f"(validation MAE global {kept['val_mae_global']}, fine-tuned {kept['val_mae_finetuned']})", flush=True)
        finetuned = test("kept", **{HISTORY: str(history)})["model"]
    return holdout_block(name, zero, finetuned, history, steps)


def _as_list(messages: Iterable[Message]) -> list[Message]:
    """The strategy's own list where it returned one (a grid may stamp its items in place, and
    the strategy matches replies by those ids), else a list of the messages."""
    return messages if isinstance(messages, list) else list(messages)


def _mean_bytes(messages: Sequence[Message]) -> float | None:
    """Mean serialised size (bytes of the protobuf RecordDict Flower sends) of the messages'
    contents; ``None`` when none has content (every reply an error)."""
    sizes = [recorddict_to_proto(m.content).ByteSize() for m in messages if m.has_content()]
    return float(sum(sizes) / len(sizes)) if sizes else None


#: The phases of a round timed by :func:`run_rounds` (``summary.json`` ``timing.rounds``).
ROUND_PHASES = ("train_s", "aggregate_train_s", "evaluate_s", "aggregate_evaluate_s", "checkpoint_s")


def run_rounds(strategy, grid: Grid, arrays: ArrayRecord, first: int, last: int, timeout: float,
               train_config: Callable[[int], ConfigRecord], evaluate_config: Callable[[int], ConfigRecord],
               on_round_end: Callable[[int, ArrayRecord], None] | None = None,
               timing: list[dict[str, float]] | None = None) -> ArrayRecord:
    """Rounds ``first`` .. ``last`` of Flower's round loop (``Strategy.start`` in Flower 1.42, which
    always starts at round 1): per round ``configure_train``, send, ``aggregate_train``,
    ``configure_evaluate``, send, ``aggregate_evaluate``, then ``on_round_end(round, arrays)``
    (the checkpoint). Works with any Flower ``Strategy``, a wrapper included.

    Args:
        arrays: the global model before round ``first``.
        train_config, evaluate_config: round -> the config record of its messages (a new
            record per round: Flower writes ``server-round`` into it).
        timing: if given, one row per round is appended: wall seconds of ``train_s`` (configure,
            send and receive the training messages: the territories' training, serialisation and
            messaging), ``aggregate_train_s``, ``evaluate_s`` (the same for evaluation),
            ``aggregate_evaluate_s`` and ``checkpoint_s`` (``on_round_end``); and the mean
            serialised size in bytes of one message's content (the protobuf Flower sends) per
            territory: ``bytes_train_down``/``bytes_train_up``/``bytes_evaluate_down``/``bytes_evaluate_up``
            (``None`` without messages).

    Returns:
        The global model after round ``last`` (``arrays`` when ``first > last``).
    """
    for rnd in range(first, last + 1):
        clock = [time.perf_counter()]
        sent = _as_list(strategy.configure_train(rnd, arrays, train_config(rnd), grid))
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        clock.append(time.perf_counter())
        sizes = {"train_down": _mean_bytes(sent), "train_up": _mean_bytes(replies)}
        aggregated, _ = strategy.aggregate_train(rnd, replies)
        if aggregated is not None:
            arrays = aggregated
        clock.append(time.perf_counter())
        sent = _as_list(strategy.configure_evaluate(rnd, arrays, evaluate_config(rnd), grid))
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        clock.append(time.perf_counter())
        sizes.update({"evaluate_down": _mean_bytes(sent), "evaluate_up": _mean_bytes(replies)})
        strategy.aggregate_evaluate(rnd, replies)
        clock.append(time.perf_counter())
        if on_round_end is not None:
            on_round_end(rnd, arrays)
        clock.append(time.perf_counter())
        if timing is not None:
            timing.append({"round": rnd, **{k: round(b - a, 4) for k, a, b in zip(ROUND_PHASES, clock, clock[1:])},
                           **{f"bytes_{k}": v for k, v in sizes.items()}})
    return arrays


def _resume_from(cfg: dict[str, Any], ids: Mapping[int, str], shared: Mapping[str, Any]) -> Checkpoint | None:
    """The checked checkpoint ``cfg["resume"]`` names, or ``None`` for a new run.

    Raises:
        CheckpointError: see :func:`fedldt.checkpoint.load_checkpoint`; ``resume`` not absolute;
            the territories or the model differ from the checkpoint's.
    """
    if not cfg.get("resume"):
        return None
    folder = Path(str(cfg["resume"]))
    if not folder.is_absolute():
        raise CheckpointError(f"resume={cfg['resume']!r} must be an absolute path on the server (scripts/simulate.py "
                              "makes it absolute)")
    ckpt = load_checkpoint(folder, cfg)
    if ckpt.territories != dict(ids):
        raise CheckpointError(f"checkpoint {ckpt.path} was written with territories {ckpt.territories}, these are "
                              f"{dict(ids)}; resume with the same territories (SuperNodes and their data)")
    check_global_arrays(ckpt, {k: (tuple(v.shape), np.dtype(str(v.numpy().dtype))) for k, v in shared.items()})
    return ckpt


def run_federated(grid: Grid, cfg: dict[str, Any], run_dir: Path,
                  components: Mapping[str, Checkpointable] | None = None) -> dict[str, Any]:
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
        CheckpointError: ``resume`` names a checkpoint that is missing, corrupt or does not fit.

    Checkpoints: after every round ``<run_dir>/checkpoint.pt`` is rewritten
    (:func:`fedldt.checkpoint.save_checkpoint`): the global arrays, the round, the run key, the
    server's random states and the state of each component, ``"strategy"`` (its
    ``checkpoint_state()``) and those of ``components`` (name -> object with
    ``checkpoint_state()``/``load_checkpoint_state()``, e.g. a privacy accountant: its state is
    saved and, on resume, loaded before the first round). With ``cfg["resume"]`` (an absolute run
    folder) the run continues after the checkpoint's round: everything above is restored and the
    territories reload their local state from their own checkpoints (the run key travels in every
    message); ``history.csv`` and ``summary.json`` then cover every round from 1.
    """
    t_start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(int(cfg["seed"]))
    timeout = float(cfg["federation"]["timeout_s"])
    min_train = min_train_territories(cfg)
    if cfg["federation"].get("max_in_flight"):
        grid = WaveGrid(grid, int(cfg["federation"]["max_in_flight"]))  # type: ignore[assignment]
    infos = discover_territories(grid, cfg, timeout)
    ids = {i: str(info["territory-id"]) for i, info in infos.items()}
    print(f"[fedldt] {len(infos)} territories: " + ", ".join(f"{ids[i]} ({infos[i]['num-nodes']} nodes)" for i in infos), flush=True)
    held = holdout_index(cfg, ids)
    trained = {i: info for i, info in infos.items() if i != held}  # the territories that train
    train_grid = TrainingGrid(grid, [int(info["node_id"]) for info in trained.values()]) if held is not None else grid
    if held is not None:
        min_train = min(min_train, len(trained))
        print(f"[fedldt] territory {ids[held]} is held out: no training, evaluated zero-shot at the end", flush=True)
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
        cfg["strategy"], territory_ids={i: ids[i] for i in trained}, report_steps=list(cfg["task"]["report_steps"]),
        num_rounds=rounds, node_territories={int(info["node_id"]): i for i, info in trained.items()},
        min_train_territories=min_train,
        buffer_keys=[k for k, _ in model.named_buffers() if k in shared],
        min_train_nodes=min_train, min_evaluate_nodes=min_train, min_available_nodes=min_train,
    )
    print(f"[fedldt] strategy {type(strategy).__name__}, personalization {personalization}: "
          f"{len(shared)} shared tensors, {len(local)} kept by each territory", flush=True)
    strategy = with_privacy(strategy, cfg)  # privacy=territory: TerritoryDP around the fedldt strategy
    ledger = strategy.privacy
    fed = getattr(strategy, "strategy", strategy)  # the fedldt strategy (its state is the "strategy" component)
    components = {"strategy": fed, **({"privacy": ledger} if ledger is not None else {}), **(components or {})}
    arrays, done, run_key, elapsed0 = ArrayRecord(shared), 0, uuid.uuid4().hex, 0.0
    ckpt = _resume_from(cfg, ids, shared)
    if ckpt is not None:
        restore_components(ckpt, components)
        arrays = ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in ckpt.arrays.items()})
        done, run_key, elapsed0 = ckpt.round, ckpt.run_key, ckpt.elapsed_s
        print(f"[fedldt] resuming from {ckpt.path}: round {done} done, rounds {done + 1}..{rounds} to go", flush=True)
    last = rounds  # the last round to run: fewer when the privacy budget ends the run
    if ledger is not None:
        windows = {ids[i]: int(info["num-train"]) for i, info in trained.items()}
        last = done + ledger.rounds_within_budget(rounds - done, windows)
        if last == 0:
            first_eps = ledger.accountant.epsilon_after(round_events(ledger.privacy, cfg["train"], windows))
            raise FederationError(f"privacy.max_epsilon={ledger.privacy['max_epsilon']} is exceeded by the first round "
                                  f"already (epsilon after one round: {first_eps:.4g}); raise privacy.max_epsilon or "
                                  "privacy.noise_multiplier")
        if last < rounds:
            print(f"[fedldt] privacy budget max_epsilon={ledger.privacy['max_epsilon']} fits {last} of {rounds} "
                  f"rounds: the run ends after round {last}", flush=True)
            fed.num_rounds = last

    def checkpoint(rnd: int, current: ArrayRecord) -> None:
        save_checkpoint(run_dir, round=rnd, run_key=run_key, config=cfg, territories=ids,
                        arrays={k: np.asarray(a.numpy()) for k, a in current.items()}, components=components,
                        elapsed_s=elapsed0 + time.time() - t_start)

    keyed = {RUN_KEY: run_key}
    timing: dict[str, Any] = {"setup_s": round(time.time() - t_start, 4), "rounds": []}
    t_rounds = time.time()
    arrays = run_rounds(strategy, train_grid, arrays, done + 1, last, timeout,
                        train_config=lambda r: config_record(cfg, **keyed),
                        evaluate_config=lambda r: config_record(cfg, split="val", **keyed, **{LOCAL_ROUND: r}),
                        on_round_end=checkpoint, timing=timing["rounds"])
    timing["rounds_s"] = round(time.time() - t_rounds, 4)
    t_final = time.time()
    if strategy.failures:
        print(f"[fedldt] WARNING: {len(strategy.failures)} failed replies: {strategy.failures}", flush=True)
    final_keyed = {**keyed, LOCAL_ROUND: last}
    done_round, extras = last + 1, {}
    if personalization == "finetune":
        tuned = finetune_territories(train_grid, {i: int(info["node_id"]) for i, info in trained.items()}, arrays, cfg,
                                     timeout, **final_keyed)
        extras["personalization_result"] = {ids[i]: finetune_result(m) for i, m in tuned.items()}
        print("[fedldt] fine-tuning kept: " + ", ".join(f"{ids[i]}={r['kept']}" for i, r in
                                                        zip(tuned, extras["personalization_result"].values())), flush=True)
    personal = personalization in ("finetune", "ditto")
    use = {"finetune": "kept", "ditto": "personal"}.get(personalization, "global")
    test = evaluate_split(train_grid, strategy, arrays, cfg, "test", done_round, timeout, territories=list(trained),
                          **final_keyed, **{USE_MODEL: use})
    if personal:
        global_test = evaluate_split(train_grid, strategy, arrays, cfg, "test", done_round, timeout,
                                     territories=list(trained), **final_keyed, **{USE_MODEL: "global"})
        steps = list(cfg["task"]["report_steps"])
        extras["global_test"] = report(pool(t["model"] for t in global_test.values()), steps)
        extras["global_test_per_territory"] = {ids[i]: report(t["model"], steps) for i, t in global_test.items()}
    if personalization == "ditto":
        val = {u: evaluate_split(train_grid, strategy, arrays, cfg, "val", done_round, timeout, territories=list(trained),
                                 **final_keyed, **{USE_MODEL: u}) for u in ("global", "personal")}
        extras["personalization_result"] = {ids[i]: {"val_mae_global": mae(val["global"][i]["model"]),
                                                     "val_mae_personal": mae(val["personal"][i]["model"])}
                                            for i in trained}
    if held is not None:
        try:
            extras["holdout"] = evaluate_holdout(grid, cfg, int(infos[held]["node_id"]), held, ids[held], arrays,
                                                 done_round, timeout, keyed)
        except FederationError as e:  # the trained federation's results still count: keep them, say why
            extras["holdout_failure"] = {"territory": ids[held], "reason": str(e)[:500]}
            print(f"[fedldt] WARNING: the held-out territory {ids[held]} could not be evaluated: {e}", flush=True)
    summary = build_summary(cfg, "federated", [territory_row(info) for info in trained.values()], {ids[i]: t for i, t in test.items()}, strategy.rounds,
                            strategy.failures, model_cfg, elapsed0 + time.time() - t_start)
    summary.update(extras)
    # wall seconds inside the ServerApp: setup (territory discovery, model, strategy), each round's
    # phases (run_rounds), and the final part (fine-tuning, test evaluation); scripts/bench_federation.py
    summary["timing"] = {**timing, "final_s": round(time.time() - t_final, 4)}
    if ckpt is not None:
        summary["resumed_after_round"] = ckpt.round
    history = strategy.history
    if ledger is not None:
        summary["privacy"] = ledger.summary(rounds, last)
        # the epsilon spent after each round (the same for every territory row of the round)
        history = [{**row, "privacy_epsilon": ledger.epsilon_by_round.get(int(row["round"]))} for row in history]
        print(f"[fedldt] privacy: epsilon={summary['privacy']['epsilon']:.4g} at delta={ledger.accountant.delta:g} "
              f"after {last} round(s) ({ledger.privacy['mode']}-level, {summary['privacy']['accountant']})", flush=True)
    final = arrays.to_torch_state_dict()
    if set(final) != set(shared):
        raise FederationError(f"the final global model has keys {sorted(set(final) ^ set(shared))} that differ from the shared part")
    # model.pt holds the global (shared) weights; "local_keys" are the entries each territory kept;
    # "run_key" names each territory's folder of this run (its personal model: fedldt export --territory-dir).
    write_run_outputs(run_dir, cfg, summary, history,
                      {"state_dict": final, "model_config": model_cfg, "personalization": personalization,
                       "local_keys": list(local), "run_key": run_key})
    print(f"[fedldt] results written to {run_dir}", flush=True)
    return summary
