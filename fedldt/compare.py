"""Honest comparison of training modes on identical territory splits.

Runs ``federated``, ``centralized`` and ``local`` with one seed, takes the persistence and
historical-average forecasts on the same test windows, and writes ``comparison.json``,
``comparison.md`` and PNG plots (validation MAE per round; forecast vs. truth over a test day).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from fedldt.baselines import MODES, build_tasks  # noqa: E402
from fedldt.launch.progress import run_slot  # noqa: E402
from fedldt.models import build_model  # noqa: E402
from fedldt.results import check_publish_dir, fmt_metric, markdown_table, publish  # noqa: E402
from fedldt.runner import run_mode  # noqa: E402

#: The files a comparison writes (and publishes).
ARTIFACTS = ("comparison.json", "comparison.md", "validation_mae_per_round.png", "forecast_vs_truth.png")

METHODS = (*MODES, "persistence", "historical_average")
#: Relative MAE change (federated vs. local) below which a territory is not said to gain or lose.
GAIN_THRESHOLD = 0.01


def comparison_json(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{method: {"test": ..., "test_per_territory": ...}}`` in the ``summary.json`` schema.

    The reference forecasts come from the federated summary; they are evaluated on the same
    test windows in every mode (asserted here).

    Raises:
        ValueError: the modes' territories or test windows differ.
    """
    ref = summaries["federated"]
    for mode, s in summaries.items():
        if s["territories"] != ref["territories"]:
            raise ValueError(f"mode {mode} used other territories/windows than federated: {s['territories']}")
        for r in ("persistence", "historical_average"):
            if s[r] != ref[r]:
                raise ValueError(f"mode {mode} scored {r} on other test windows than federated")
    out = {m: {"test": summaries[m]["test"], "test_per_territory": summaries[m]["test_per_territory"]} for m in MODES}
    for r in ("persistence", "historical_average"):
        out[r] = {"test": ref[r], "test_per_territory": ref[f"{r}_per_territory"]}
    return out


def comparison_markdown(cmp: dict[str, Any], summaries: dict[str, dict[str, Any]], pilot: str) -> str:
    """The ``comparison.md`` tables: pooled metrics per method and horizon, per-territory MAE and
    WAPE, and what each territory gains from federation against training alone."""
    steps = [k for k in cmp["federated"]["test"]["mae"]]
    fed = summaries["federated"]
    terr = [t["id"] for t in fed["territories"]]
    lines = [f"# Comparison of training modes: `{pilot}`", ""]
    lines.append(f"Seed {fed['seed']}, {fed['rounds']} rounds x {fed['local_epochs']} local epochs "
                 f"(centralized and local: the same number of epochs). Territories: "
                 + ", ".join(f"{t['id']} ({t['num_nodes']} nodes, {t['num_test_windows']} test windows)" for t in fed["territories"]) + ".")
    lines.append("Metrics are masked and pooled exactly over all territories' test windows, in data units; "
                 "MAPE and WAPE are percentages.")
    lines += ["", "## Pooled test metrics", ""]
    lines += markdown_table(
        ["method"] + [f"{m.upper()} {s}" for m in ("mae", "rmse", "mape") for s in steps],
        [[method] + [fmt_metric(cmp[method]["test"][m][s], percent=(m == "mape")) for m in ("mae", "rmse", "mape")
                     for s in steps] for method in METHODS])
    lines += ["", "## Per-territory test MAE (all horizon steps) and WAPE", ""]
    lines += markdown_table(
        ["method"] + [f"MAE {t}" for t in terr] + [f"WAPE {t}" for t in terr],
        [[method] + [fmt_metric(per[t]["mae"]["all"]) for t in terr] + [fmt_metric(per[t]["wape"]["all"], percent=True)
                                                                      for t in terr]
         for method, per in ((m, cmp[m]["test_per_territory"]) for m in METHODS)])
    lines += ["", "## Does each territory gain from federation?", ""]
    gains = []
    for t in terr:
        f, l, c = (cmp[m]["test_per_territory"][t]["mae"]["all"] for m in ("federated", "local", "centralized"))
        if f is None or l is None or l == 0:  # no valid test target: not available
            gains.append([t, fmt_metric(f), fmt_metric(l), "n/a", fmt_metric(c)])
            continue
        change = (f - l) / l
        verdict = "gains" if change < -GAIN_THRESHOLD else "loses" if change > GAIN_THRESHOLD else "no clear difference"
        gains.append([t, fmt_metric(f), fmt_metric(l), f"{100 * change:+.1f}% ({verdict})", fmt_metric(c)])
    lines += markdown_table(["territory", "federated MAE", "local MAE", "change vs local", "centralized MAE"], gains)
    lines += ["", f"A territory gains (loses) when its federated test MAE is more than {100 * GAIN_THRESHOLD:.0f} % "
              "below (above) its local-only MAE; one seed, so smaller differences are not read as a gain."]
    lines += ["", "Wall time (s): " + ", ".join(f"{m} {summaries[m]['wall_time_s']:.0f}" for m in MODES), ""]
    return "\n".join(lines)


def plot_validation(run_dirs: dict[str, Path], out: Path) -> Path:
    """Validation MAE (all steps) per round: one panel per territory, one line per mode."""
    hist = {m: pd.read_csv(d / "history.csv") for m, d in run_dirs.items()}
    terr = list(dict.fromkeys(hist["federated"]["territory"]))
    fig, axes = plt.subplots(1, len(terr), figsize=(4.2 * len(terr), 3.4), sharey=False, squeeze=False)
    for ax, t in zip(axes[0], terr):
        for m, h in hist.items():
            rows = h[h["territory"] == t]
            ax.plot(rows["round"], rows["val_mae_all"], marker="o", ms=3, label=m)
        ax.set_title(f"territory {t}")
        ax.set_xlabel("round")
        ax.set_ylabel("validation MAE")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    path = out / ARTIFACTS[2]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def _forecast_series(task, model, step: int) -> tuple[pd.DatetimeIndex, np.ndarray, np.ndarray]:
    """Forecasts ``step`` steps ahead over the test split: target times, truth, forecast ``[time, node]``."""
    preds, truth = [], []
    for batch in task.loader("test"):
        preds.append(task.predict(model, batch)[:, step - 1, :, 0])
        truth.append(batch.y[:, step - 1, :, 0])
    starts = task.windows["test"].starts
    times = task.dataset.timestamps[starts + task.window + step - 1]
    return times, torch.cat(truth).numpy(), torch.cat(preds).numpy()


def plot_forecasts(cfg: dict[str, Any], run_dirs: dict[str, Path], out: Path, sensors_per_territory: int = 3) -> Path:
    """Forecast vs. truth over the last test day for a few sensors of each territory (all modes)."""
    tasks = build_tasks(cfg)
    step = int(cfg["task"]["report_steps"][0])
    ckpts = {m: torch.load(d / "model.pt", map_location="cpu", weights_only=True) for m, d in run_dirs.items()}  # tensors only: no pickled code
    fig, axes = plt.subplots(len(tasks), sensors_per_territory, figsize=(4.2 * sensors_per_territory, 2.8 * len(tasks)),
                             squeeze=False)
    for r, task in enumerate(tasks):
        per_day = int(pd.Timedelta(days=1) / task.dataset.freq)
        valid = task.dataset.mask[:, :, 0].mean(0) > 0.99
        nodes = [int(i) for i in np.flatnonzero(valid)[:sensors_per_territory]]
        for c, node in enumerate(nodes):
            ax = axes[r][c]
            for i, (m, ck) in enumerate(ckpts.items()):
                model = build_model(ck["model_config"], num_nodes=task.dataset.num_nodes)
                model.load_state_dict(ck["state_dicts"][task.dataset.name] if "state_dicts" in ck else ck["state_dict"])
                times, y, y_hat = _forecast_series(task, model, step)
                if i == 0:
                    ax.plot(times[-per_day:], y[-per_day:, node], color="black", lw=1.5, label="truth")
                ax.plot(times[-per_day:], y_hat[-per_day:, node], lw=1, label=m)
            ax.set_title(f"{task.dataset.name} sensor {task.dataset.node_ids[node]} (+{step} steps)", fontsize=9)
            ax.tick_params(axis="x", labelrotation=30, labelsize=7)
            ax.set_ylabel(task.dataset.units[0])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = out / ARTIFACTS[3]
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_comparison(cfg: dict[str, Any], overrides: Sequence[str], out_dir: str | Path,
                   publish_dir: str | Path | None = None) -> dict[str, Any]:
    """Run the three modes into ``out_dir/<mode>/`` and write the comparison artifacts.

    Args:
        cfg: resolved config (its ``seed`` is used by every mode).
        overrides: Hydra overrides that made ``cfg`` (for the federated run).
        out_dir: folder for the runs and the artifacts.
        publish_dir: if set, the artifacts (not the runs) are also copied there (see
            :func:`fedldt.results.publish`: nothing fedldt did not publish there is replaced).

    Returns:
        The ``comparison.json`` content.
    """
    out = Path(out_dir).resolve()
    if publish_dir:  # before hours of training, not after
        check_publish_dir(publish_dir, ARTIFACTS)
    out.mkdir(parents=True, exist_ok=True)
    run_dirs = {m: out / m for m in MODES}
    summaries = {}
    for k, m in enumerate(MODES, 1):
        print(f"[fedldt] === mode {m} ===", flush=True)
        with run_slot(k, len(MODES), m):
            summaries[m] = run_mode(cfg, overrides, run_dirs[m], mode=m)
    cmp = comparison_json(summaries)
    artifacts = [out / ARTIFACTS[0], out / ARTIFACTS[1]]
    artifacts[0].write_text(json.dumps(cmp, indent=2, allow_nan=False) + "\n")
    artifacts[1].write_text(comparison_markdown(cmp, summaries, cfg["name"]))
    artifacts.append(plot_validation(run_dirs, out))
    artifacts.append(plot_forecasts(cfg, run_dirs, out))
    if publish_dir:
        publish(artifacts, publish_dir)
    return cmp
