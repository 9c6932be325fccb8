"""The results folder of a run: summary.json, history.csv, model.pt, resolved config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import yaml

import fedldt
from fedldt.launch.provenance import run_provenance
from fedldt.metrics import MetricSums, pool, report, windows_weighted_mean

#: Reference forecasts evaluated on the same test windows as the trained model (what each is:
#: docs/evaluation.md, "References").
REFERENCES = ("persistence", "historical_average", "seasonal_naive_day", "seasonal_naive_week")
#: Seasonal-naive references -> their season (lag), a pandas timedelta string
#: (:meth:`fedldt.engine.TerritoryTask.seasonal_naive`).
SEASONAL_LAGS = {"seasonal_naive_day": "1D", "seasonal_naive_week": "7D"}
#: Row labels of the references in the closing table (:func:`summary_table`).
REFERENCE_LABELS = {"persistence": "persistence", "historical_average": "hist. average",
                    "seasonal_naive_day": "seasonal naive (day)", "seasonal_naive_week": "seasonal naive (week)"}
#: ``eval_status`` (history.csv) of a territory that evaluated but has no valid target (every
#: target of the split masked): its metrics are empty cells (``null`` in JSON), never NaN or 0.
NOT_AVAILABLE = "not available"
#: The ``error`` text (history.csv) of such a territory.
NO_VALID_TARGET = "no valid target (every target in the split is masked)"

# ---------------------------------------------------------------------------------------------
# The rows of every mode's results (federated: server/rounds.py and server/strategy.py from the
# territories' replies; centralized and local: fedldt/baselines.py from the tasks themselves).

#: ``summary.json`` territory-row field -> the key of the territory's describe reply that fills it.
TERRITORY_FIELDS = {"id": "territory-id", "num_nodes": "num-nodes", "num_train_windows": "num-train",
                    "num_val_windows": "num-val", "num_test_windows": "num-test"}


def territory_info(task: Any) -> dict[str, int | str]:
    """A territory's name and sizes, keyed as its describe reply carries them (the values of
    :data:`TERRITORY_FIELDS`), from its :class:`~fedldt.engine.TerritoryTask`."""
    return {"territory-id": task.dataset.name, "num-nodes": int(task.dataset.num_nodes),
            "num-train": task.num_windows("train"), "num-val": task.num_windows("val"),
            "num-test": task.num_windows("test")}


def territory_row(info: Mapping[str, Any]) -> dict[str, int | str]:
    """The ``summary.json`` territory row (``id``, ``num_nodes``, window counts) of a describe
    reply or :func:`territory_info`."""
    return {field: str(info[key]) if field == "id" else int(info[key]) for field, key in TERRITORY_FIELDS.items()}


def reference_sums(task: Any, split: str) -> dict[str, MetricSums]:
    """Masked error sums on ``split`` of each of the :data:`REFERENCES` forecasts of a
    :class:`~fedldt.engine.TerritoryTask`, keyed by reference name, in :data:`REFERENCES` order;
    a seasonal naive forecast not defined for the data (:meth:`~fedldt.engine.TerritoryTask.seasonal_lag_steps`)
    gives all-zero sums (its metrics are ``None``).

    The forecasts depend on the task's data and split only, never on a model: computed once per
    task and split, then served from the task's cache (a territory evaluates them every round).
    """
    cache = getattr(task, "reference_cache", None)
    if cache is not None and split in cache:
        return dict(cache[split])
    out = {"persistence": task.persistence(split), "historical_average": task.historical_average(split),
           **{ref: task.seasonal_naive(split, lag) for ref, lag in SEASONAL_LAGS.items()}}
    out = {ref: out[ref] for ref in REFERENCES}
    if cache is not None:
        cache[split] = out
    return dict(out)


def evaluation_sums(task: Any, model: torch.nn.Module, split: str) -> dict[str, MetricSums]:
    """Masked error sums on ``split`` of ``model`` and of the :data:`REFERENCES` forecasts
    (:func:`reference_sums`): ``{"model", "persistence", "historical_average",
    "seasonal_naive_day", "seasonal_naive_week"}`` (what a territory's evaluate reply carries,
    :func:`sums_to_record`)."""
    return {"model": task.evaluate(model, split), **reference_sums(task, split)}


def sums_to_record(sums: Mapping[str, MetricSums]) -> dict[str, list[float] | list[int]]:
    """Flat metric-record entries ``<name>.<sum>`` of :func:`evaluation_sums`."""
    return {k: v for name, s in sums.items() for k, v in s.to_dict(f"{name}.").items()}


def sums_from_record(record: Mapping[str, Any]) -> dict[str, MetricSums]:
    """:func:`evaluation_sums` back from a metric record made by :func:`sums_to_record`.

    Raises:
        ValueError, KeyError: see :meth:`fedldt.metrics.MetricSums.from_dict`.
    """
    return {name: MetricSums.from_dict(record, f"{name}.") for name in ("model", *REFERENCES)}


def no_valid_target(sums: MetricSums) -> bool:
    """Whether every target behind ``sums`` was masked (its metrics are ``None``)."""
    return int(np.sum(sums.num_valid)) == 0


def flat_metrics(block: Mapping[str, Mapping[str, float | None]], prefix: str) -> dict[str, float | None]:
    """``{"mae": {"h3": x}}`` -> ``{"<prefix>mae_h3": x}`` (history.csv columns, metric records)."""
    return {f"{prefix}{metric}_{step}": v for metric, steps in block.items() for step, v in steps.items()}


def history_row(rnd: int, territory: str, steps: Sequence[int], *, train: tuple[float, int] | None = None,
                val: MetricSums | None = None, train_status: str = "ok", eval_status: str = "ok",
                train_error: str = "", eval_error: str = "") -> dict[str, Any]:
    """One ``history.csv`` row (one round of one territory), the same columns in every mode:
    ``round, territory, train_loss, num_train, val_<metric>_<step>..., train_status,
    eval_status, error``.

    Args:
        train: ``(train loss, training windows)``; ``None`` when the territory did not train
            (empty cells).
        val: its validation sums; ``None`` when it did not evaluate (no ``val_`` columns).
            Sums without a valid target make ``eval_status`` :data:`NOT_AVAILABLE`.
        train_status, eval_status: ``ok``, ``failed`` or ``not sampled``.
        train_error, eval_error: the reason of a failure (joined into ``error``).
    """
    loss, num_train = train if train is not None else (None, None)
    row: dict[str, Any] = {"round": int(rnd), "territory": territory, "train_loss": loss, "num_train": num_train}
    if val is not None:
        row.update(flat_metrics(report(val, steps), "val_"))
        if no_valid_target(val):
            eval_status, eval_error = NOT_AVAILABLE, NO_VALID_TARGET
    row.update(train_status=train_status, eval_status=eval_status,
               error="; ".join(f"{p}: {e}" for p, e in (("train", train_error), ("evaluate", eval_error)) if e))
    return row


def round_row(rnd: int, train: Iterable[tuple[float, int]], val: Mapping[str, MetricSums],
              steps: Sequence[int]) -> dict[str, Any]:
    """One round of ``summary.json``'s ``history``: ``train_loss`` (the windows-weighted mean of
    the territories' ``(loss, training windows)``, :func:`fedldt.metrics.windows_weighted_mean`),
    ``val`` (validation metrics pooled exactly over ``val``, territory id -> sums; ``None`` where
    no territory has a valid target) and ``val_not_available`` (the territories without one).

    Raises:
        ValueError: ``val`` is empty.
    """
    return {"round": int(rnd), "train_loss": windows_weighted_mean(train), "val": report(pool(val.values()), steps),
            "val_not_available": [tid for tid, s in val.items() if no_valid_target(s)]}


def build_summary(cfg: dict[str, Any], mode: str, territories: list[dict[str, Any]],
                  test: dict[str, dict[str, MetricSums]], history: list[dict[str, Any]],
                  failures: list[dict[str, Any]], model_cfg: dict[str, Any], wall_time_s: float) -> dict[str, Any]:
    """The ``summary.json`` content, identical in schema for every training mode.

    Args:
        cfg: resolved config.
        mode: ``"federated"``, ``"centralized"`` or ``"local"``.
        territories: ``[{"id", "num_nodes", "num_train_windows", ...}]`` in territory order.
        test: territory id -> ``{"model": sums, <reference>: sums, ...}`` (:func:`evaluation_sums`);
            each of :data:`REFERENCES` gives ``<reference>`` (pooled) and ``<reference>_per_territory``.
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
        "test_not_available": [tid for tid, t in test.items() if no_valid_target(t["model"])],
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


# ---------------------------------------------------------------------------------------------
# The one metric-table renderer of every report: the closing table of scripts/simulate.py and
# federation_local.py, comparison.md, models_strategies.md and MODEL_CARD.md.

def fmt_metric(value: float | None, digits: int = 3, percent: bool = False) -> str:
    """A metric cell: ``n/a`` for ``None`` (no valid target), else ``digits`` decimals, or with
    ``percent`` a fraction as a percentage with 2 decimals (``0.0625`` -> ``6.25%``)."""
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if percent else f"{value:.{digits}f}"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> list[str]:
    """The lines of a GitHub-flavoured Markdown table (readable as plain text too).

    Args:
        head: column titles.
        rows: cells, as strings, one sequence per row (each as long as ``head``); an empty
            cell is written ``| |``.
        right: indices of right-aligned columns (``---:``).

    Raises:
        ValueError: a row has another number of cells than ``head``.
    """
    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    lines = [line(head), "|" + "".join("---:|" if i in right else "---|" for i in range(len(head)))]
    for row in rows:
        if len(row) != len(head):
            raise ValueError(f"table row {list(row)} has {len(row)} cells for {len(head)} columns")
        lines.append(line(row))
    return lines


def metric_rows(blocks: Mapping[str, Mapping[str, Mapping[str, float | None]]], steps: Sequence[str],
                metrics: Sequence[str] = ("mae", "rmse", "mape"), digits: int = 4) -> list[list[str]]:
    """Rows ``<METRIC> <label>`` then one cell per step, for each metric and each labelled
    ``summary.json`` metric block (``{"mae": {"h3": ..}, ..}``), metric by metric."""
    return [[f"{metric.upper()} {label}"] + [fmt_metric(block[metric][s], digits) for s in steps]
            for metric in metrics for label, block in blocks.items()]


def summary_table(summary: dict[str, Any]) -> str:
    """The closing table of a run: test MAE/RMSE/MAPE of the model and of each reference
    (:data:`REFERENCES` present in ``summary``; ``n/a`` where one is not defined), pooled, then the
    model's MAE per territory (Markdown, :func:`markdown_table`)."""
    steps = list(summary["test"]["mae"])
    rounds = summary["rounds"]
    blocks = {"model": summary["test"],
              **{REFERENCE_LABELS[ref]: summary[ref] for ref in REFERENCES if ref in summary}}
    lines = [f"test metrics of pilot '{summary['pilot']}' ({summary['mode']}, {rounds} round{'' if rounds == 1 else 's'})", ""]
    lines += markdown_table(["metric", *steps], metric_rows(blocks, steps), right=range(1, len(steps) + 1))
    lines += ["", "per territory (model MAE):", ""]
    lines += markdown_table(["territory", *steps],
                            [[tid] + [fmt_metric(block["mae"][s], 4) for s in steps]
                             for tid, block in summary["test_per_territory"].items()], right=range(1, len(steps) + 1))
    return "\n".join(lines)


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
