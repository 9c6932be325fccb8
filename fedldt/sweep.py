"""Sweep of models x federated strategies (x personalization) on one pilot, with one seed.

Each combination is a real federated run on Flower's simulation engine (``run_mode``), in its
own folder. The results go to ``models_strategies.json``: a list of objects with ``model``,
``strategy``, ``personalization``, ``test`` (pooled test metrics in the ``summary.json``
schema), ``test_per_territory``, ``persistence`` (the same test windows), ``wall_time_s`` and
``command`` (the ``scripts/simulate.py`` command that reproduces the row), and to
``models_strategies.md`` (a table of pooled test MAE at the report steps and wall time).
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

from fedldt.config import composable_overrides, compose_config, resolve_config
from fedldt.results import check_publish_dir, fmt_metric, markdown_table, publish
from fedldt.launch.progress import run_slot
from fedldt.runner import run_mode

ARTIFACTS = ("models_strategies.json", "models_strategies.md")


def sweep_combinations(sweep_cfg: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(model, strategy, personalization)`` triples of a ``sweep`` config block, in order.

    Raises:
        ValueError: empty lists, or an entry of ``sweep.strategies`` without ``strategy``.
    """
    models = list(sweep_cfg.get("models") or [])
    entries = list(sweep_cfg.get("strategies") or [])
    if not models or not entries:
        raise ValueError("sweep.models and sweep.strategies must be non-empty lists (see conf/config.yaml)")
    combos = []
    for m in models:
        for e in entries:
            if not isinstance(e, dict) or "strategy" not in e:
                raise ValueError(f"sweep.strategies entry {e!r} must be {{strategy: <name>, personalization: <name>}}")
            combos.append((str(m), str(e["strategy"]), str(e.get("personalization", "none"))))
    return combos


def _label(model: str, strategy: str, personalization: str) -> str:
    return f"{model}-{strategy}" + ("" if personalization == "none" else f"-{personalization}")


def base_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides every run of the sweep shares (the sweep sets ``model=``, ``strategy=``,
    ``personalization=`` and ``mode=`` itself; ``hydra.*`` and ``sweep.*`` are the sweep's own, but for
    ``hydra.searchpath``, the user's config folders).

    Raises:
        ValueError: an override of a key inside ``model.``, ``strategy.`` or ``personalization.``:
            it would apply to every model or strategy of the sweep, and most do not have it.
    """
    inner = [o for o in overrides if o.lstrip("+~").startswith(("model.", "strategy.", "personalization."))]
    if inner:
        raise ValueError(f"sweep: overrides {inner} would apply to every model and strategy of the sweep; set such "
                         "options in conf/model/*.yaml or conf/strategy/*.yaml, or run scripts/simulate.py per combination")
    skip = ("model=", "strategy=", "personalization=", "mode=", "sweep.")
    return [o for o in composable_overrides(overrides) if not o.startswith(skip)]  # hydra.searchpath stays


def run_sweep(cfg: dict[str, Any], overrides: Sequence[str], out_dir: str | Path,
              publish_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Run every combination of ``cfg["sweep"]`` and write the artifacts after each run.

    Args:
        cfg: resolved config (pilot, seed and everything else shared by the runs).
        overrides: the Hydra overrides that made ``cfg``; each run adds ``model=``,
            ``strategy=`` and ``personalization=`` to them.
        out_dir: folder for the runs (``<model>-<strategy>[-<personalization>]/``) and artifacts.
        publish_dir: if set, the artifacts are also copied there after each run (see
            :func:`fedldt.results.publish`: nothing fedldt did not publish there is replaced).

    Returns:
        The ``models_strategies.json`` rows.

    Raises:
        ValueError: see :func:`base_overrides` and :func:`sweep_combinations`; a combination
            whose config is invalid (e.g. ``personalization=fedbn`` with ``dcrnn``), before any run.
        fedldt.launch.simulation.RunFailed: a run failed (the rows so far are written).
    """
    out = Path(out_dir).resolve()
    if publish_dir:  # before the first run, not after
        check_publish_dir(publish_dir, ARTIFACTS)
    out.mkdir(parents=True, exist_ok=True)
    base = base_overrides(overrides)
    combos = sweep_combinations(cfg["sweep"])
    for model, strategy, pers in combos:  # fail before the first run, not in the middle of the sweep
        resolve_config(compose_config(base + [f"model={model}", f"strategy={strategy}", f"personalization={pers}"]),
                       require_data=False)
    rows: list[dict[str, Any]] = []
    for model, strategy, pers in combos:
        run_ov = base + [f"model={model}", f"strategy={strategy}", f"personalization={pers}"]
        label = _label(model, strategy, pers)
        print(f"[fedldt] === sweep {len(rows) + 1}: {label} ===", flush=True)
        t0 = time.time()
        with run_slot(len(rows) + 1, len(combos), label):
            summary = run_mode(cfg, run_ov, out / label, mode="federated")
        rows.append({
            "model": model, "strategy": strategy, "personalization": pers,
            "test": summary["test"], "test_per_territory": summary["test_per_territory"],
            "persistence": summary["persistence"], "rounds": summary["rounds"], "seed": summary["seed"],
            "wall_time_s": round(time.time() - t0, 1),
            "command": "python scripts/simulate.py " + " ".join(shlex.quote(o) for o in run_ov),
        })
        write_artifacts(rows, cfg, out, publish_dir)
    return rows


def sweep_markdown(rows: list[dict[str, Any]], cfg: dict[str, Any]) -> str:
    """The results table: pooled test MAE at the report steps, wall time, best row marked."""
    steps = [f"h{h}" for h in cfg["task"]["report_steps"]]
    best = min(rows, key=lambda r: r["test"]["mae"]["all"]) if rows else None
    lines = [
        f"# Models x strategies on `{cfg['name']}`",
        "",
        f"Pooled test MAE (dataset units; Los-loop: mph) over all territories of `{cfg['dataset']['name']}`, "
        f"{cfg['train']['rounds']} rounds, seed {cfg['seed']}; one federated run per row "
        "(Flower simulation engine). Wall time: the whole run, simulation start-up included.",
        "",
    ]
    cells = [[r["model"] + (" **(best)**" if r is best else ""), r["strategy"], r["personalization"]]
             + [fmt_metric(r["test"]["mae"][s]) for s in [*steps, "all"]] + [f"{r['wall_time_s']:.0f}"] for r in rows]
    if rows:
        p = rows[0]["persistence"]["mae"]
        cells.append(["persistence (last value)", "", "", *(fmt_metric(p[s]) for s in [*steps, "all"]), ""])
    lines += markdown_table(["model", "strategy", "personalization", *(f"MAE {s}" for s in steps), "MAE all", "wall time (s)"],
                            cells, right=range(3, len(steps) + 5))
    if rows:
        lines += ["", "Reproduce one row with its `command` in `models_strategies.json`; the whole table with",
                  f"`python scripts/sweep.py pilot={cfg['name']}`."]
    return "\n".join(lines) + "\n"


def write_artifacts(rows: list[dict[str, Any]], cfg: dict[str, Any], out: Path, publish_dir: str | Path | None) -> None:
    """Write ``models_strategies.{json,md}`` to ``out`` (and copy them to ``publish_dir``)."""
    (out / ARTIFACTS[0]).write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    (out / ARTIFACTS[1]).write_text(sweep_markdown(rows, cfg))
    if publish_dir:
        publish([out / a for a in ARTIFACTS], publish_dir)
