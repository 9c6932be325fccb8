"""``fedldt export``: a finished run's model as one territory's model package.

Export runs on the territory's side, next to its data: the scaler statistics, the node order and
the adjacency belong to the territory's data and never left it during training. The territory is
rebuilt deterministically from the run's ``resolved_config.yaml`` (:func:`fedldt.config.load_territories`,
:func:`fedldt.engine.task_from_config`), checked against ``summary.json``, and the model's test MAE
on it is re-computed and compared with the reported one before anything is written.

Reading a run folder runs no code from it: ``resolved_config.yaml`` is read with
``yaml.safe_load`` and may name only the dataset and partition loaders fedldt ships
(:func:`check_run_config`); ``model.pt`` loads with
``torch.load(weights_only=True)``. Export never deletes or overwrites what it did not create:
``--force`` replaces only a folder that passes :func:`fedldt.delivery.package.check_package`.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

import fedldt
from fedldt.checkpoint import CheckpointError, load_personal_model
from fedldt.config import DATASET_LOADERS, PARTITIONS, TARGETS, load_territories
from fedldt.data.windows import collate, time_features
from fedldt.delivery import card as cards
from fedldt.delivery.onnx_export import (OPSET, PARITY_RTOL, FixedGraphForecaster, NotExportable, export_onnx,
                                         parity_error, parity_tolerance)
from fedldt.delivery import signing
from fedldt.delivery.package import (
    CARD_JSON, CARD_MD, EDGES, GLOBAL_WEIGHTS, NODES, ONNX, PACKAGE_FORMAT, SCALER,
    ForecastPackage, PackageError, check_package, graph_hash, load_weights_only, sign_package, write_manifest,
)
from fedldt.engine import TerritoryTask, task_from_config
from fedldt.metrics import mae
from fedldt.models import build_model

#: Largest accepted difference between the re-computed and the reported test MAE, data units.
REPRODUCE_TOL = 1e-4


class ExportError(ValueError):
    """A run cannot be exported; the message names the file or value and the fix."""


#: Config groups whose ``_target_`` :func:`fedldt.config.load_territories` instantiates.
LOADER_GROUPS = ("dataset", "partition")
#: Hydra's instantiation keys: besides the ``_target_`` keys of :data:`fedldt.config.TARGETS`
#: (each checked against its allow-list), none may appear.
HYDRA_KEYS = ("_target_", "_args_", "_partial_", "_recursive_", "_convert_")


def check_run_config(cfg: Any, where: Path) -> None:
    """Refuse a run config that would make :func:`fedldt.config.load_territories` run foreign code.

    ``dataset._target_`` and ``partition._target_`` must be loaders registered in
    :data:`fedldt.config.DATASET_LOADERS` / :data:`fedldt.config.PARTITIONS`; ``model._target_``,
    ``strategy._target_`` and ``train.optimizer._target_``, when present (run folders written
    before they existed have none), must be in their allow-lists (:data:`fedldt.config.TARGETS`);
    no other Hydra key (``_target_``, ``_args_``, ...) may appear anywhere, and no ``${...}``
    interpolation in ``dataset`` or ``partition``. Called before anything of the config is used.

    Raises:
        ExportError: names ``where`` (the ``resolved_config.yaml``), the key and the value.
    """
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in (*LOADER_GROUPS, "task", "train")):
        raise ExportError(f"{where}: not a fedldt run config (needs mappings dataset, partition, task, train)")
    allowed = {"dataset": DATASET_LOADERS, "partition": PARTITIONS}
    for group in LOADER_GROUPS:
        target = cfg[group].get("_target_")
        if target not in allowed[group]:
            raise ExportError(f"{where}: {group}._target_={target!r} is not a loader fedldt ships "
                              f"({sorted(allowed[group])}); refusing to run code named by a run folder")

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                name = f"{key}.{k}" if key else str(k)
                if k in HYDRA_KEYS and name not in TARGETS:
                    raise ExportError(f"{where}: key {name} is not allowed in a run config (only {sorted(TARGETS)} "
                                      "name fedldt's own functions and classes); refusing to run code named by "
                                      "a run folder")
                if name in TARGETS and v not in TARGETS[name]:
                    raise ExportError(f"{where}: {name}={v!r} is not registered in fedldt ({sorted(TARGETS[name])}); "
                                      "refusing to run code named by a run folder")
                walk(v, name)
        elif isinstance(obj, list):
            for i, v in enumerate(obj):
                walk(v, f"{key}[{i}]")
        elif isinstance(obj, str) and "${" in obj and key.split(".")[0].split("[")[0] in LOADER_GROUPS:
            raise ExportError(f"{where}: {key}={obj!r} holds an interpolation; a resolved config has none")

    walk(cfg, "")


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    for name in ("summary.json", "resolved_config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise ExportError(f"{run_dir / name} not found: RUN_DIR must be a finished run folder of scripts/simulate.py")
    cfg_file = run_dir / "resolved_config.yaml"
    try:
        cfg = yaml.safe_load(cfg_file.read_text())
    except yaml.YAMLError as e:
        raise ExportError(f"{cfg_file}: not valid YAML ({e})") from None
    check_run_config(cfg, cfg_file)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{run_dir / 'summary.json'}: not valid JSON ({e})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("territories"), list):
        raise ExportError(f"{run_dir / 'summary.json'}: not a run summary of fedldt (no list 'territories')")
    ckpt = load_weights_only(run_dir / "model.pt", ExportError)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict):
        raise ExportError(f"{run_dir / 'model.pt'}: not a fedldt checkpoint (no model_config)")
    return summary, cfg, ckpt


def _overlaps(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are the same folder or one is inside the other (after resolving links)."""
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(out: Path, run_dir: Path, overwrite: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output path whose writing could delete or overwrite what fedldt did not create.

    ``out`` may not be a symbolic link, a file or anything but a folder; it may not be, contain or
    lie inside the run folder or a ``protected`` path (the dataset). An existing folder is
    replaced only with ``overwrite`` and only if it is a valid fedldt package
    (:func:`~fedldt.delivery.package.check_package`: correct manifest and digest, every file listed
    and verified, nothing else in it).

    Raises:
        ExportError: why ``out`` is refused; nothing was touched.
    """
    if out.is_symlink():
        raise ExportError(f"--out {out} is a symbolic link; refusing to write through it (give the real folder)")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a folder; refusing to replace it")
    for other, what in ((run_dir, "the run folder"), *((p, "the dataset") for p in protected)):
        if _overlaps(out, other):
            raise ExportError(f"--out {out} is, contains or lies inside {what} {other}; choose a folder outside it")
    if not out.exists():
        return
    if not overwrite:
        raise ExportError(f"{out} exists; choose another --out or pass --force to replace it")
    try:
        check_package(out)
    except PackageError as e:
        raise ExportError(f"{out} exists and is not a valid fedldt model package ({e}); --force replaces only a "
                          "package fedldt wrote, unchanged: remove the folder yourself or choose another --out") from None


def _test_batch(task: TerritoryTask, count: int):
    """The first ``count`` test windows as one batch, with their raw inputs (values, mask, calendar)."""
    ds = task.dataset
    starts = task.windows["test"].starts[:count]
    batch = collate([task.windows["test"][i] for i in range(len(starts))])
    w = task.window
    values = np.stack([ds.values[s:s + w] for s in starts])  # [B, W, N, C]
    mask = np.stack([ds.mask[s:s + w] for s in starts])
    cal = time_features(ds.timestamps, task.time_of_day, task.day_of_week)
    calendar = np.stack([cal[s:s + w] for s in starts])  # [B, W, k]
    return batch, values, mask, calendar


def export_package(
    run_dir: str | Path,
    territory: str,
    out: str | Path,
    *,
    dataset_path: str | Path | None = None,
    timezone: str | None = None,
    onnx: bool = True,
    overwrite: bool = False,
    parity_windows: int = 64,
    sign_key: str | Path | None = None,
    territory_dir: str | Path | None = None,
) -> ForecastPackage:
    """Write the model package of ``territory`` from a finished run.

    Args:
        run_dir: the run folder (``summary.json``, ``resolved_config.yaml``, ``model.pt``).
        territory: territory id as in ``summary.json`` (``t0``, ``t1``, ...).
        out: the package folder to create.
        dataset_path: where this territory's copy of the dataset is, if not at the run's
            ``dataset.path``.
        timezone: IANA time zone of the data's (naive) timestamps, e.g. ``America/Los_Angeles``;
            lets clients send timestamps with UTC offsets and get them back. ``None`` = not recorded.
        onnx: also export ``model.onnx`` (with a parity check).
        overwrite: replace an existing package at ``out``; only a valid fedldt package is
            replaced (see :func:`check_output`).
        parity_windows: test windows on which ONNX Runtime is compared with PyTorch.
        sign_key: Ed25519 private key file (PEM, mode 0600, from ``fedldt keygen``): also write
            ``package.sig``, a signature of the manifest digest.
        territory_dir: the territory's own folder (its SuperNode's node config ``out-dir``) for a
            run with ``personalization=finetune|ditto``: the package carries the complete model
            the territory kept there (``checkpoints/<run key>/personal.pt``,
            :func:`fedldt.checkpoint.load_personal_model`; the run key is ``model.pt``'s
            ``run_key``), never anything from the server; its test MAE must reproduce the run's
            ``test_per_territory`` (the personal model's).

    Returns:
        The written package, loaded back (every file checked).

    Raises:
        ExportError: a missing run file, an unknown territory, data that does not rebuild the
            run's territory, weights that do not fit it, a reported metric that is not
            reproduced, a model that cannot be exported to ONNX (use ``onnx=False``), an
            ONNX parity error above :func:`fedldt.delivery.onnx_export.parity_tolerance`, a run config naming foreign
            code, an unusable signing key, or an ``out`` that may not be written (see :func:`check_output`).
    """
    run_dir, out = Path(run_dir), Path(out)
    key = None
    if sign_key is not None:
        try:
            key = signing.load_private_key(sign_key)
        except signing.SignatureError as e:
            raise ExportError(f"--sign-key: {e}") from None
    summary, cfg, ckpt = _read_run(run_dir)
    infos = {t["id"]: t for t in summary["territories"]}
    if territory not in infos:
        raise ExportError(f"territory {territory!r} is not in run {run_dir} (its territories: {sorted(infos)})")
    if timezone is not None:
        try:
            pd.Timestamp("2000-01-01").tz_localize(timezone)
        except Exception:
            raise ExportError(f"--timezone {timezone!r} is not an IANA time zone name (e.g. America/Los_Angeles)") from None
    if cfg["task"].get("covariates"):
        raise ExportError(f"run {run_dir} was trained with territory covariates (task.covariates=true, e.g. weather); "
                          "model packages carry calendar features only, so this run cannot be exported yet")
    if ckpt.get("state_dicts") is not None or summary.get("mode") == "local":
        raise ExportError(f"run {run_dir} is a local-mode run (one model per territory); export a federated or "
                          "centralized run")
    if dataset_path is not None:
        cfg["dataset"]["path"] = str(Path(dataset_path).expanduser().resolve())
    if not Path(cfg["dataset"]["path"]).exists():
        raise ExportError(f"dataset.path {cfg['dataset']['path']} (from {run_dir / 'resolved_config.yaml'}) does not "
                          "exist here; pass --dataset-path to this territory's copy of the data")
    check_output(out, run_dir, overwrite, protected=(Path(cfg["dataset"]["path"]),))

    # ---- the territory, rebuilt from the run's config, must be the one that trained
    try:
        by_id = {t.name: t for t in load_territories(cfg)}
    except ValueError as e:  # fedldt.config refuses unknown loaders too
        raise ExportError(f"{run_dir / 'resolved_config.yaml'}: {e}") from None
    ds = by_id.get(territory)
    info = infos[territory]
    if ds is None or ds.num_nodes != int(info["num_nodes"]):
        raise ExportError(f"the data at {cfg['dataset']['path']} does not rebuild territory {territory} of the run "
                          f"({info['num_nodes']} nodes); export with the data the run used")
    task = task_from_config(ds, cfg["task"], cfg["train"], cfg["dataset"].get("valid_range"))
    if task.num_windows("test") != int(info["num_test_windows"]):
        raise ExportError(f"territory {territory}: {task.num_windows('test')} test windows here, "
                          f"{info['num_test_windows']} in the run; export with the data the run used")
    model_cfg = dict(ckpt["model_config"])
    wrong = {k: (model_cfg.get(k), v) for k, v in task.model_dims().items() if model_cfg.get(k) != v}
    if wrong:
        raise ExportError(f"{run_dir / 'model.pt'}: model sizes (model, data) differ: {wrong}")
    model = build_model(model_cfg, num_nodes=ds.num_nodes)
    if territory_dir is not None:
        _load_personal(model, run_dir, ckpt, Path(territory_dir).expanduser(), territory)
    elif ckpt.get("personalization") in PERSONAL:
        raise ExportError(f"run {run_dir} is personalized (personalization={ckpt['personalization']}): each territory "
                          "kept its own model in its own folder; export it on the territory with --territory-dir "
                          "<its SuperNode's out-dir>")
    else:
        # Territory-kept entries: integer buffers (BatchNorm counters, unused at inference) are fine;
        # parameters kept at home (node embeddings, a FedPer head, FedBN layers) are not in model.pt.
        state = model.state_dict()
        kept = [k for k in ckpt.get("local_keys", []) if k not in state or torch.is_floating_point(state[k])]
        if kept:
            raise ExportError(f"{run_dir / 'model.pt'} holds the global (shared) weights only: each territory kept "
                              f"{kept} at home (personalization={ckpt.get('personalization', 'none')} or node-dependent "
                              "parameters), so the complete model exists only on the territories; export a run with "
                              "personalization=none and a model without node-dependent parameters, or a "
                              "personalization=finetune|ditto run with --territory-dir")
        missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
        if sorted(missing) != sorted(ckpt.get("local_keys", [])) or unexpected:
            raise ExportError(f"{run_dir / 'model.pt'} does not fit model '{model_cfg.get('name')}': missing {missing}, "
                              f"unexpected {unexpected}")
    model.eval()

    # ---- the reported test metric must be reproduced with the global weights
    reported = summary["test_per_territory"][territory]["mae"]["all"]
    recomputed = mae(task.evaluate(model, "test"))
    if reported is None:
        raise ExportError(f"territory {territory} had no valid test target in run {run_dir} (test MAE null): the "
                          "exported model could not be checked against the run; export a territory with test data")
    if recomputed is None or not np.isfinite(recomputed) or abs(recomputed - reported) > REPRODUCE_TOL:
        raise ExportError(f"territory {territory}: test MAE re-computed here {recomputed} != reported {reported}: "
                          "the data or code differ from the run's; export with the data and fedldt version of the run")

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"--out {out}: cannot create its parent folder ({e})") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # written aside, then moved in place
    tmp.chmod(0o755)
    try:
        _write(tmp, summary, cfg, ckpt, model, model_cfg, task, territory, timezone, onnx, parity_windows,
               reported, recomputed, run_dir, key)
        _move_in_place(tmp, out, run_dir, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ForecastPackage.load(out)


#: Personalizations whose complete per-territory model stays in the territory's own folder.
PERSONAL = ("finetune", "ditto")


def _load_personal(model: torch.nn.Module, run_dir: Path, ckpt: dict[str, Any], folder: Path, territory: str) -> None:
    """Load into ``model`` the personal model the territory kept in ``folder`` for this run.

    Raises:
        ExportError: the run is not personalized or names no run key; the file is missing, corrupt,
            of another run or another territory, holds NaN/inf, or does not fit the model (keys and shapes).
    """
    if ckpt.get("personalization") not in PERSONAL:
        raise ExportError(f"--territory-dir is for personalization={'|'.join(PERSONAL)} runs; run {run_dir} has "
                          f"personalization={ckpt.get('personalization')!r}: export it without --territory-dir")
    run_key = ckpt.get("run_key")
    if not isinstance(run_key, str):
        raise ExportError(f"{run_dir / 'model.pt'} names no run key (written by an older fedldt): the territory's "
                          "personal model cannot be matched to this run")
    try:
        meta, state = load_personal_model(folder, run_key)
    except (CheckpointError, ValueError) as e:
        raise ExportError(f"--territory-dir {folder}: {e}") from None
    owner = meta.get("territory_id")
    if owner is not None and str(owner) != territory:
        raise ExportError(f"--territory-dir {folder} holds the personal model of territory {str(owner)[:128]!r}, not "
                          f"{territory!r}: give the out-dir of {territory!r}'s own SuperNode")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"--territory-dir {folder}: the personal model does not fit model "
                          f"'{ckpt['model_config'].get('name')}' ({str(e).splitlines()[0]})") from None


def _move_in_place(tmp: Path, out: Path, run_dir: Path, overwrite: bool) -> None:
    """Rename the written package ``tmp`` to ``out``. An existing ``out`` is first renamed aside,
    checked again there (it may have changed since the first check), and deleted only if it is
    still a valid package; otherwise it is put back and the export refused."""
    if not out.exists() and not out.is_symlink():
        tmp.rename(out)
        return
    check_output(out, run_dir, overwrite)
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    old = aside / "package"
    out.rename(old)
    try:
        check_package(old)
    except PackageError as e:
        old.rename(out)
        aside.rmdir()
        raise ExportError(f"{out} changed while exporting and is no longer a valid fedldt package ({e}); "
                          "left untouched") from None
    tmp.rename(out)
    shutil.rmtree(aside)


def _write(root: Path, summary, cfg, ckpt, model, model_cfg, task: TerritoryTask, territory: str, timezone,
           onnx: bool, parity_windows: int, reported: float, recomputed: float, run_dir: Path,
           key: "signing.Ed25519PrivateKey | None" = None) -> None:
    ds = task.dataset
    (root / "weights").mkdir(parents=True)
    # the model's full state: the run's weights plus integer buffers it did not ship (inference ignores them)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, root / GLOBAL_WEIGHTS)
    (root / SCALER).write_text(json.dumps(task.scaler.state()) + "\n")
    nodes = pd.DataFrame({"index": np.arange(ds.num_nodes), "sensor_id": ds.node_ids})
    if ds.coords is not None:
        nodes["latitude"], nodes["longitude"] = np.asarray(ds.coords)[:, 0], np.asarray(ds.coords)[:, 1]
    nodes.to_csv(root / NODES, index=False)
    src, dst = ds.edge_index.numpy()
    pd.DataFrame({"source": src, "target": dst, "weight": ds.edge_weight.numpy().astype(np.float64)}).to_csv(
        root / EDGES, index=False)
    ghash = graph_hash(ds.node_ids.tolist(), ds.edge_index, ds.edge_weight)

    task_facts = {
        "window": task.window, "horizon": task.horizon, "interval_s": int(ds.freq.total_seconds()),
        "timezone": timezone, "time_of_day": task.time_of_day, "day_of_week": task.day_of_week,
        "channels": list(ds.channels), "units": list(ds.units),
        # plausible observations per channel (conf/dataset valid_range); predict/serve refuse others
        "valid_range": {c: r for c, r in (cfg["dataset"].get("valid_range") or ds.extra.get("valid_range") or {}).items() if c in ds.channels},
    }
    onnx_info = None
    if onnx:
        batch, values, mask, calendar = _test_batch(task, parity_windows)
        reference = task.predict(model, batch).numpy()  # the in-run prediction path
        try:
            wrapper = FixedGraphForecaster(model, ds.edge_index, ds.edge_weight, ds.num_nodes, task.scaler,
                                           task.forecast_limits)
        except NotExportable as e:
            raise ExportError(str(e)) from None
        export_onnx(wrapper, (torch.from_numpy(values[:2]), torch.from_numpy(mask[:2]), torch.from_numpy(calendar[:2])),
                    root / ONNX)
        err = parity_error(root / ONNX, reference, values, mask, calendar)
        tol = parity_tolerance(values[mask > 0])
        if not err <= tol:
            raise ExportError(f"ONNX parity: max |ONNX Runtime - PyTorch| = {err:.3g} > {tol:.3g} "
                              f"(= {PARITY_RTOL:g} * max(1, mean |observed value|)) on {len(values)} test windows of "
                              f"model '{model_cfg.get('name')}'; use --no-onnx and the torch engine")
        onnx_info = {"file": ONNX, "opset": OPSET, "inputs": {"values": "[batch, window, node, channel] float32 data units",
                     "mask": "[batch, window, node, channel] float32, 1 = observed",
                     "calendar": "[batch, window, k] float32 time features"},
                     "output": "forecast [batch, horizon, node, channel] float32 data units, clipped to task.valid_range",
                     "parity_max_abs_err": err, "parity_tolerance": tol, "parity_windows": int(len(values))}
    created = dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat()
    run_finished = dt.datetime.fromtimestamp((run_dir / "model.pt").stat().st_mtime, dt.timezone.utc).replace(
        microsecond=0).isoformat()
    t0, t1 = task.bounds["train"]
    card = cards.build_card(
        summary=summary, cfg=cfg, territory=territory, num_nodes=ds.num_nodes, num_edges=int(ds.edge_index.shape[1]),
        graph_hash=ghash, task_facts=task_facts, split_periods={s: task.split_info(s) for s in ("train", "val", "test")},
        train_complete=bool((ds.mask[t0:t1] > 0).all()),
        provenance=cards.dataset_provenance(cfg["dataset"]["name"], cfg["dataset"]["path"]),
        model_config=model_cfg, num_parameters=sum(p.numel() for p in model.parameters()),
        onnx_info=onnx_info,
        reproduced={"mae_all": recomputed, "reported_mae_all": reported},
        run_finished=run_finished, created=created, fedldt_version=fedldt.__version__,
    )
    (root / CARD_JSON).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    (root / CARD_MD).write_text(cards.render_markdown(card))
    write_manifest(root, {
        "format": PACKAGE_FORMAT,
        "created": created,
        "fedldt_version": fedldt.__version__,
        "pilot": summary["pilot"],
        "territory": territory,
        "model_config": model_cfg,
        "weights": {"global": GLOBAL_WEIGHTS, "local": None},  # personalized weights: not exported (yet)
        "task": task_facts,
        "graph_hash": ghash,
        "onnx": onnx_info,
    })
    if key is not None:
        sign_package(root, key)
