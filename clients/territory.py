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

from fedldt.checkpoint import latest_local_round, load_local_state
from fedldt.config import load_territories, reads_packages
from fedldt.data.checks import require_usable
from fedldt.data.package import MANIFEST, load_package
from fedldt.data.territory import TerritoryDataset
from fedldt.engine import TerritoryTask, cpu_state, derive_seed, task_from_config, train_device
from fedldt.models import build_model, load_shared_state, local_state_names, split_state
from fedldt.personal import KEPT, PERSONAL_PREFIX, finetune_from_config
from fedldt.personal import with_train_history as personal_history
from fedldt.privacy import dpsgd_options
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


#: Key of the ``dataset`` block :func:`territory_config` writes when the SuperNode's data is its
#: own territory data package (node config ``data-path`` naming a folder with ``territory.yaml``).
OWN_PACKAGE = "own_package"


def territory_config(cfg: Mapping[str, Any], node_config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as this territory uses it: its own data location replaces the server's.

    The server sends ``dataset.path`` as resolved on *its* machine (in a deployment the
    coordinator has no data: the path need not exist there). A territory holds its own data, so
    its SuperNode's node config may name where (checked in this order):

    * ``data-path``: either the territory's own **territory data package** (a folder holding
      ``territory.yaml``, ``docs/data-format.md``), which is then its whole data, whatever dataset
      the server names (its name, sizes and valid ranges come from the package; no partition
      runs); or the dataset folder itself (e.g. ``"/srv/data/los_loop"``, or for
      ``dataset=packages`` a folder of package sub-folders);
    * ``data-root``: the folder of datasets (e.g. ``"/srv/data"``); the dataset folder is
      ``<data-root>/<last component of the server's dataset.path>`` (``los_loop``), the layout
      of ``conf/dataset/*.yaml`` (``${paths.data_root}/<folder>``).

    Without either key the server's path is used (simulation, or a loopback deployment).

    Args:
        cfg: resolved run config (as sent by the server).
        node_config: the SuperNode's node config (``context.node_config``).

    Returns:
        A copy of ``cfg`` with ``dataset.path`` replaced when the node config names one; for a
        package, ``dataset`` is ``{"own_package": <folder>, "name": <the server's dataset name>}``
        (:data:`OWN_PACKAGE`, read by :func:`own_territory`).

    Raises:
        ValueError: the node config path is relative.
        FileNotFoundError: the resulting folder does not exist, is empty, or (``dataset=packages``)
            holds neither ``territory.yaml`` nor a package sub-folder (node config key named).
        NotADirectoryError: the resulting path is a file (node config key named).
    """
    out = json.loads(json.dumps(cfg))
    out["dataset"].pop(OWN_PACKAGE, None)  # only the territory's own node config names its package
    server_path = Path(str(out["dataset"]["path"]))
    if "data-path" in node_config:
        key, path = "data-path", Path(str(node_config["data-path"])).expanduser()
    elif "data-root" in node_config:
        key, path = "data-root", Path(str(node_config["data-root"])).expanduser() / server_path.name
    else:
        return out
    given = f"node config {key}={node_config[key]!r}"
    fix = (f"fix the SuperNode's --node-config {key}: the territory's data package folder (holding {MANIFEST}, "
           "docs/data-format.md) or the dataset folder")
    if not path.is_absolute():
        raise ValueError(f"{given} must be an absolute path (restart the SuperNode "
                         f"with --node-config '{key}=\"/abs/path\"')")
    if not path.exists():
        raise FileNotFoundError(f"dataset folder {path} (from {given}) does not exist on this territory; {fix}")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} (from {given}) is a file, not a folder; {fix}")
    if (path / MANIFEST).is_file():  # the territory's own package: its whole data
        out["dataset"] = {OWN_PACKAGE: str(path), "name": str(out["dataset"].get("name", "packages"))}
        return out
    if not any(path.iterdir()):
        raise FileNotFoundError(f"{path} (from {given}) is an empty folder; {fix}")
    if reads_packages(out) and not any((d / MANIFEST).is_file() for d in path.iterdir() if d.is_dir()):
        raise FileNotFoundError(f"{path} (from {given}) is neither a territory data package (no {MANIFEST}) nor a "
                                f"folder of packages (no sub-folder holds one) for dataset=packages; {fix}")
    out["dataset"]["path"] = str(path)
    return out


def own_territory(cfg: Mapping[str, Any], index: int) -> TerritoryDataset:
    """The territory's data: its own package (``dataset.own_package``, see :func:`territory_config`),
    loaded alone (:func:`fedldt.data.load_package`), or its share (``index``) of the dataset and
    partition the config names (:func:`fedldt.config.load_territories`).

    Raises:
        ValueError: ``index`` is outside the config's territories; TerritoryPackageError (a
            ``ValueError``) or the loader's own errors for data that cannot be read.
    """
    package = cfg["dataset"].get(OWN_PACKAGE)
    if package is not None:
        return load_package(package)
    territories = load_territories(dict(cfg))
    if not 0 <= index < len(territories):
        raise ValueError(f"territory index {index} is outside 0..{len(territories) - 1} for pilot '{cfg['name']}'")
    return territories[index]


@lru_cache(maxsize=8)
def _task(cfg_json: str, index: int) -> TerritoryTask:
    cfg = json.loads(cfg_json)
    ds = own_territory(cfg, index)
    t = cfg["task"]
    # the checks of `fedldt validate`: never train on unusable data; the server learns the problem codes only
    require_usable(ds, int(t["window"]), int(t["horizon"]), tuple(t["split"]))
    return task_from_config(ds, cfg["task"], cfg["train"], cfg["dataset"].get("valid_range"))


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
    return model.to(train_device(cfg["train"]))  # train.device; what leaves the model goes through cpu_state


def local_state(folder: Path, run_key: str, local_round: int, kept: Mapping[str, torch.Tensor] | None,
                kept_as: tuple[str, int] | None) -> dict[str, torch.Tensor] | None:
    """The local entries this territory trains or evaluates with: those after its last training
    at or before round ``local_round`` in run ``run_key`` (a territory whose training failed or that
    was away in a round keeps its entries of the round before); ``None`` when it has not trained yet
    (initialised from the run seed).

    Args:
        folder: the territory's own folder (node config ``out-dir``, :func:`clients.audit.territory_out_dir`).
        kept, kept_as: the entries this process holds (``context.state``) and their ``(run key,
            round)``; used when they are the ones asked for, else the territory's checkpoint
            (:func:`fedldt.checkpoint.load_local_state`) is read, as after a resume.

    Raises:
        CheckpointError: the checkpoint of that round is missing or corrupt (file named; the
            reply carries only the error's type and code).
        ValueError: ``run_key`` is not 32 hex digits.
    """
    if local_round <= 0:
        return None
    last = latest_local_round(folder, run_key, local_round)
    if kept is not None and kept_as is not None and kept_as[0] == run_key and kept_as[1] <= local_round \
            and (last is None or kept_as[1] >= last):
        return dict(kept)
    return None if last is None else load_local_state(folder, run_key, last)


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

    With ``privacy.mode: sample`` the local training is DP-SGD with Opacus, its sampling and
    noise seeded by the run seed, this territory and ``server_round`` (:func:`fedldt.privacy.dpsgd_options`).
    """
    task = get_task(cfg, index)
    entries, personal = split_personal(local_state)
    model = _model(cfg, index, task, state_dict, entries)
    tr = cfg["train"]
    shared_names = set(state_dict)
    if personalization_of(cfg) == "ditto":  # v starts from the first global model received (with the local entries)
        personal = personal if personal is not None else cpu_state(model.state_dict())
    loss = task.fit(
        model, epochs=tr["local_epochs"], lr=tr["lr"], seed=derive_seed(cfg["seed"], index, server_round),
        weight_decay=tr["weight_decay"], grad_clip=tr["grad_clip"], proximal_mu=proximal_mu,
        proximal_names=shared_names, optimizer=tr["optimizer"]["_target_"], dp=dpsgd_options(cfg),
    )
    shared, local = split_state(model, personalization_of(cfg))
    local = dict(local)
    if personalization_of(cfg) == "ditto":
        local.update({PERSONAL_PREFIX + k: v for k, v in ditto_update(cfg, index, task, personal, state_dict,
                                                                       server_round).items()})
    metrics = {"num-examples": task.num_windows("train"), "train_loss": float(loss), "territory": index}
    return cpu_state(shared), cpu_state(local), metrics


def split_personal(local: Mapping[str, torch.Tensor] | None
                   ) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """``(local entries, Ditto personal model)`` of a territory's local state: the personal model
    is stored under :data:`fedldt.personal.PERSONAL_PREFIX` keys beside the entries (so it is
    checkpointed per round with them); ``None`` where absent."""
    if local is None:
        return None, None
    entries = {k: v for k, v in local.items() if not k.startswith(PERSONAL_PREFIX)}
    personal = {k[len(PERSONAL_PREFIX):]: v for k, v in local.items() if k.startswith(PERSONAL_PREFIX)}
    return (entries or None) if personal else dict(local), personal or None


def ditto_update(cfg: Mapping[str, Any], index: int, task: TerritoryTask, personal: Mapping[str, torch.Tensor],
                 global_shared: Mapping[str, torch.Tensor], server_round: int) -> dict[str, torch.Tensor]:
    """One round of Ditto's personal training (Li et al., ICML 2021, Algorithm 1): ``personal``
    (the territory's model v, every state-dict entry) trained ``personalization.epochs`` epochs on
    the territory's training windows with loss ``F_k(v) + lam/2 ||v - w||^2``, ``w`` =
    ``global_shared``, the global model received this round (the term covers the shared
    parameters; v's local entries move freely). Learning rate ``personalization.lr`` (null =
    ``train.lr``), the run's optimizer. Returns v's new state dict (kept at home, never sent)."""
    p, tr = cfg["personalization"], cfg["train"]
    model = build_model({**cfg["model"], **task.model_dims()}, num_nodes=task.dataset.num_nodes)
    model.load_state_dict(dict(personal))
    model.to(train_device(tr))
    task.fit(model, epochs=int(p["epochs"]), lr=float(p.get("lr") or tr["lr"]),
             seed=derive_seed(cfg["seed"], index, server_round, 1), weight_decay=tr["weight_decay"],
             grad_clip=tr["grad_clip"], proximal_mu=float(p["lam"]), proximal_names=set(global_shared),
             proximal_reference=global_shared, optimizer=tr["optimizer"]["_target_"])
    return cpu_state(model.state_dict())


def evaluate(cfg: Mapping[str, Any], index: int, state_dict: Mapping[str, torch.Tensor], split: str,
             local_state: Mapping[str, torch.Tensor] | None = None, use: str = "auto",
             personal_state: Mapping[str, torch.Tensor] | None = None, history: str | None = None) -> dict[str, Any]:
    """Masked error sums of the given weights (with this territory's ``local_state``, see
    :func:`train`) and of the reference forecasts on ``split`` ('val' or 'test').

    Args:
        use: ``global``: the global weights with the local entries; ``personal``: the territory's
            personal model (Ditto's v from ``local_state``, or ``personal_state``, the kept model
            of :func:`finetune`); ``auto``: the personal model where there is one, else global.
        personal_state: a complete personal state dict (read by the ClientApp from the territory's
            folder, :func:`fedldt.checkpoint.load_personal_model`).
        history: the held-out territory's fine-tuning history (its task as fine-tuned, see
            :func:`with_train_history`).

    Returns:
        Metrics ``num-examples``, ``territory``, ``model.<sum>`` and ``<reference>.<sum>`` lists
        for each of :data:`fedldt.results.REFERENCES` (see :class:`fedldt.metrics.MetricSums`).

    Raises:
        ValueError: unknown split or ``use``; ``use="personal"`` without a personal model.
    """
    if split not in ("val", "test"):
        raise ValueError(f"evaluate split must be 'val' or 'test', got {split!r}")
    entries, personal = split_personal(local_state)
    if personal_state is not None:
        personal = dict(personal_state)
    if use not in ("auto", "global", "personal"):
        raise ValueError(f"evaluate use must be 'auto', 'global' or 'personal', got {use!r}")
    if use == "personal" and personal is None:
        raise ValueError("asked to evaluate the personal model, but this territory has none for this run")
    if history is not None:
        cfg = with_train_history(cfg, index, history)
    task = get_task(cfg, index)
    if personal is not None and use != "global":
        model = build_model({**cfg["model"], **task.model_dims()}, num_nodes=task.dataset.num_nodes)
        model.load_state_dict(personal)
        model.to(train_device(cfg["train"]))
    else:
        model = _model(cfg, index, task, state_dict, entries)
    return {"num-examples": task.num_windows(split), "territory": index,
            **sums_to_record(evaluation_sums(task, model, split))}


def with_train_history(cfg: Mapping[str, Any], index: int, history: str) -> dict[str, Any]:
    """:func:`fedldt.personal.with_train_history` for this territory (named by its own data)."""
    return personal_history(cfg, get_task(cfg, index).dataset.name, history)


def finetune(cfg: Mapping[str, Any], index: int, state_dict: Mapping[str, torch.Tensor],
             local_state: Mapping[str, torch.Tensor] | None, history: str | None = None,
             ) -> tuple[dict[str, torch.Tensor], dict[str, int | float]]:
    """Fine-tune the final global model (with this territory's local entries) and keep the better
    (:func:`fedldt.personal.finetune`), for ``personalization=finetune`` or the held-out territory
    (``history``: ``federation.holdout_finetune``, it then trains on the last ``history`` of its
    training part only, see :func:`with_train_history`).

    Options: see :func:`fedldt.personal.finetune_from_config`.

    Returns:
        ``(state, metrics)``: the kept model's complete state dict (to store at home, never sent)
        and the reply metrics ``territory``, ``kept`` (index in :data:`fedldt.personal.KEPT`),
        ``epochs_run`` and, when computable, ``val_mae_global`` and ``val_mae_finetuned``.
    """
    entries, _ = split_personal(local_state)
    if history is not None:
        cfg = with_train_history(cfg, index, history)
    task = get_task(cfg, index)
    state, info = finetune_from_config(task, _model(cfg, index, task, state_dict, entries), cfg, index)
    metrics: dict[str, int | float] = {"territory": index, "kept": KEPT.index(info["kept"]),
                                       "epochs_run": int(info["epochs_run"])}
    metrics.update({k: float(info[k]) for k in ("val_mae_global", "val_mae_finetuned") if info[k] is not None})
    return cpu_state(state), metrics
