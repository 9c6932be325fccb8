"""The results folder of a run: summary.json, history.csv, model.pt, resolved config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml

import fedldt


def write_run_outputs(run_dir: Path, cfg: dict[str, Any], summary: dict[str, Any], history: list[dict[str, Any]],
                      checkpoint: dict[str, Any]) -> None:
    """Write ``summary.json``, ``history.csv`` (one row per round and territory), ``model.pt``
    (state dict + model config) and ``resolved_config.yaml`` into ``run_dir``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = {**summary, "fedldt_version": fedldt.__version__}
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
    lines = [f"test metrics of pilot '{summary['pilot']}' ({summary['mode']}, {summary['rounds']} rounds)", head]
    for metric in ("mae", "rmse", "mape"):
        for label, block in (("model", summary["test"]), ("persistence", summary["persistence"])):
            vals = "".join(f"{_fmt(block[metric][s]):>9s}" for s in steps)
            lines.append(f"{metric.upper() + ' ' + label:22s}{vals}")
    lines.append("per territory (model MAE):")
    for tid, block in summary["test_per_territory"].items():
        lines.append(f"  {tid:20s}" + "".join(f"{_fmt(block['mae'][s]):>9s}" for s in steps))
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
