"""The results folder of a run: summary.json, history.csv, model.pt, resolved config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import torch
import yaml

import fedldt
from fedldt.launch.provenance import run_provenance
from fedldt.metrics import MetricSums, pool, report

#: Reference forecasts evaluated on the same test windows as the trained model.
REFERENCES = ("persistence", "historical_average")
#: ``eval_status`` (history.csv) of a territory that evaluated but has no valid target (every
#: target of the split masked): its metrics are empty cells (``null`` in JSON), never NaN or 0.
NOT_AVAILABLE = "not available"


def build_summary(cfg: dict[str, Any], mode: str, territories: list[dict[str, Any]],
                  test: dict[str, dict[str, MetricSums]], history: list[dict[str, Any]],
                  failures: list[dict[str, Any]], model_cfg: dict[str, Any], wall_time_s: float) -> dict[str, Any]:
    """The ``summary.json`` content, identical in schema for every training mode.

    Args:
        cfg: resolved config.
        mode: ``"federated"``, ``"centralized"`` or ``"local"``.
        territories: ``[{"id", "num_nodes", "num_train_windows", ...}]`` in territory order.
        test: territory id -> ``{"model": sums, "persistence": sums, "historical_average": sums}``.
        history: pooled validation metrics per round.

    A metric that cannot be computed (no valid target) is ``None`` (JSON ``null``, never NaN);
    ``test_not_available`` names the territories without a valid test target.
        failures: failed replies (federated only).
        model_cfg: the model config (to rebuild the model).
        wall_time_s: seconds the run took.
    """
    steps = list(cfg["task"]["report_steps"])
    out: dict[str, Any] = {
        "pilot": cfg["name"],
        "mode": mode,
        "dataset": {"name": cfg["dataset"]["name"], "path": cfg["dataset"]["path"]},
        "territories": territories,
        "rounds": int(cfg["train"]["rounds"]),
        "local_epochs": int(cfg["train"]["local_epochs"]),
        "seed": int(cfg["seed"]),
        "strategy": dict(cfg["strategy"]) if mode == "federated" else None,
        "personalization": str(cfg.get("personalization", {}).get("name", "none")) if mode == "federated" else None,
        "test": report(pool(t["model"] for t in test.values()), steps),
        "test_per_territory": {tid: report(t["model"], steps) for tid, t in test.items()},
        # territories whose test targets are all missing: their metrics are null, the pooled ones
        # come from the others
        "test_not_available": [tid for tid, t in test.items() if int(t["model"].num_valid.sum()) == 0],
    }
    for ref in REFERENCES:
        out[ref] = report(pool(t[ref] for t in test.values()), steps)
        out[f"{ref}_per_territory"] = {tid: report(t[ref], steps) for tid, t in test.items()}
    out.update({"history": history, "failures": failures, "model": model_cfg, "wall_time_s": round(wall_time_s, 3)})
    return out


#: The files :func:`write_run_outputs` writes into a run folder.
RUN_FILES = ("summary.json", "history.csv", "model.pt", "resolved_config.yaml")


def _written_by_fedldt(path: Path) -> bool:
    """Whether ``path`` (one of :data:`RUN_FILES`) is a regular file that fedldt wrote: a summary
    with ``fedldt_version``, a history starting ``round,territory``, a config with ``dataset`` and
    ``task``, a checkpoint (loaded tensors-only) with ``model_config`` and ``state_dict`` (or
    ``state_dicts``, one per territory, in local mode)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        if path.name == "model.pt":
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            return isinstance(ckpt, dict) and "model_config" in ckpt and bool({"state_dict", "state_dicts"} & set(ckpt))
        text = path.read_text(encoding="utf-8")
        if path.name == "summary.json":
            doc = json.loads(text)
            return isinstance(doc, dict) and "fedldt_version" in doc
        if path.name == "history.csv":
            return text.startswith("round,territory")
        doc = yaml.safe_load(text)
        return isinstance(doc, dict) and {"dataset", "task"} <= set(doc)
    except Exception:  # unreadable, not UTF-8, not JSON/YAML, a pickle needing code: not ours
        return False


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a results folder where writing a run's results would overwrite files fedldt did not
    write: each of :data:`RUN_FILES` must be absent or a result of an earlier fedldt run (which
    a new run with the same ``hydra.run.dir`` replaces). Called before a run starts and again
    before the results are written.

    Raises:
        FileExistsError: names the file and the fix (another ``hydra.run.dir``).
    """
    run_dir = Path(run_dir)
    for name in RUN_FILES:
        path = run_dir / name
        if (path.exists() or path.is_symlink()) and not _written_by_fedldt(path):
            raise FileExistsError(f"{path} exists and was not written by fedldt; refusing to overwrite it: "
                                  "choose another results folder (hydra.run.dir=...)")


def write_run_outputs(run_dir: Path, cfg: dict[str, Any], summary: dict[str, Any], history: list[dict[str, Any]],
                      checkpoint: dict[str, Any]) -> None:
    """Write ``summary.json``, ``history.csv`` (one row per round and territory), ``model.pt``
    (state dict + model config) and ``resolved_config.yaml`` into ``run_dir``. ``summary.json``
    gets ``fedldt_version`` and ``provenance`` (the code, checkout, git commit and config folders
    of the run: :func:`fedldt.launch.provenance.run_provenance`).

    Raises:
        FileExistsError: one of them exists and was not written by fedldt (:func:`check_run_dir`).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir(run_dir)
    summary = {**summary, "fedldt_version": fedldt.__version__, "provenance": run_provenance()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    frame = pd.DataFrame(history)
    if "num_train" in frame:  # stays an integer column when a failed territory leaves it empty
        frame["num_train"] = frame["num_train"].astype("Int64")
    frame.to_csv(run_dir / "history.csv", index=False)
    torch.save(checkpoint, run_dir / "model.pt")
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def summary_table(summary: dict[str, Any]) -> str:
    """A short plain-text table of test MAE/RMSE/MAPE: model vs. persistence, pooled and per territory."""
    steps = [k for k in summary["test"]["mae"]]
    head = f"{'':22s}" + "".join(f"{s:>9s}" for s in steps)
    lines = [f"test metrics of pilot '{summary['pilot']}' ({summary['mode']}, {summary['rounds']} round{'' if summary['rounds'] == 1 else 's'})", head]
    for metric in ("mae", "rmse", "mape"):
        for label, block in (("model", summary["test"]), ("persistence", summary["persistence"]),
                             ("hist. average", summary["historical_average"])):
            vals = "".join(f"{_fmt(block[metric][s]):>9s}" for s in steps)
            lines.append(f"{metric.upper() + ' ' + label:22s}{vals}")
    lines.append("per territory (model MAE):")
    for tid, block in summary["test_per_territory"].items():
        lines.append(f"  {tid:20s}" + "".join(f"{_fmt(block['mae'][s]):>9s}" for s in steps))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


#: Record, in a publish folder, of the files fedldt published there and their sha256.
PUBLISHED = ".fedldt-published.json"


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_publish_dir(publish_dir: str | Path, names: Sequence[str]) -> None:
    """Refuse to publish into ``publish_dir`` where it would replace a file fedldt did not publish.

    A file named in ``names`` may be replaced only if the folder's ``.fedldt-published.json``
    lists it with the sha256 it still has (fedldt published it, and nobody changed it since).
    Call before a long run; :func:`publish` checks again.

    Raises:
        FileExistsError: names the file and the fix.
    """
    pub = Path(publish_dir)
    record_file = pub / PUBLISHED
    record: dict[str, str] = {}
    if record_file.is_file() and not record_file.is_symlink():
        try:
            loaded = json.loads(record_file.read_text(encoding="utf-8"))
            record = loaded if isinstance(loaded, dict) else {}
        except (ValueError, UnicodeDecodeError):
            record = {}
    for name in names:
        target = pub / name
        if not (target.exists() or target.is_symlink()):
            continue
        if target.is_symlink() or not target.is_file() or record.get(name) != _sha256(target):
            raise FileExistsError(f"{target} exists and is not a file fedldt published there (or it changed since); "
                                  "refusing to overwrite it: choose another publish folder or move the file away")


def publish(artifacts: Sequence[Path], publish_dir: str | Path) -> None:
    """Copy ``artifacts`` into ``publish_dir`` (created) after :func:`check_publish_dir`, and record
    their sha256 in its ``.fedldt-published.json``."""
    import shutil

    pub = Path(publish_dir)
    pub.mkdir(parents=True, exist_ok=True)
    check_publish_dir(pub, [a.name for a in artifacts])
    record_file = pub / PUBLISHED
    record = json.loads(record_file.read_text()) if record_file.is_file() and not record_file.is_symlink() else {}
    record = record if isinstance(record, dict) else {}
    for a in artifacts:
        shutil.copyfile(a, pub / a.name)
        record[a.name] = _sha256(pub / a.name)
    record_file.write_text(json.dumps(dict(sorted(record.items())), indent=1) + "\n")
