"""Poisoning study: robust aggregation rules against one attacking territory.

    python scripts/poisoning.py --out outputs/poisoning [--seeds 0 1] [--strategies fedavg krum]
                                [--attacks clean sign_flip] [--attacker 3]
                                [--publish docs/results/los_loop_4_poisoned] [-- extra overrides]

For each seed x strategy x attack it runs the pilot ``los_loop_4_poisoned`` (Los-loop in 4
territories) on Flower's simulation engine, one run at a time. Under an attack, territory
``--attacker`` runs a TEST app: the production ClientApp plus the test-only
:func:`tests.mods.poison_mod` (``tests/apps.py``); the production app and config have no
attack switch. ``clean`` runs the production app.

After each run the global model (``model.pt``) is scored on the test windows of the honest
territories (every territory but the attacker, also in clean runs), pooled exactly (sums of
errors and counts); the pooled score over all territories is recomputed too and checked equal
to the run's ``summary.json``. ``<out>/results.json`` is rewritten after every run (valid JSON
at any time); run the same command again to resume: runs recorded ``ok`` are skipped, failed
ones are run again. With ``--publish`` the table (``README.md``) and ``results.json`` are
copied there. Ctrl-C or SIGTERM stops every process started (exit status 130 / 143).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from fedldt.config import checkout_root

sys.path.insert(0, str(checkout_root()))  # tests/ (the test-only mods and test app writer) is not installed

import torch  # noqa: E402

from fedldt.baselines import build_tasks  # noqa: E402
from fedldt.config import compose_config, num_territories, resolve_config  # noqa: E402
from fedldt.launch.provenance import git_state, guard_checkout  # noqa: E402
from fedldt.launch.simulation import RunFailed, config_errors, interruptible, run_simulation  # noqa: E402
from fedldt.metrics import pool, report  # noqa: E402
from fedldt.models import build_model  # noqa: E402
from fedldt.results import fmt_metric, markdown_table  # noqa: E402
from tests.apps import write_test_app  # noqa: E402
from tests.mods import ATTACKS  # noqa: E402

PILOT = "los_loop_4_poisoned"
CONDITIONS = ("clean", *ATTACKS)
#: Per-strategy overrides for 4 territories: FedTrimmedAvg's default beta 0.2 trims
#: int(0.2 * 4) = 0 replies per side (a plain mean), 0.25 trims one; Krum keeps f = 0, since
#: fedldt refuses f = 1 with n = 4 (Blanchard et al. need n > 2f + 2).
STRATEGY_OVERRIDES: dict[str, list[str]] = {
    "fedavg": ["strategy=fedavg"],
    "fedmedian": ["strategy=fedmedian"],
    "fedtrimmedavg": ["strategy=fedtrimmedavg", "strategy.beta=0.25"],
    "krum": ["strategy=krum", "strategy.num_malicious_nodes=0"],
    "fedclipavg": ["strategy=fedclipavg"],
}
#: A robust rule must keep its poisoned pooled honest test MAE (all steps) within this of its clean one.
TOLERANCE = 0.10
RESULTS = "results.json"
REPORT = "README.md"


def honest_scores(run_dir: Path, overrides: Sequence[str], attacker: int, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's global model scored on the test windows: pooled over the honest territories,
    over the attacker alone, over all (the last checked equal to ``summary["test"]``).

    Raises:
        RuntimeError: the recomputed pooled score differs from the run's summary.
    """
    cfg = resolve_config(compose_config(list(overrides)))
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    if ckpt.get("local_keys"):
        raise RuntimeError(f"{run_dir}/model.pt has local entries {ckpt['local_keys']}: the study needs personalization=none")
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    steps = list(cfg["task"]["report_steps"])
    sums = [task.evaluate(model, "test") for task in build_tasks(cfg)]
    everyone = report(pool(sums), steps)
    if json.dumps(everyone, sort_keys=True) != json.dumps(summary["test"], sort_keys=True):
        raise RuntimeError(f"{run_dir}: the recomputed test metrics {everyone['mae']} differ from summary.json's {summary['test']['mae']}")
    ids = [t["id"] for t in summary["territories"]]
    return {"honest_territories": [t for i, t in enumerate(ids) if i != attacker], "attacker_territory": ids[attacker],
            "test_honest": report(pool(s for i, s in enumerate(sums) if i != attacker), steps),
            "test_attacker": report(sums[attacker], steps), "test_all": everyone}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON atomically (a reader never sees half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def run_one(out: Path, seed: int, strategy: str, attack: str, attacker: int, extra: Sequence[str]) -> dict[str, Any]:
    """One federated run of the study; returns its record for ``results.json``."""
    overrides = [f"pilot={PILOT}", f"seed={seed}", *STRATEGY_OVERRIDES[strategy], *extra]
    run_dir = out / f"seed{seed}" / strategy / attack
    with config_errors():
        cfg = resolve_config(compose_config(overrides))
    n = num_territories(cfg)
    if not 0 <= attacker < n:
        raise SystemExit(f"fedldt: --attacker {attacker} must be a territory index in [0, {n - 1}]")
    record: dict[str, Any] = {"seed": seed, "strategy": strategy, "attack": attack, "overrides": overrides,
                              "run_dir": str(run_dir), "strategy_config": dict(cfg["strategy"]),
                              **git_state(checkout_root())}
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="fedldt-poison-app-") as tmp:
        app_dir = None
        if attack != "clean":
            mod = ["poison_mod", {"attack": attack, "attacker": attacker, "scale": -10.0, "seed": seed}]
            app_dir = write_test_app(Path(tmp) / "app", [mod])
            record["mod"] = mod
        if run_dir.exists():  # a failed earlier try: keep it beside, never delete
            run_dir.rename(run_dir.with_name(f"{attack}.failed-{int(start)}"))
        try:
            summary = run_simulation(overrides, run_dir, n, client_cpus=int(cfg["federation"]["client_cpus"]),
                                     client_gpus=float(cfg["federation"].get("client_gpus", 0.0)),
                                     ray_address=cfg["federation"].get("ray_address"), app_dir=app_dir)
        except RunFailed as e:
            return {**record, "status": "failed", "error": str(e)[-2000:], "wall_time_s": round(time.time() - start, 1)}
    record.update(honest_scores(run_dir, overrides, attacker, summary))
    record.update(status="ok", failures=summary["failures"], wall_time_s=round(time.time() - start, 1),
                  run_wall_time_s=summary["wall_time_s"],
                  val_mae_per_round=[r["val"]["mae"]["all"] for r in summary["history"]])
    return record


def verdicts(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per seed, strategy and attack: the poisoned pooled honest MAE (all steps) relative to the
    same strategy's clean one, and whether it stays within :data:`TOLERANCE`."""
    ok = {(r["seed"], r["strategy"], r["attack"]): r for r in runs if r["status"] == "ok"}
    out = []
    for (seed, strategy, attack), r in ok.items():
        clean = ok.get((seed, strategy, "clean"))
        if attack == "clean" or clean is None:
            continue
        ratio = r["test_honest"]["mae"]["all"] / clean["test_honest"]["mae"]["all"]
        out.append({"seed": seed, "strategy": strategy, "attack": attack, "mae_ratio_to_clean": ratio,
                    "within_tolerance": bool(ratio <= 1 + TOLERANCE)})
    return out


def report_markdown(results: dict[str, Any]) -> str:
    """The table of ``README.md``: pooled honest test MAE per strategy and condition, per seed."""
    runs = [r for r in results["runs"] if r["status"] == "ok"]
    ver = {(v["seed"], v["strategy"], v["attack"]): v for v in results["verdicts"]}
    s = results["settings"]
    lines = [f"# Poisoned territory: `{PILOT}`", "",
             f"Generated by `scripts/poisoning.py`; commits of the runs: "
             f"{', '.join(sorted({str(r['git_commit'])[:12] + (' (dirty)' if r['git_dirty'] else '') for r in runs}))}. "
             f"Settings: {s['description']}", ""]
    for seed in sorted({r["seed"] for r in runs}):
        lines += [f"## Seed {seed}: pooled test MAE of the 3 honest territories (mph)", ""]
        rows = []
        for strategy in s["strategies"]:
            cells = [strategy]
            for attack in CONDITIONS:
                r = next((x for x in runs if (x["seed"], x["strategy"], x["attack"]) == (seed, strategy, attack)), None)
                if r is None:
                    cells.append("not run")
                    continue
                m = r["test_honest"]["mae"]
                text = f"{fmt_metric(m['all'])} (h3 {fmt_metric(m['h3'])}, h12 {fmt_metric(m['h12'])})"
                v = ver.get((seed, strategy, attack))
                if v is not None:
                    text += f", {100 * (v['mae_ratio_to_clean'] - 1):+.1f} % {'ok' if v['within_tolerance'] else 'FAILS'}"
                cells.append(text)
            rows.append(cells)
        lines += markdown_table(["strategy", *(f"{c}: MAE all (h3, h12), change from clean" for c in CONDITIONS)], rows)
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="study folder (runs and results.json); reused to resume")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--strategies", nargs="+", default=["fedavg", "fedmedian", "fedtrimmedavg", "krum"],
                   choices=sorted(STRATEGY_OVERRIDES))
    p.add_argument("--attacks", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--attacker", type=int, default=3, help="index of the attacking territory (default 3 = t3)")
    p.add_argument("--publish", type=Path, default=None, help="also write README.md and results.json here")
    p.add_argument("extra", nargs="*", help="extra Hydra overrides for every run (after --)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    results = json.loads(path.read_text()) if path.is_file() else {"pilot": PILOT, "runs": []}
    done = {(r["seed"], r["strategy"], r["attack"]) for r in results["runs"] if r["status"] == "ok"}
    with config_errors():
        cfg = resolve_config(compose_config([f"pilot={PILOT}", *args.extra]))
    for r in results["runs"]:  # runs recorded before runs carried their own commit
        r.setdefault("git_commit", results.get("git_commit"))
        r.setdefault("git_dirty", results.get("git_dirty"))
    strategies = list(dict.fromkeys([*results.get("settings", {}).get("strategies", []), *args.strategies]))
    results.update(git_state(checkout_root()), settings={
        "pilot": PILOT, "attacker": args.attacker, "strategies": strategies, "extra_overrides": list(args.extra),
        "strategy_overrides": {k: STRATEGY_OVERRIDES[k] for k in strategies}, "tolerance": TOLERANCE,
        "pilot_config": cfg,  # resolved, before the per-run overrides (seed, strategy)
        "description": (f"pilot `{PILOT}` (Los-loop, {num_territories(cfg)} k-means territories, {cfg['model']['name']}, "
                        f"{cfg['train']['rounds']} rounds x {cfg['train']['local_epochs']} local epoch(s), "
                        f"task.train_stride={cfg['task']['train_stride']}), attacker territory index {args.attacker}; "
                        "clean: every territory honest; sign_flip: the attacker "
                        "sends global + (-10) * (local - global); gaussian_noise: local + N(0, std(array)^2) per "
                        "float array (test-only mod tests/mods.py: poison_mod)" +
                        (f"; extra overrides {list(args.extra)}" if args.extra else "") + ".")})
    with interruptible(f"; finished runs are in {path}"):
        for seed in args.seeds:
            for strategy in args.strategies:
                for attack in args.attacks:
                    if (seed, strategy, attack) in done:
                        print(f"[poisoning] seed {seed} {strategy} {attack}: done, skipped", flush=True)
                        continue
                    print(f"[poisoning] seed {seed} {strategy} {attack}: running", flush=True)
                    rec = run_one(out, seed, strategy, attack, args.attacker, args.extra)
                    results["runs"] = [r for r in results["runs"] if (r["seed"], r["strategy"], r["attack"]) !=
                                       (seed, strategy, attack)] + [rec]
                    results["verdicts"] = verdicts(results["runs"])
                    write_json(path, results)
                    mae = rec.get("test_honest", {}).get("mae", {}).get("all")
                    print(f"[poisoning] seed {seed} {strategy} {attack}: {rec['status']}, honest MAE {mae}", flush=True)
    results["verdicts"] = verdicts(results["runs"])
    write_json(path, results)
    text = report_markdown(results)
    (out / REPORT).write_text(text + "\n")
    print(text)
    if args.publish is not None:
        pub = args.publish if args.publish.is_absolute() else checkout_root() / args.publish
        pub.mkdir(parents=True, exist_ok=True)
        write_json(pub / RESULTS, results)
        print(f"published {pub / RESULTS} (write the README.md there by hand from {out / REPORT})")


if __name__ == "__main__":
    guard_checkout(__file__)
    main()
