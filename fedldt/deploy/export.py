"""``fedldt export``: a finished run's model as one territory's model package.

Export runs on the territory's side, next to its data: the scaler statistics, the node order and
the adjacency belong to the territory's data and never left it during training. The territory is
rebuilt deterministically from the run's ``resolved_config.yaml`` (:func:`fedldt.config.load_territories`,
:func:`fedldt.engine.task_from_config`), checked against ``summary.json``, and the model's test MAE
on it is re-computed and compared with the reported one before anything is written.
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
from fedldt.config import load_territories
from fedldt.data.windows import collate, time_features
from fedldt.deploy import card as cards
from fedldt.deploy.onnx_export import OPSET, FixedGraphForecaster, export_onnx, parity_error
from fedldt.deploy.package import (
    CARD_JSON, CARD_MD, EDGES, GLOBAL_WEIGHTS, LOCAL_WEIGHTS, MANIFEST, NODES, ONNX, PACKAGE_FORMAT, SCALER,
    ForecastPackage, graph_hash, sha256_file,
)
from fedldt.engine import TerritoryTask, task_from_config
from fedldt.metrics import mae
from fedldt.models import build_model

#: Optional personalized parameters of a territory in a run folder (no strategy writes them yet):
#: a state-dict subset whose keys override the global weights.
LOCAL_PARAMS_DIR = "local_params"
#: Largest accepted |ONNX Runtime - PyTorch| in data units.
PARITY_TOL = 1e-4
#: Largest accepted difference between the re-computed and the reported test MAE, data units.
REPRODUCE_TOL = 1e-4


class ExportError(ValueError):
    """A run cannot be exported; the message names the file or value and the fix."""


def _read_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    for name in ("summary.json", "resolved_config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise ExportError(f"{run_dir / name} not found: RUN_DIR must be a finished run folder of scripts/simulate.py")
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    ckpt = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    return summary, cfg, ckpt


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
        overwrite: replace an existing package at ``out``.
        parity_windows: test windows on which ONNX Runtime is compared with PyTorch.

    Returns:
        The written package, loaded back (every file checked).

    Raises:
        ExportError: a missing run file, an unknown territory, data that does not rebuild the
            run's territory, weights that do not fit it, a reported metric that is not
            reproduced, an ONNX parity error above ``PARITY_TOL``, or ``out`` exists.
    """
    run_dir, out = Path(run_dir), Path(out)
    summary, cfg, ckpt = _read_run(run_dir)
    infos = {t["id"]: t for t in summary["territories"]}
    if territory not in infos:
        raise ExportError(f"territory {territory!r} is not in run {run_dir} (its territories: {sorted(infos)})")
    if timezone is not None:
        try:
            pd.Timestamp("2000-01-01").tz_localize(timezone)
        except Exception:
            raise ExportError(f"--timezone {timezone!r} is not an IANA time zone name (e.g. America/Los_Angeles)") from None
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; choose another --out or pass --force to replace it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ExportError(f"{out} exists and is not a model package; refusing to replace it")
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

    # ---- the territory, rebuilt from the run's config, must be the one that trained
    by_id = {t.name: t for t in load_territories(cfg)}
    ds = by_id.get(territory)
    info = infos[territory]
    if ds is None or ds.num_nodes != int(info["num_nodes"]):
        raise ExportError(f"the data at {cfg['dataset']['path']} does not rebuild territory {territory} of the run "
                          f"({info['num_nodes']} nodes); export with the data the run used")
    task = task_from_config(ds, cfg["task"], cfg["train"])
    if task.num_windows("test") != int(info["num_test_windows"]):
        raise ExportError(f"territory {territory}: {task.num_windows('test')} test windows here, "
                          f"{info['num_test_windows']} in the run; export with the data the run used")
    model_cfg = dict(ckpt["model_config"])
    wrong = {k: (model_cfg.get(k), v) for k, v in task.model_dims().items() if model_cfg.get(k) != v}
    if wrong:
        raise ExportError(f"{run_dir / 'model.pt'}: model sizes (model, data) differ: {wrong}")
    model = build_model(model_cfg, num_nodes=ds.num_nodes)
    # Territory-kept entries: integer buffers (BatchNorm counters, unused at inference) are fine;
    # parameters kept at home (node embeddings, a FedPer head, FedBN layers) are not in model.pt.
    state = model.state_dict()
    kept = [k for k in ckpt.get("local_keys", []) if k not in state or torch.is_floating_point(state[k])]
    if kept:
        raise ExportError(f"{run_dir / 'model.pt'} holds the global (shared) weights only: each territory kept "
                          f"{kept} at home (personalization={ckpt.get('personalization', 'none')} or node-dependent "
                          "parameters), so the complete model exists only on the territories; export a run with "
                          "personalization=none and a model without node-dependent parameters")
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if sorted(missing) != sorted(ckpt.get("local_keys", [])) or unexpected:
        raise ExportError(f"{run_dir / 'model.pt'} does not fit model '{model_cfg.get('name')}': missing {missing}, "
                          f"unexpected {unexpected}")
    model.eval()

    # ---- the reported test metric must be reproduced with the global weights
    reported = summary["test_per_territory"][territory]["mae"]["all"]
    recomputed = mae(task.evaluate(model, "test"))
    if abs(recomputed - reported) > REPRODUCE_TOL:
        raise ExportError(f"territory {territory}: test MAE re-computed here {recomputed:.6f} != reported {reported:.6f}: "
                          "the data or code differ from the run's; export with the data and fedldt version of the run")

    local_file = run_dir / LOCAL_PARAMS_DIR / f"{territory}.pt"
    local = torch.load(local_file, map_location="cpu", weights_only=True) if local_file.is_file() else None
    if local is not None:
        model.load_state_dict({**model.state_dict(), **local}, strict=True)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # written aside, then moved in place
    tmp.chmod(0o755)
    try:
        _write(tmp, summary, cfg, ckpt, model, model_cfg, task, territory, local, timezone, onnx, parity_windows,
               reported, recomputed, run_dir)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return ForecastPackage.load(out)


def _write(root: Path, summary, cfg, ckpt, model, model_cfg, task: TerritoryTask, territory: str, local, timezone,
           onnx: bool, parity_windows: int, reported: float, recomputed: float, run_dir: Path) -> None:
    ds = task.dataset
    (root / "weights").mkdir(parents=True)
    # the model's full state: the run's weights plus integer buffers it did not ship (inference ignores them)
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, root / GLOBAL_WEIGHTS)
    if local is not None:
        torch.save(local, root / LOCAL_WEIGHTS)
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
        "valid_range": {c: r for c, r in (cfg["dataset"].get("valid_range") or {}).items() if c in ds.channels},
    }
    onnx_info = None
    if onnx:
        batch, values, mask, calendar = _test_batch(task, parity_windows)
        reference = task.predict(model, batch).numpy()  # the in-run prediction path
        wrapper = FixedGraphForecaster(model, ds.edge_index, ds.edge_weight, ds.num_nodes, task.scaler)
        export_onnx(wrapper, (torch.from_numpy(values[:2]), torch.from_numpy(mask[:2]), torch.from_numpy(calendar[:2])),
                    root / ONNX)
        err = parity_error(root / ONNX, reference, values, mask, calendar)
        if not err <= PARITY_TOL:
            raise ExportError(f"ONNX parity: max |ONNX Runtime - PyTorch| = {err:.3g} > {PARITY_TOL} on {len(values)} "
                              "test windows; use --no-onnx and the torch engine")
        onnx_info = {"file": ONNX, "opset": OPSET, "inputs": {"values": "[batch, window, node, channel] float32 data units",
                     "mask": "[batch, window, node, channel] float32, 1 = observed",
                     "calendar": "[batch, window, k] float32 time features"},
                     "output": "forecast [batch, horizon, node, channel] float32 data units",
                     "parity_max_abs_err": err, "parity_windows": int(len(values))}
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
        local_params=None if local is None else sorted(local), onnx_info=onnx_info,
        reproduced={"mae_all": recomputed, "reported_mae_all": reported},
        run_finished=run_finished, created=created, fedldt_version=fedldt.__version__,
    )
    (root / CARD_JSON).write_text(json.dumps(card, indent=2, allow_nan=False) + "\n")
    (root / CARD_MD).write_text(cards.render_markdown(card))
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    manifest = {
        "format": PACKAGE_FORMAT,
        "created": created,
        "fedldt_version": fedldt.__version__,
        "pilot": summary["pilot"],
        "territory": territory,
        "model_config": model_cfg,
        "weights": {"global": GLOBAL_WEIGHTS, "local": LOCAL_WEIGHTS if local is not None else None},
        "task": task_facts,
        "graph_hash": ghash,
        "onnx": onnx_info,
        "files": {f: sha256_file(root / f) for f in files},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
