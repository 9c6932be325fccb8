"""Model cards: what a packaged model was trained on, how, and how well it did.

The card is built from the run's ``summary.json`` and ``resolved_config.yaml``, the territory's
rebuilt data, and the dataset provenance quoted from the shared data README
(``conf/provenance/<dataset>.yaml``). Limits are derived from the data and the metrics (the
training period, whether the training data had gaps, where the model does not beat persistence),
not written by hand per dataset. ``model_card.json`` is for machines (``GET /model``),
``MODEL_CARD.md`` for people.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

import yaml

from fedldt.config import CONF_DIR
from fedldt.results import markdown_table, metric_rows

CARD_FORMAT = "fedldt-model-card/1"
PROVENANCE_DIR = CONF_DIR / "provenance"
MODEL_PAPERS = {"dcrnn": "DCRNN-style diffusion-convolution GRU encoder; Li, Yu, Shahabi, Liu, ICLR 2018"}


def git_blob_id(path: Path) -> str:
    """The git blob id of a file (``git hash-object``): sha1 of ``"blob <size>\\0" + bytes``."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


def dataset_provenance(name: str, data_path: str | Path) -> dict[str, Any]:
    """Provenance of dataset ``name`` (``conf/provenance/<name>.yaml``), each source file
    checked against its git blob id in ``data_path``.

    Returns:
        The provenance dict with ``sources[i]["check"]`` set to ``"matches"``, ``"differs"``
        or ``"file not found"``; or ``{"name": name, "recorded": False}`` when no provenance
        file exists for the dataset.
    """
    f = PROVENANCE_DIR / f"{name}.yaml"
    if not f.is_file():
        return {"name": name, "recorded": False,
                "note": f"no provenance recorded for dataset '{name}' (add {f.relative_to(CONF_DIR.parent)})"}
    prov = yaml.safe_load(f.read_text())
    for src in prov.get("sources", []):
        local = Path(data_path) / src["file"]
        if not local.is_file():
            src["check"] = "file not found"
        else:
            src["check"] = "matches" if git_blob_id(local) == src["git_blob"] else "differs"
    return {"recorded": True, **prov}


def _beats(model: Mapping[str, Mapping[str, float | None]], base: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    """Metric/step pairs where the model is not better (lower) than the baseline."""
    worse = []
    for metric, block in model.items():
        for step, v in block.items():
            b = base.get(metric, {}).get(step)
            if v is not None and b is not None and v >= b:
                worse.append(f"{metric.upper()} {step} ({v:.4g} vs {b:.4g})")
    return worse


def build_card(
    *,
    summary: Mapping[str, Any],
    cfg: Mapping[str, Any],
    territory: str,
    num_nodes: int,
    num_edges: int,
    graph_hash: str,
    task_facts: Mapping[str, Any],
    split_periods: Mapping[str, Mapping[str, Any]],
    train_complete: bool,
    provenance: Mapping[str, Any],
    model_config: Mapping[str, Any],
    num_parameters: int,
    reproduced: Mapping[str, Any],
    onnx_info: Mapping[str, Any] | None,
    run_finished: str,
    created: str,
    fedldt_version: str,
) -> dict[str, Any]:
    """The model card of one territory's packaged model (the content of ``model_card.json``).

    Args:
        summary: the run's ``summary.json``.
        cfg: the run's resolved config.
        territory: territory id; num_nodes, num_edges, graph_hash: its graph.
        task_facts: ``window``, ``horizon``, ``interval_s``, ``channels``, ``units``, ``timezone``,
            ``time_of_day``, ``day_of_week`` (as in ``package.json``).
        split_periods: split -> ``num_windows``, ``first_target``, ``last_target``
            (:meth:`fedldt.engine.TerritoryTask.split_info`).
        train_complete: the territory's training part had no missing value.
        provenance: see :func:`dataset_provenance`.
        model_config: the model's config; num_parameters: its parameter count.
        reproduced: the test MAE re-computed at export vs the reported one.
        onnx_info: ONNX export facts (opset, parity error) or ``None``.
        run_finished: time the run wrote its model; created: export time; both ISO 8601.
        fedldt_version: version of the exporting fedldt.
    """
    task, tr = task_facts, cfg["train"]
    interval_min = task["interval_s"] / 60
    unit, channel = task["units"][0], task["channels"][0]
    steps = list(cfg["task"]["report_steps"])
    mine = summary["test_per_territory"][territory]
    mine_pers = summary["persistence_per_territory"][territory]
    train, test = split_periods["train"], split_periods["test"]
    limitations = [
        f"Trained on {train['first_target']} .. {train['last_target']} only (the training part of the "
        f"{cfg['dataset']['name']} series); behaviour in other seasons, on holidays, during incidents or after "
        "changes of the road network or sensors is unknown.",
        f"Test metrics come from {test['num_windows']} windows with targets {test['first_target']} .. "
        f"{test['last_target']}; other days and conditions were not tested.",
        f"Needs all {num_nodes} sensors of territory {territory}, {task['window']} most recent steps "
        f"{interval_min:g} min apart; a new, moved or removed sensor needs a new run and export "
        "(the graph hash changes).",
    ]
    strategy = cfg["strategy"]["name"] if summary["mode"] == "federated" else None  # no strategy outside federation
    limitations.append(
        f"A global {summary['mode']} model ({f'{strategy} ' if strategy else ''}over {len(summary['territories'])} "
        "territories), not personalized to this territory.")
    if train_complete:
        limitations.append("The training data had no missing value; forecasts from inputs with missing values "
                           "(allow_missing) are outside the training conditions.")
    worse = _beats(mine, mine_pers)
    if worse:
        limitations.append("On this territory's test data the model is not better than persistence (last value) "
                           f"for: {', '.join(worse)}.")
    if task.get("timezone") is None:
        limitations.append("Timestamps are naive local times of the data; the time zone was not recorded at export, "
                           "so inputs must be local times without UTC offset.")
    return {
        "card_format": CARD_FORMAT,
        "title": f"{model_config['name'].upper()} forecaster of territory {territory}, pilot {summary['pilot']}",
        "created": created,
        "fedldt_version": fedldt_version,
        "pilot": summary["pilot"],
        "territory": {"id": territory, "num_nodes": num_nodes, "num_edges": num_edges, "graph_hash": graph_hash,
                      "sensors_file": "nodes.csv", "edges_file": "edges.csv"},
        "model": {"name": model_config["name"], "description": MODEL_PAPERS.get(model_config["name"], ""),
                  "config": dict(model_config), "num_parameters": num_parameters,
                  "weights": "global", "onnx": onnx_info},
        "task": {
            "inputs": f"the {task['window']} most recent {channel} observations ({unit}) of every sensor, "
                      f"{interval_min:g} min apart",
            "outputs": f"{channel} ({unit}) of every sensor for the next {task['horizon']} steps "
                       f"({interval_min:g} .. {interval_min * task['horizon']:g} min ahead)",
            **{k: task[k] for k in ("window", "horizon", "interval_s", "channels", "units", "timezone",
                                    "time_of_day", "day_of_week")},
            "scaling": "z-score per node" if cfg["task"]["scaler_per_node"] else "z-score per channel",
            "scaler_fitted_on": "this territory's training part only (scaler.json)",
        },
        "training": {
            "mode": summary["mode"],
            "strategy": strategy,
            "rounds": summary["rounds"],
            "local_epochs": tr["local_epochs"], "lr": tr["lr"], "batch_size": tr["batch_size"],
            "seed": summary["seed"],
            "territories": summary["territories"],
            "split": cfg["task"]["split"],
            "this_territory_periods": dict(split_periods),
            "run_finished": run_finished,
            "fedldt_version": summary.get("fedldt_version"),
            "wall_time_s": summary.get("wall_time_s"),
        },
        "data": {"dataset": cfg["dataset"]["name"], "provenance": dict(provenance)},
        "evaluation": {
            "split": "test",
            "units": f"MAE/RMSE in {unit}, MAPE as a fraction; h<k> = k-th forecast step, all = every step pooled",
            "report_steps": steps,
            "this_territory": {"model": mine, "persistence": mine_pers},
            "all_territories": {"model": summary["test"], "persistence": summary["persistence"]},
            "reproduced_at_export": dict(reproduced),
        },
        "intended_use": (
            f"Short-term forecasts of {channel} at the {num_nodes} sensors of territory {territory} "
            f"(pilot {summary['pilot']}) for operations dashboards and digital-twin platforms: decision support, "
            "compared against the persistence forecast. Not for safety-critical control, enforcement or decisions "
            "about individuals."),
        "limitations": limitations,
    }


def _metric_table(model: Mapping, base: Mapping) -> list[str]:
    steps = list(model["mae"])
    return markdown_table(["metric", *steps], metric_rows({"model": model, "persistence": base}, steps))


def render_markdown(card: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: the card for people."""
    t, m, tr, ev, data = card["territory"], card["model"], card["training"], card["evaluation"], card["data"]
    prov = data["provenance"]
    out = [
        f"# {card['title']}", "",
        f"Created {card['created']} by fedldt {card['fedldt_version']}. Graph hash `{t['graph_hash']}`.", "",
        "## Intended use", "", card["intended_use"], "",
        "## Inputs and outputs", "",
        f"- Inputs: {card['task']['inputs']}; time zone: {card['task']['timezone'] or 'not recorded (naive local times)'}.",
        f"- Outputs: {card['task']['outputs']}.",
        f"- Sensors (node order): `{t['sensors_file']}` ({t['num_nodes']} sensors, {t['num_edges']} edges in `{t['edges_file']}`).",
        f"- Scaling: {card['task']['scaling']}, fitted on {card['task']['scaler_fitted_on']}.", "",
        "## Model", "",
        f"- {m['description'] or m['name']}; {m['num_parameters']} parameters; weights: {m['weights']}.",
        f"- Config: `{m['config']}`.",
    ]
    if m["onnx"]:
        o = m["onnx"]
        out.append(f"- ONNX (`model.onnx`, opset {o['opset']}, dense graph matrices for this graph): max |ONNX Runtime "
                   f"- PyTorch| = {o['parity_max_abs_err']:.2e} {card['task']['units'][0]} on {o['parity_windows']} test windows.")
    strategy = f" ({tr['strategy']})" if tr["strategy"] else ""
    out += [
        "", "## Training", "",
        f"- Pilot `{card['pilot']}`, {tr['mode']}{strategy}, {tr['rounds']} rounds of {tr['local_epochs']} local "
        f"epoch(s), lr {tr['lr']}, batch {tr['batch_size']}, seed {tr['seed']}; run finished {tr['run_finished']} "
        f"(fedldt {tr['fedldt_version']}).",
        "- Territories that took part: " + ", ".join(f"{x['id']} ({x['num_nodes']} sensors)" for x in tr["territories"]) + ".",
        f"- Chronological split {tr['split']} (train/val/test) of each territory's series:",
    ]
    for split, p in tr["this_territory_periods"].items():
        out.append(f"  - {split}: {p['num_windows']} windows, targets {p['first_target']} .. {p['last_target']}")
    out += ["", "## Data", ""]
    if prov.get("recorded"):
        out += [f"**{prov['title']}** (quoted from {prov['data_readme']}).", "", prov["measures"], "",
                f"- Units: {prov['units']}; interval: {prov['interval']}; period: {prov['period']}.", "- Sources:"]
        for s in prov["sources"]:
            out.append(f"  - `{s['file']}`: `{s['repository']}` commit `{s['commit']}`, `{s['path']}` (git blob "
                       f"`{s['git_blob']}`; local copy {s['check']})")
        out += [f"- License: {prov['license']}", "- Cite: " + "; ".join(prov["citations"]), "- Checked facts:"]
        out += [f"  - {f}" for f in prov.get("checked_facts", [])]
    else:
        out.append(prov.get("note", "No provenance recorded."))
    r = ev["reproduced_at_export"]
    out += [
        "", "## Evaluation (test split)", "", f"{ev['units']}.", "", f"### Territory {t['id']}", "",
        *_metric_table(ev["this_territory"]["model"], ev["this_territory"]["persistence"]), "",
        "### All territories pooled", "",
        *_metric_table(ev["all_territories"]["model"], ev["all_territories"]["persistence"]), "",
        f"Re-computed at export on this territory's test windows: MAE all = {r['mae_all']:.6f} "
        f"(reported {r['reported_mae_all']:.6f}).", "",
        "## Limitations", "", *[f"- {x}" for x in card["limitations"]], "",
    ]
    return "\n".join(out)
