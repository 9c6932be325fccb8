"""Honest comparison of training methods on identical territory splits, over seeds.

Runs every method of ``compare.methods`` (:data:`fedldt.schema.COMPARE_METHODS`) once per seed of
``compare.seeds`` into ``<out>/seed<k>/<method>/``, takes the reference forecasts
(:data:`fedldt.results.REFERENCES`) on the same test windows, and writes ``comparison.json``,
``comparison.md`` and PNG plots (validation MAE per round and forecast vs. truth of the first seed;
test MAE by method and horizon per territory, with error bars over seeds). With
``compare.contribution`` it also runs one federated run per territory and seed without that
territory (``federation.holdout``) and reports who helps whom. ``docs/evaluation.md`` ("Comparisons
over seeds") documents every key of ``comparison.json``.

Everything but :func:`run_comparison` works on ``summary.json`` dicts only (no Flower, no training).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from fedldt.baselines import build_tasks  # noqa: E402
from fedldt.config import (composable_overrides, compose_config, load_territories, num_territories,  # noqa: E402
                           resolve_config)
from fedldt.launch.progress import run_slot  # noqa: E402
from fedldt.models import build_model  # noqa: E402
from fedldt.results import REFERENCES, check_publish_dir, fmt_metric, markdown_table, publish  # noqa: E402
from fedldt.runner import run_mode  # noqa: E402
from fedldt.schema import COMPARE_METHODS  # noqa: E402

#: The files a comparison writes (and publishes).
ARTIFACTS = ("comparison.json", "comparison.md", "validation_mae_per_round.png", "forecast_vs_truth.png",
             "mae_by_territory.png")

#: Federated methods -> the ``personalization`` their run uses; the other methods are modes.
PERSONALIZATION = {"federated": "none", "finetune": "finetune", "ditto": "ditto", "fedper": "fedper"}
#: Relative MAE change (method vs. local) below which a territory is not said to gain or lose when
#: there is only one seed (no spread to compare the change with).
GAIN_THRESHOLD = 0.01
#: Verdicts of :func:`paired_gain`.
GAINS, LOSES, NO_CLEAR, NOT_AVAILABLE = "gains", "loses", "no clear difference", "n/a"
#: Territory names usable in a ``federation.holdout=<name>`` override as they are.
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")


# --------------------------------------------------------------------------- planning the runs
def compare_seeds(cfg: Mapping[str, Any]) -> list[int]:
    """``compare.seeds``, or ``[seed]`` when it is null or absent."""
    seeds = (cfg.get("compare") or {}).get("seeds")
    return [int(s) for s in seeds] if seeds else [int(cfg["seed"])]


def compare_methods(cfg: Mapping[str, Any]) -> list[str]:
    """The methods to report: ``compare.methods`` (default federated, centralized, local) plus
    ``federated`` when ``compare.contribution`` needs it (the run with every territory).

    Raises:
        ValueError: an unknown method (names it and the allowed ones).
    """
    block = cfg.get("compare") or {}
    methods = [str(m) for m in block.get("methods") or ("federated", "centralized", "local")]
    bad = [m for m in methods if m not in COMPARE_METHODS]
    if bad:
        raise ValueError(f"compare.methods: {bad} unknown; allowed: {list(COMPARE_METHODS)}")
    if block.get("contribution") and "federated" not in methods:
        methods.append("federated")
    return methods


def runs_for(methods: Sequence[str]) -> list[str]:
    """The runs that give ``methods``: one per method, but ``federated`` comes from the
    ``finetune`` run's ``global_test*`` when both are asked (the same rounds, so the same global
    model: :func:`federated_from_finetune`)."""
    return [m for m in methods if not (m == "federated" and "finetune" in methods)]


#: Overrides :func:`base_overrides` drops: the comparison sets them per run.
_PER_RUN = ("mode=", "seed=", "personalization=", "compare.")


def base_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's overrides every run shares: all but ``mode=``, ``seed=``, ``personalization=``
    (set per run) and ``compare.*``; ``hydra.*`` only for ``hydra.searchpath``."""
    return [o for o in composable_overrides(overrides) if not o.lstrip("+~").startswith(_PER_RUN)]


def partition_pin(cfg: Mapping[str, Any]) -> list[str]:
    """``[partition.seed=<base value>]`` when the partition has a seed (k-means), else ``[]``.

    ``partition.seed`` defaults to ``${seed}``: without the pin, ``seed=<k>`` of each compared seed
    would also move the k-means clusters, so seeds would compare different territories. Pinned, the
    compared seeds vary model initialisation and batch order only, on the same territories."""
    part = cfg.get("partition") or {}
    return [f"partition.seed={int(part['seed'])}"] if part.get("seed") is not None else []


def run_overrides(base: Sequence[str], method: str, seed: int, holdout: str | None = None) -> list[str]:
    """The Hydra overrides of one run: ``base`` + ``seed=<seed>`` (+ ``personalization=<p>`` for a
    federated method, + ``federation.holdout=<holdout>`` for a leave-one-out run).

    Raises:
        ValueError: ``holdout`` is not a plain name (letters, digits, ``_.-``) usable in an override.
    """
    ov = [*base, f"seed={int(seed)}"]
    if method in PERSONALIZATION:
        ov.append(f"personalization={PERSONALIZATION[method]}")
    if holdout is not None:
        if not _PLAIN_NAME.match(holdout):
            raise ValueError(f"territory name {holdout!r} cannot be held out by an override; compare.contribution "
                             "needs territory names of letters, digits, '_', '.' or '-'")
        # quoted: Hydra reads a bare null/true/1/nan as None/bool/int/float (a territory named "null"
        # would silently be no hold-out at all)
        ov = [o for o in ov if not o.lstrip("+~").startswith("federation.holdout=")] + [f"federation.holdout='{holdout}'"]
    return ov


#: Config blocks a comparison's runs may differ in without being other runs (script-only blocks).
_NOT_COMPARED = ("compare", "sweep")


def finished_run(folder: Path, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``summary.json`` of a run finished in ``folder`` with the config ``expected`` (its
    ``resolved_config.yaml`` equal to it but for the script-only blocks), else ``None``: no
    summary (the run did not finish), another config, or files that do not parse (then the run is
    simply run again; nothing is deleted)."""
    summary, config = folder / "summary.json", folder / "resolved_config.yaml"
    if not (summary.is_file() and config.is_file()):
        return None
    try:
        written = yaml.safe_load(config.read_text())
        out = json.loads(summary.read_text(), parse_constant=_refuse_constant)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(written, dict) or not isinstance(out, dict):
        return None
    strip = lambda d: {k: v for k, v in d.items() if k not in _NOT_COMPARED}  # noqa: E731
    return out if strip(written) == strip(json.loads(json.dumps(dict(expected)))) else None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"summary.json holds {name}")


def federated_from_finetune(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The ``federated`` summary inside a ``finetune`` run: its final global model's test blocks
    (``global_test``, ``global_test_per_territory``) as ``test``/``test_per_territory``.

    Raises:
        ValueError: the summary has no ``global_test`` blocks.
    """
    if "global_test" not in summary or "global_test_per_territory" not in summary:
        raise ValueError("the finetune run's summary.json has no global_test/global_test_per_territory: it cannot "
                         "stand for the federated run; add a federated run (compare.methods) or fix the run")
    out = {k: v for k, v in summary.items() if k not in ("global_test", "global_test_per_territory", "personalization_result")}
    return {**out, "test": summary["global_test"], "test_per_territory": summary["global_test_per_territory"],
            "personalization": "none"}


# --------------------------------------------------------------------------- aggregation over seeds
def over_seeds(values: Sequence[Any], fn: Callable[[list[float]], float | None]) -> Any:
    """``fn`` applied leaf by leaf to nested metric blocks of several seeds (same keys): a leaf
    that is ``None`` in any seed is ``None``.

    Raises:
        ValueError: the seeds' blocks have other keys (other report steps or territories).
    """
    first = values[0]
    if isinstance(first, Mapping):
        for v in values[1:]:
            if not isinstance(v, Mapping) or set(v) != set(first):
                raise ValueError(f"the seeds' metric blocks differ in their keys: {sorted(first)} vs "
                                 f"{sorted(v) if isinstance(v, Mapping) else v!r}")
        return {k: over_seeds([v[k] for v in values], fn) for k in first}
    if any(v is None for v in values):
        return None
    return fn([float(v) for v in values])


def seed_mean(xs: list[float]) -> float:
    """Mean over seeds."""
    return float(np.mean(xs))


def seed_std(xs: list[float]) -> float | None:
    """Sample standard deviation over seeds (ddof=1); ``None`` for one seed."""
    return float(np.std(xs, ddof=1)) if len(xs) > 1 else None


def aggregate_entry(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One ``comparison.json`` entry from the ``{"test", "test_per_territory"}`` of each seed:
    those keys hold the mean over seeds, ``test_std``/``test_per_territory_std`` the sample
    standard deviation (``None`` leaves with one seed)."""
    out: dict[str, Any] = {}
    for key in ("test", "test_per_territory"):
        vals = [b[key] for b in blocks]
        out[key] = over_seeds(vals, seed_mean)
        out[f"{key}_std"] = over_seeds(vals, seed_std)
    return out


def _check_same_windows(summaries: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first summary, after checking every summary of one seed used the same territories and
    scored the references on the same test windows.

    Raises:
        ValueError: names the method and what differs.
    """
    names = list(summaries)
    ref = summaries[names[0]]
    for m, s in summaries.items():
        if s["territories"] != ref["territories"]:
            raise ValueError(f"method {m} used other territories/windows than {names[0]}: {s['territories']}")
        for r in REFERENCES:
            if r not in s or f"{r}_per_territory" not in s:
                raise ValueError(f"the summary of method {m} has no {r}/{r}_per_territory: made by an older fedldt; "
                                 "run it again")
            if s[r] != ref[r]:
                raise ValueError(f"method {m} scored {r} on other test windows than {names[0]}")
    return ref


def _mae_all(summary: Mapping[str, Any], territory: str, key: str = "test_per_territory") -> float | None:
    return summary[key][territory]["mae"]["all"]


def paired_gain(method_mae: Sequence[float | None], local_mae: Sequence[float | None]) -> dict[str, Any]:
    """Gain of a method against local training on one territory, paired over seeds.

    d_s = MAE_method,s - MAE_local,s (test MAE over all horizon steps, seed s). Several seeds:
    ``gains`` if mean(d) < -spread, ``loses`` if mean(d) > spread, else ``no clear difference``,
    where spread is the seed-to-seed spread: the largest of sd(d), sd(MAE_method) and sd(MAE_local)
    (sample standard deviations, ddof=1; the paired sd alone can be tiny when both move together,
    and a gain smaller than either method's own seed noise is not read as one). One seed: there
    is no spread, so the relative
    change mean(d)/mean(local) must pass :data:`GAIN_THRESHOLD` (1 %).

    Returns:
        ``{"mean_diff", "std_diff", "spread", "relative_change", "verdict", "basis"}``; ``n/a`` (values
        ``None``) where a seed has no valid target.

    Raises:
        ValueError: the sequences are empty or of different lengths.
    """
    n = len(method_mae)
    if n == 0 or len(local_mae) != n:
        raise ValueError(f"paired_gain needs one MAE per seed for both: {n} and {len(local_mae)}")
    basis = "one seed" if n == 1 else f"paired over {n} seeds"
    if any(v is None for v in (*method_mae, *local_mae)):
        return {"mean_diff": None, "std_diff": None, "spread": None, "relative_change": None, "verdict": NOT_AVAILABLE,
                "basis": basis}
    d = np.asarray(method_mae, dtype=float) - np.asarray(local_mae, dtype=float)
    mean, local = float(d.mean()), float(np.mean(local_mae))
    rel = mean / local if local else None
    if n == 1:
        sd = spread = None
        verdict = (NOT_AVAILABLE if rel is None else GAINS if rel < -GAIN_THRESHOLD
                   else LOSES if rel > GAIN_THRESHOLD else NO_CLEAR)
    else:
        sd = float(np.std(d, ddof=1))
        spread = max(sd, float(np.std(method_mae, ddof=1)), float(np.std(local_mae, ddof=1)))
        verdict = GAINS if mean < -spread else LOSES if mean > spread else NO_CLEAR
    return {"mean_diff": mean, "std_diff": sd, "spread": spread, "relative_change": rel,
            "verdict": verdict, "basis": basis}


def gains_vs_local(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], territories: Sequence[str]) -> dict[str, Any]:
    """``{method: {territory: paired_gain(...)}}`` for every method but ``local`` (empty without
    a local run)."""
    seeds = list(per_seed)
    methods = [m for m in per_seed[seeds[0]] if m != "local"]
    if "local" not in per_seed[seeds[0]]:
        return {}
    return {m: {t: paired_gain([_mae_all(per_seed[s][m], t) for s in seeds], [_mae_all(per_seed[s]["local"], t) for s in seeds])
                for t in territories} for m in methods}


def best_references(cmp: Mapping[str, Any], territories: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per territory the reference forecast (of :data:`REFERENCES`) with the lowest mean test MAE
    over all steps: ``{territory: {"reference", "mae"}}`` (``None`` where none has a value; a tie
    goes to the first in :data:`REFERENCES`)."""
    out = {}
    for t in territories:
        vals = [(r, cmp[r]["test_per_territory"][t]["mae"]["all"]) for r in REFERENCES]
        vals = [(r, v) for r, v in vals if v is not None]
        r, v = min(vals, key=lambda rv: rv[1]) if vals else (None, None)
        out[t] = {"reference": r, "mae": v}
    return out


def usefulness(cmp: Mapping[str, Any], methods: Sequence[str], best: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Whether each method is useful in each territory: its mean test MAE (all steps) lies below
    the best reference's by more than the method's seed-to-seed standard deviation (0 with one
    seed). ``{method: {territory: {"mae", "std", "best_reference", "best_reference_mae",
    "margin", "useful"}}}`` with ``margin`` = best reference MAE - method MAE (positive = better)
    and ``useful`` ``None`` where either MAE is missing."""
    out: dict[str, Any] = {}
    for m in methods:
        out[m] = {}
        for t, b in best.items():
            mae = cmp[m]["test_per_territory"][t]["mae"]["all"]
            std = cmp[m]["test_per_territory_std"][t]["mae"]["all"]
            ok = None if mae is None or b["mae"] is None else bool(mae < b["mae"] - (std or 0.0))
            out[m][t] = {"mae": mae, "std": std, "best_reference": b["reference"], "best_reference_mae": b["mae"],
                         "margin": None if ok is None else b["mae"] - mae, "useful": ok}
    return out


def aggregate_holdout(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``holdout`` blocks of one run label over seeds: ``territory``, ``finetune_history``,
    ``zero_shot``/``finetuned`` (mean; ``None`` when absent in any seed) with ``*_std``, and
    ``references`` ``{ref: mean block}``.

    Raises:
        ValueError: the seeds held out different territories.
    """
    names = {b["territory"] for b in blocks}
    if len(names) != 1:
        raise ValueError(f"the seeds held out different territories: {sorted(names)}")
    out: dict[str, Any] = {"territory": blocks[0]["territory"], "finetune_history": blocks[0].get("finetune_history")}
    for key in ("zero_shot", "finetuned"):
        vals = [b.get(key) for b in blocks]
        out[key] = over_seeds(vals, seed_mean)
        out[f"{key}_std"] = over_seeds(vals, seed_std)
    out["references"] = {r: over_seeds([b["references"][r] for b in blocks], seed_mean)
                         for r in blocks[0].get("references", {})}
    return out


def contribution_matrix(with_all: Mapping[int, Mapping[str, Any]],
                        without: Mapping[int, Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Who helps whom: ``{k: {j: {"mean", "std", "per_seed"}}}`` for each held-out territory k and
    every other territory j, of MAE_j(federation without k) - MAE_j(federation with all) (test
    MAE over all steps; positive = k's taking part lowers j's error). ``std`` is the sample
    standard deviation over seeds (``None`` with one seed); a value missing in any seed makes
    ``mean``/``std`` ``None``.

    Args:
        with_all: seed -> summary of the federated run with every territory.
        without: seed -> k -> summary of the run with ``federation.holdout=k``.

    Raises:
        ValueError: the seeds of ``with_all`` and ``without`` differ.
    """
    seeds = list(with_all)
    if set(seeds) != set(without):
        raise ValueError(f"contribution: seeds {sorted(with_all)} of the full runs vs {sorted(without)} "
                         "of the leave-one-out runs")
    out: dict[str, dict[str, Any]] = {}
    for k in without[seeds[0]]:
        out[k] = {}
        for j in with_all[seeds[0]]["test_per_territory"]:
            if j == k:
                continue
            diffs = []
            for s in seeds:
                a, b = without[s][k]["test_per_territory"].get(j, {}).get("mae", {}).get("all"), _mae_all(with_all[s], j)
                diffs.append(None if a is None or b is None else a - b)
            out[k][j] = {"mean": over_seeds(diffs, seed_mean), "std": over_seeds(diffs, seed_std), "per_seed": diffs}
    return out


def comparison_json(per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]],
                    contribution: Mapping[int, Mapping[str, Mapping[str, Any]]] | None = None) -> dict[str, Any]:
    """The ``comparison.json`` content of per-seed summaries (``{seed: {method: summary}}``, the
    same methods in every seed).

    Keys: ``seeds``; one entry per method and per reference (:func:`aggregate_entry`: mean over
    seeds in ``test``/``test_per_territory``, standard deviation in ``*_std``; the references
    from each seed's first method, checked equal in all methods); ``gains``
    (:func:`gains_vs_local`), ``best_reference`` (:func:`best_references`), ``useful``
    (:func:`usefulness`), ``holdout`` (label -> :func:`aggregate_holdout`, for methods whose
    summaries carry a ``holdout`` block and for the leave-one-out runs, ``without <k>``) and, with
    ``contribution`` (seed -> k -> summary of the run without k), ``contribution``
    (:func:`contribution_matrix`, against each seed's ``federated`` summary).

    Raises:
        ValueError: the seeds ran other methods, or the methods of a seed used other territories or
            test windows (:func:`_check_same_windows`), or ``contribution`` without a ``federated`` method.
    """
    seeds = list(per_seed)
    methods = list(per_seed[seeds[0]])
    for s in seeds:
        if list(per_seed[s]) != methods:
            raise ValueError(f"seed {s} ran methods {list(per_seed[s])}, seed {seeds[0]} {methods}")
    refs = {s: _check_same_windows(per_seed[s]) for s in seeds}
    for s in seeds:
        if refs[s]["territories"] != refs[seeds[0]]["territories"]:
            raise ValueError(f"seed {s} used other territories/windows than seed {seeds[0]}")
    out: dict[str, Any] = {"seeds": seeds}
    for m in methods:
        out[m] = aggregate_entry([per_seed[s][m] for s in seeds])
    for r in REFERENCES:
        out[r] = aggregate_entry([{"test": refs[s][r], "test_per_territory": refs[s][f"{r}_per_territory"]} for s in seeds])
    territories = [t["id"] for t in refs[seeds[0]]["territories"]]
    out["gains"] = gains_vs_local(per_seed, territories)
    out["best_reference"] = best_references(out, territories)
    out["useful"] = usefulness(out, methods, out["best_reference"])
    holdout = {m: aggregate_holdout([per_seed[s][m]["holdout"] for s in seeds])
               for m in methods if all(per_seed[s][m].get("holdout") for s in seeds)}
    if contribution:
        if "federated" not in methods:
            raise ValueError("contribution: the leave-one-out runs need the federated run with every territory "
                             "(method 'federated')")
        first = contribution[seeds[0]]
        holdout.update({f"without {k}": aggregate_holdout([contribution[s][k]["holdout"] for s in seeds])
                        for k in first if all(contribution[s][k].get("holdout") for s in seeds)})
        out["contribution"] = contribution_matrix({s: per_seed[s]["federated"] for s in seeds}, contribution)
    if holdout:
        out["holdout"] = holdout
    return out


# --------------------------------------------------------------------------- comparison.md
def pm(mean: float | None, std: float | None = None, percent: bool = False) -> str:
    """A table cell ``mean ± std`` (:func:`fedldt.results.fmt_metric`; ``n/a`` without a mean,
    the mean alone without a standard deviation)."""
    if mean is None:
        return fmt_metric(None)
    return fmt_metric(mean, percent=percent) + ("" if std is None else f" ± {fmt_metric(std, percent=percent)}")


def _cell(cmp: Mapping[str, Any], name: str, metric: str, step: str, territory: str | None = None) -> str:
    e = cmp[name]
    if territory is None:
        mean, std = e["test"], e["test_std"]
    else:
        mean, std = e["test_per_territory"][territory], e["test_per_territory_std"][territory]
    sd = None if name in REFERENCES else std[metric][step]  # deterministic: the same in every seed
    return pm(mean[metric][step], sd, percent=metric in ("mape", "wape"))


def _entries(cmp: Mapping[str, Any]) -> list[str]:
    """The methods and references of ``cmp``, in their order."""
    return [k for k, v in cmp.items() if isinstance(v, dict) and "test_per_territory" in v]


def _gain_cell(g: Mapping[str, Any]) -> str:
    if g["verdict"] == NOT_AVAILABLE:
        return NOT_AVAILABLE
    diff = f"{g['mean_diff']:+.3f}" + ("" if g["spread"] is None else f" (spread {g['spread']:.3f})")
    rel = "" if g["relative_change"] is None else f" ({100 * g['relative_change']:+.1f}%)"
    return f"{diff}{rel}: {g['verdict']}"


def _useful_cell(u: Mapping[str, Any]) -> str:
    return NOT_AVAILABLE if u["useful"] is None else ("yes" if u["useful"] else "no") + f" ({u['margin']:+.3f})"


def territory_section(cmp: Mapping[str, Any], territory: str, methods: Sequence[str], plot: str) -> list[str]:
    """The ``What federation gives <territory>`` section: MAE by method and horizon (mean ± std),
    the paired gain against local with its verdict, the best reference and whether each method
    beats it, and where its plot is (``plot``, a panel per territory)."""
    steps = list(cmp[methods[0]]["test"]["mae"])
    names = _entries(cmp)
    lines = [f"## What federation gives {territory}", "", "Test MAE by method and horizon step (mean ± std over seeds):", ""]
    lines += markdown_table(["method", *steps], [[n] + [_cell(cmp, n, "mae", s, territory) for s in steps] for n in names])
    best = cmp["best_reference"][territory]
    rows = []
    for m in methods:
        g = cmp["gains"].get(m, {}).get(territory)
        rows.append([m, "—" if g is None else _gain_cell(g), _useful_cell(cmp["useful"][m][territory])])
    lines += ["", f"Best reference: {best['reference'] or NOT_AVAILABLE} (MAE {fmt_metric(best['mae'])}).", ""]
    beats = f"beats {best['reference'] or 'the best reference'}"
    lines += markdown_table(["method", "MAE change vs local (paired)", beats], rows)
    lines += ["", f"Plot: panel `{territory}` of [{plot}]({plot}).", ""]
    return lines


def holdout_section(holdout: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The hold-out territories: zero-shot (and fine-tuned) test MAE of the global model next to
    the references on the held-out territory's test windows."""
    lines = ["## Held-out territories (zero-shot)", "",
             "A held-out territory takes no part in training; it is tested with the final global model (zero-shot) "
             "and, with `federation.holdout_finetune`, after fine-tuning on its last days of training data.", ""]
    for label, h in holdout.items():
        steps = list(h["zero_shot"]["mae"]) if h["zero_shot"] else []
        rows = [["zero-shot"] + [pm(h["zero_shot"]["mae"][s], (h["zero_shot_std"] or {}).get("mae", {}).get(s)) for s in steps]]
        if h["finetuned"]:
            rows.append([f"fine-tuned ({h['finetune_history']})"]
                        + [pm(h["finetuned"]["mae"][s], (h["finetuned_std"] or {}).get("mae", {}).get(s)) for s in steps])
        rows += [[r] + [pm(b["mae"][s]) for s in steps] for r, b in h["references"].items() if b]
        lines += [f"### {label}: {h['territory']} held out", ""] + markdown_table(["test MAE", *steps], rows) + [""]
    return lines


def contribution_section(matrix: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The who-helps-whom matrix: row k (the territory left out), column j: MAE_j without k -
    MAE_j with all (mean ± std over seeds; positive = k helps j)."""
    cols = list(dict.fromkeys([*matrix, *(j for row in matrix.values() for j in row)]))
    lines = ["## Who helps whom (leave one territory out)", "",
             "Row k, column j: test MAE of j (all steps) in the federation without k minus in the federation with "
             "every territory, mean ± std over seeds. Positive: k's taking part lowers j's error (k helps j).", ""]
    lines += markdown_table(["left out", *cols],
                            [[k] + ["—" if j not in row else pm(row[j]["mean"], row[j]["std"]) for j in cols]
                             for k, row in matrix.items()])
    return lines + [""]


def comparison_markdown(cmp: dict[str, Any], per_seed: Mapping[int, Mapping[str, Mapping[str, Any]]], pilot: str) -> str:
    """The ``comparison.md`` report: pooled metrics per method and horizon, per-territory MAE and
    WAPE, the gain of each method against training alone, usefulness against the best reference,
    one ``What federation gives <territory>`` section per territory, hold-out and contribution
    sections when there are any (cells ``mean ± std`` over seeds)."""
    seeds = list(per_seed)
    methods = list(per_seed[seeds[0]])
    first = per_seed[seeds[0]][methods[0]]
    names = _entries(cmp)
    steps = list(cmp[methods[0]]["test"]["mae"])
    terr = [t["id"] for t in first["territories"]]
    several = len(seeds) > 1
    lines = [f"# Comparison of training methods: `{pilot}`", ""]
    lines.append(f"Seed{'s' if several else ''} {', '.join(map(str, seeds))}; {first['rounds']} rounds x "
                 f"{first['local_epochs']} local epochs (centralized and local: the same number of epochs). Territories: "
                 + ", ".join(f"{t['id']} ({t['num_nodes']} nodes, {t['num_test_windows']} test windows)"
                             for t in first["territories"]) + ".")
    lines.append("Metrics are masked and pooled exactly over all territories' test windows, in data units; "
                 "MAPE and WAPE are percentages."
                 + (" Cells: mean ± sample standard deviation over the seeds." if several else ""))
    lines += ["", "## Pooled test metrics", ""]
    lines += markdown_table(["method"] + [f"{m.upper()} {s}" for m in ("mae", "rmse", "mape") for s in steps],
                            [[n] + [_cell(cmp, n, m, s) for m in ("mae", "rmse", "mape") for s in steps] for n in names])
    lines += ["", "## Per-territory test MAE (all horizon steps) and WAPE", ""]
    lines += markdown_table(["method"] + [f"MAE {t}" for t in terr] + [f"WAPE {t}" for t in terr],
                            [[n] + [_cell(cmp, n, "mae", "all", t) for t in terr]
                             + [_cell(cmp, n, "wape", "all", t) for t in terr]
                             for n in names])
    if cmp["gains"]:
        lines += ["", "## Does each territory gain from federation?", ""]
        lines += markdown_table(["method"] + [f"{t}: MAE change vs local" for t in terr],
                                [[m] + [_gain_cell(cmp["gains"][m][t]) for t in terr] for m in cmp["gains"]])
        rule = (f"paired over the {len(seeds)} seeds: d = MAE(method) - MAE(local) per seed; a territory gains (loses) "
                "when the mean of d is below (above) minus (plus) the seed-to-seed spread, the largest of sd(d), "
                "sd(MAE method) and sd(MAE local), else there is no clear difference"
                if several else f"one seed: a territory gains (loses) when the method's test MAE is more than "
                f"{100 * GAIN_THRESHOLD:.0f} % below (above) its local-only MAE; smaller differences are not read as a gain")
        lines += ["", f"Change = test MAE (all steps) minus the local-only MAE, mean over seeds (with the seed-to-seed "
                  f"spread, then the relative change); {rule}."]
    lines += ["", "## Is each method useful? (against the best reference)", ""]
    lines += markdown_table(["territory", "best reference", *methods],
                            [[t, f"{b['reference'] or NOT_AVAILABLE} ({fmt_metric(b['mae'])})"]
                             + [_useful_cell(cmp["useful"][m][t]) for m in methods] for t, b in cmp["best_reference"].items()])
    lines += ["", f"The best reference is the lowest test MAE (all steps) among {', '.join(REFERENCES)}; a method is "
              "useful only where its mean MAE is below it by more than the method's seed-to-seed standard deviation "
              "(margin in brackets).", ""]
    lines += [f"![test MAE by method and horizon step, one panel per territory, error bars: one standard deviation "
              f"over seeds]({ARTIFACTS[4]})", ""]
    for t in terr:
        lines += territory_section(cmp, t, methods, ARTIFACTS[4])
    if cmp.get("holdout"):
        lines += holdout_section(cmp["holdout"])
    if cmp.get("contribution"):
        lines += contribution_section(cmp["contribution"])
    wall = {m: float(np.mean([per_seed[s][m]["wall_time_s"] for s in seeds])) for m in methods}
    lines += ["Wall time (s" + (", mean over seeds" if several else "") + "): "
              + ", ".join(f"{m} {w:.0f}" for m, w in wall.items()), ""]
    return "\n".join(lines)


def _save(fig: Any, legend_ax: Any, path: Path, legend_size: int | None = None) -> Path:
    """Legend on ``legend_ax``, tight layout, ``path`` written (PNG, 110 dpi), figure closed."""
    legend_ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_territory_mae(cmp: Mapping[str, Any], out: Path) -> Path:
    """Test MAE by method and horizon step (report steps and ``all``), one panel per territory:
    trained methods with error bars of one standard deviation over seeds, references dashed."""
    terr = list(cmp["best_reference"])
    names = _entries(cmp)
    trained = [n for n in names if n not in REFERENCES]
    steps = list(cmp[names[0]]["test"]["mae"])
    x = np.arange(len(steps), dtype=float)
    fig, axes = plt.subplots(1, len(terr), figsize=(4.4 * len(terr), 3.6), squeeze=False)
    for ax, t in zip(axes[0], terr):
        for i, n in enumerate(names):
            mean = [cmp[n]["test_per_territory"][t]["mae"][s] for s in steps]
            mean = np.array([np.nan if v is None else v for v in mean], dtype=float)  # plotting only: a gap
            if n in trained:
                std = [cmp[n]["test_per_territory_std"][t]["mae"][s] for s in steps]
                err = None if all(v is None for v in std) else np.array([0.0 if v is None else v for v in std])
                off = (i - (len(trained) - 1) / 2) * 0.06
                ax.errorbar(x + off, mean, yerr=err, marker="o", ms=4, capsize=3, label=n)
            else:
                ax.plot(x, mean, ls="--", marker=".", lw=1, label=n)
        ax.set_xticks(x, steps)
        ax.set_title(f"territory {t}")
        ax.set_xlabel("horizon step")
        ax.set_ylabel("test MAE")
        ax.grid(alpha=0.3)
    return _save(fig, axes[0][0], out / ARTIFACTS[4], legend_size=7)


def plot_validation(run_dirs: dict[str, Path], out: Path) -> Path:
    """Validation MAE (all steps) per round: one panel per territory, one line per run."""
    hist = {m: pd.read_csv(d / "history.csv") for m, d in run_dirs.items()}
    terr = list(dict.fromkeys(next(iter(hist.values()))["territory"]))
    fig, axes = plt.subplots(1, len(terr), figsize=(4.2 * len(terr), 3.4), sharey=False, squeeze=False)
    for ax, t in zip(axes[0], terr):
        for m, h in hist.items():
            rows = h[h["territory"] == t]
            ax.plot(rows["round"], rows["val_mae_all"], marker="o", ms=3, label=m)
        ax.set_title(f"territory {t}")
        ax.set_xlabel("round")
        ax.set_ylabel("validation MAE")
        ax.grid(alpha=0.3)
    return _save(fig, axes[0][0], out / ARTIFACTS[2])


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
    """Forecast vs. truth over the last test day for a few sensors of each territory, one line per
    run of ``run_dirs`` (runs whose ``model.pt`` is the model tested: not the personalized ones,
    whose territory models stay with the territories)."""
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
    return _save(fig, axes[0][0], out / ARTIFACTS[3], legend_size=7)


#: Methods whose run folder's ``model.pt`` is the model their test metrics come from.
_SERVER_MODEL = ("federated", "centralized", "local")


def run_comparison(cfg: dict[str, Any], overrides: Sequence[str], out_dir: str | Path,
                   publish_dir: str | Path | None = None) -> dict[str, Any]:
    """Run every method for every seed into ``out_dir/seed<k>/<method>/`` (and with
    ``compare.contribution`` one federated run per territory without it,
    ``out_dir/seed<k>/without-<territory>/``), then write the comparison artifacts.

    Args:
        cfg: resolved config (``compare.seeds``, ``compare.methods``, ``compare.contribution``;
            each run gets its seed: ``seed=<k>`` for the federated runs, which re-compose the config).
        overrides: Hydra overrides that made ``cfg`` (see :func:`base_overrides`).
        out_dir: folder for the runs and the artifacts.
        publish_dir: if set, the artifacts (not the runs) are also copied there (see
            :func:`fedldt.results.publish`: nothing fedldt did not publish there is replaced).

    Returns:
        The ``comparison.json`` content (:func:`comparison_json`).

    Raises:
        FileExistsError: ``publish_dir`` or a run folder holds files fedldt did not write (before
            any training).
        ValueError: ``compare.contribution`` with ``federation.holdout`` set, with fewer than 2
            territories, or with a territory name an override cannot carry (before any training).
        fedldt.config.ConfigError: a run's config is invalid (before any training).
        fedldt.launch.simulation.RunFailed: a federated run failed.
    """
    out = Path(out_dir).resolve()
    if publish_dir:  # before hours of training, not after
        check_publish_dir(publish_dir, ARTIFACTS)
    seeds, methods = compare_seeds(cfg), compare_methods(cfg)
    runs = runs_for(methods)
    contribution = bool((cfg.get("compare") or {}).get("contribution"))
    if contribution and (cfg.get("federation") or {}).get("holdout"):
        raise ValueError(f"compare.contribution=true needs every territory in the federated run, but federation.holdout="
                         f"{cfg['federation']['holdout']}; drop federation.holdout or compare.contribution")
    base = base_overrides(overrides) + partition_pin(cfg)
    reuse = bool((cfg.get("compare") or {}).get("reuse"))
    expected: dict[tuple[int, str], dict[str, Any]] = {}  # (seed, folder) -> the config the run writes
    for m in runs:  # every run's config, before the first run, not in the middle of the comparison
        if m in PERSONALIZATION:
            for seed in seeds:  # every seed's territories are the base config's (paired comparison)
                run_cfg = resolve_config(compose_config(run_overrides(base, m, seed) + ["mode=federated"]),
                                         require_data=False)
                expected[(seed, m)] = run_cfg
                if run_cfg["partition"] != cfg["partition"]:
                    raise ValueError(f"compare: the {m} run of seed {seed} would partition the territories "
                                     f"otherwise ({run_cfg['partition']}) than the base config ({cfg['partition']})")
    if contribution:  # the leave-one-out runs' configs too, before hours of the other runs
        names = [t.name for t in load_territories(dict(cfg))]
        if len(names) < 2:
            raise ValueError(f"compare.contribution=true needs at least 2 territories (pilot '{cfg['name']}' has "
                             f"{names}): leaving the only one out leaves none to train")
        for k in names:
            for seed in seeds:
                run_cfg = resolve_config(compose_config(run_overrides(base, "federated", seed, holdout=k) + ["mode=federated"]),
                                         require_data=False)
                expected[(seed, f"without-{k}")] = run_cfg  # compare.reuse reads these runs too
                if run_cfg["federation"]["holdout"] != k:
                    raise ValueError(f"compare.contribution: the run without territory {k!r} would hold out "
                                     f"{run_cfg['federation']['holdout']!r}")
    out.mkdir(parents=True, exist_ok=True)
    total = len(seeds) * (len(runs) + (num_territories(cfg) if contribution else 0))
    per_seed: dict[int, dict[str, dict[str, Any]]] = {}
    without: dict[int, dict[str, dict[str, Any]]] = {}
    done = 0

    def one(seed: int, method: str, folder: str, holdout: str | None = None) -> dict[str, Any]:
        nonlocal done
        done += 1
        mode = "federated" if method in PERSONALIZATION else method
        if reuse:
            want = expected.get((seed, folder)) if mode == "federated" else {**cfg, "seed": int(seed), "mode": mode}
            got = None if want is None else finished_run(out / f"seed{seed}" / folder, want)
            if got is not None:
                print(f"[fedldt] === seed {seed} {folder}: finished earlier with this config, read from "
                      f"{out / f'seed{seed}' / folder} (compare.reuse) ===", flush=True)
                return got
        print(f"[fedldt] === seed {seed} {folder} ===", flush=True)
        with run_slot(done, total, f"seed {seed}" + ("" if folder == mode else f" {folder}")):  # the slot adds the mode
            return run_mode({**cfg, "seed": int(seed)}, run_overrides(base, method, seed, holdout),
                            out / f"seed{seed}" / folder, mode=mode)

    for seed in seeds:
        got = {m: one(seed, m, m) for m in runs}
        if "federated" in methods and "federated" not in got:
            got["federated"] = federated_from_finetune(got["finetune"])
        per_seed[seed] = {m: got[m] for m in methods}
        if contribution:
            names = [t["id"] for t in per_seed[seed]["federated"]["territories"]]
            without[seed] = {k: one(seed, "federated", f"without-{k}", holdout=k) for k in names}
    cmp = comparison_json(per_seed, without or None)
    artifacts = [out / ARTIFACTS[0], out / ARTIFACTS[1]]
    artifacts[0].write_text(json.dumps(cmp, indent=2, allow_nan=False) + "\n")
    artifacts[1].write_text(comparison_markdown(cmp, per_seed, cfg["name"]))
    first = out / f"seed{seeds[0]}"
    run_dirs = {m: first / m for m in runs}
    artifacts.append(plot_validation(run_dirs, out))
    server = {m: first / ("finetune" if m == "federated" and "federated" not in runs else m)
              for m in methods if m in _SERVER_MODEL}
    if server:
        artifacts.append(plot_forecasts(cfg, server, out))
    artifacts.append(plot_territory_mae(cmp, out))
    if publish_dir:
        publish(artifacts, publish_dir)
    return cmp
