"""What a territory does when the server asks: describe itself, train, evaluate.

Everything here works on plain Python/torch objects; ``clients/client_app.py`` only unpacks
and packs Flower messages. Only model parameters and aggregate scalars (counts, losses,
error sums) leave this module: never values, node ids, coordinates or the adjacency. The
territory's egress mod enforces it on every reply (:mod:`fedldt.egress`, ``docs/egress.md``).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import torch

from fedldt.config import load_territories
from fedldt.data.checks import require_usable
from fedldt.engine import TerritoryTask, derive_seed, task_from_config
from fedldt.models import build_model, load_shared_state, local_state_names, split_state
from fedldt.results import evaluation_sums, sums_to_record, territory_info

#: Train metric names (the allow-list ``fedldt.egress.TRAIN_METRICS`` is exactly these).
SCALAR_METRICS = ("num-examples", "territory", "train_loss")


def territory_index(node_config: Mapping[str, Any]) -> int:
    """The territory a client serves: node config ``territory`` (deployment) or ``partition-id``
    (simulation).

    Raises:
        KeyError: neither key is set (the SuperNode's ``--node-config`` must name it).
    """
    for key in ("territory", "partition-id"):
        if key in node_config:
            return int(node_config[key])
    raise KeyError(
        "the SuperNode has no territory: start it with --node-config 'territory=<index>' "
        f"(node config has {sorted(node_config)})"
    )


def territory_config(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as this territory uses it: its own data location replaces the server's.

    The server sends ``dataset.path`` as resolved on *its* machine. A territory holds its own
    data, so its SuperNode's node config may name where (checked in this order):

    * ``data-path``: the dataset folder itself (e.g. ``"/srv/data/los_loop"``);
    * ``data-root``: the folder of datasets (e.g. ``"/srv/data"``); the dataset folder is
      ``<data-root>/<last component of the server's dataset.path>`` (``los_loop``), the layout
      of ``conf/dataset/*.yaml`` (``${paths.data_root}/<folder>``).

    Without either key the server's path is used (simulation, or a loopback deployment).

    Args:
        cfg: resolved run config (as sent by the server).
        node_config: the SuperNode's node config (``context.node_config``).

    Returns:
        A copy of ``cfg`` with ``dataset.path`` replaced when the node config names one.

    Raises:
        ValueError: the node config path is relative.
        FileNotFoundError: the resulting dataset folder does not exist (node config key named).
    """
    out = json.loads(json.dumps(cfg))
    server_path = Path(str(out["dataset"]["path"]))
    if "data-path" in node_config:
        key, path = "data-path", Path(str(node_config["data-path"])).expanduser()
    elif "data-root" in node_config:
        key, path = "data-root", Path(str(node_config["data-root"])).expanduser() / server_path.name
    else:
        return out
    if not path.is_absolute():
        raise ValueError(f"node config {key}={node_config[key]!r} must be an absolute path (restart the SuperNode "
                         f"with --node-config '{key}=\"/abs/path\"')")
    if not path.exists():
        raise FileNotFoundError(f"dataset folder {path} (from node config {key}={node_config[key]!r}) does not exist on "
                                f"this territory; fix the SuperNode's --node-config {key}")
    out["dataset"]["path"] = str(path)
    return out


@lru_cache(maxsize=8)
def _task(cfg_json: str, index: int) -> TerritoryTask:
    cfg = json.loads(cfg_json)
    territories = load_territories(cfg)
    if not 0 <= index < len(territories):
        raise ValueError(f"territory index {index} is outside 0..{len(territories) - 1} for pilot '{cfg['name']}'")
    t = cfg["task"]
    # the checks of `fedldt validate`: never train on unusable data; the server learns the problem codes only
    require_usable(territories[index], int(t["window"]), int(t["horizon"]), tuple(t["split"]))
    return task_from_config(territories[index], cfg["task"], cfg["train"], cfg["dataset"].get("valid_range"))


def get_task(cfg: Mapping[str, Any], index: int) -> TerritoryTask:
    """The territory's task (data, split, scaler, windows), cached per process."""
    torch.set_num_threads(int(cfg["train"].get("torch_threads", 1)))
    return _task(json.dumps(cfg, sort_keys=True), index)


def describe(cfg: Mapping[str, Any], index: int) -> dict[str, int | str]:
    """Sizes the server needs to build the global model and report territories."""
    task = get_task(cfg, index)
    return {"territory": index, **territory_info(task), **{k.replace("_", "-"): v for k, v in task.model_dims().items()}}


def _model(cfg: Mapping[str, Any], index: int, task: TerritoryTask, shared: Mapping[str, torch.Tensor],
           local: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """The territory's model: the server's shared weights plus this territory's local entries
    (``local``; ``None`` before its first training round: initialised from the run seed)."""
    torch.manual_seed(derive_seed(int(cfg["seed"]), index, 0))  # local entries' initial values
    model = build_model({**cfg["model"], **task.model_dims()}, num_nodes=task.dataset.num_nodes)
    personalization = personalization_of(cfg)
    if local:
        expected = set(local_state_names(model, personalization))
        if set(local) != expected:
            raise ValueError(f"this territory's stored local state has keys {sorted(set(local) ^ expected)} that do not fit "
                             f"model '{cfg['model']['name']}' with personalization={personalization}")
        model.load_state_dict(local, strict=False)
    load_shared_state(model, shared, personalization)
    return model


def personalization_of(cfg: Mapping[str, Any]) -> str:
    """``personalization.name`` of a run config (``none`` when the block is absent)."""
    return str(cfg.get("personalization", {}).get("name", "none"))


def train(cfg: Mapping[str, Any], index: int, state_dict: Mapping[str, torch.Tensor], server_round: int,
          proximal_mu: float = 0.0, local_state: Mapping[str, torch.Tensor] | None = None,
          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float | int]]:
    """Local epochs on the territory's training windows, starting from the global weights.

    Args:
        state_dict: the global (shared) weights from the server.
        proximal_mu: FedProx coefficient (from the server's ``proximal-mu``); the proximal term
            covers the shared parameters only.
        local_state: this territory's local entries from its previous round (node embeddings,
            integer buffers, personalized layers; see :func:`fedldt.models.local_state_names`),
            ``None`` in its first round.

    Returns:
        ``(shared, local, metrics)``: the shared weights to send (float32, the global model's
        keys only), the local entries to keep at home, and metrics ``num-examples`` (training
        windows, the FedAvg weight), ``train_loss`` (scaled MAE) and ``territory``.
    """
    task = get_task(cfg, index)
    model = _model(cfg, index, task, state_dict, local_state)
    tr = cfg["train"]
    shared_names = set(state_dict)
    loss = task.fit(
        model, epochs=tr["local_epochs"], lr=tr["lr"], seed=derive_seed(cfg["seed"], index, server_round),
        weight_decay=tr["weight_decay"], grad_clip=tr["grad_clip"], proximal_mu=proximal_mu,
        proximal_names=shared_names, optimizer=tr["optimizer"]["_target_"],
    )
    shared, local = split_state(model, personalization_of(cfg))
    metrics = {"num-examples": task.num_windows("train"), "train_loss": float(loss), "territory": index}
    return dict(shared), dict(local), metrics


def evaluate(cfg: Mapping[str, Any], index: int, state_dict: Mapping[str, torch.Tensor], split: str,
             local_state: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Masked error sums of the given weights (with this territory's ``local_state``, see
    :func:`train`) and of the reference forecasts on ``split`` ('val' or 'test').

    Returns:
        Metrics ``num-examples``, ``territory``, ``model.<sum>``, ``persistence.<sum>`` and
        ``historical_average.<sum>`` lists
        (see :class:`fedldt.metrics.MetricSums`).

    Raises:
        ValueError: unknown split.
    """
    if split not in ("val", "test"):
        raise ValueError(f"evaluate split must be 'val' or 'test', got {split!r}")
    task = get_task(cfg, index)
    model = _model(cfg, index, task, state_dict, local_state)
    return {"num-examples": task.num_windows(split), "territory": index,
            **sums_to_record(evaluation_sums(task, model, split))}
