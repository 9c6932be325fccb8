"""Cost of federation: one pilot's federated run on Flower's simulation engine against the same
training outside Flower (issue 15, item 2).

    .venv/bin/python scripts/bench_federation.py [--rounds 5] [--out-dir docs/results/benchmarks] \
        [--parallel] [-- pilot=los_loop_3 <more Hydra overrides>]

Federated: ``scripts/simulate.py``'s engine (a SuperLink, Ray, the ServerApp, one ClientApp per
territory), with ``federation.client_cpus`` = this machine's cores so Ray runs one territory at a
time, as the plain loop does (``--parallel`` keeps the pilot's ``client_cpus``: territories in
parallel, reported but not the overhead's basis). Its ``summary.json`` ``timing`` block gives the
ServerApp's setup, each round's phases (territory training incl. serialisation and messaging,
aggregation, evaluation, checkpoint) and the mean serialised message size per territory; the rest
of the wall time (SuperLink, Ray and app start, results written) is "outside the ServerApp".

Plain: the same FedAvg in this process, without Flower: the same tasks
(:func:`fedldt.baselines.build_tasks`), initial weights, per-round seeds, local epochs,
weighted mean of the shared parameters and per-round validation of every territory (the model and
the reference forecasts), on ``train.torch_threads`` threads. Its validation MAE per round is
reported beside the federated one: equal values show that both did the same work.

Overhead = (federated round time - plain round time) / federated round time, mean over rounds
(the issue's target: at most 15 %), and the whole-run ratio federated wall / plain wall. Writes
``federation.json`` (valid JSON, ``null`` where not measurable) and ``federation.md`` to
``--out-dir``; seconds are wall-clock seconds, sizes bytes.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from fedldt.launch.measure import machine_info, write_report

def plain_fedavg(cfg: dict[str, Any]) -> dict[str, Any]:
    """FedAvg of ``cfg`` in this process (no Flower): the clients' training (:func:`clients.territory.train`
    without messages) and the server's weighted mean, timed per phase."""
    from fedldt.baselines import build_tasks
    from fedldt.engine import cpu_state, derive_seed, seed_everything
    from fedldt.metrics import mae, pool
    from fedldt.models import build_model, load_shared_state, split_state
    from fedldt.results import evaluation_sums

    t0 = time.perf_counter()
    tasks = build_tasks(cfg)
    build_s = time.perf_counter() - t0
    seed, tr = int(cfg["seed"]), cfg["train"]
    first = tasks[0]
    seed_everything(seed)  # the server's initial global model (server/rounds.py: run_federated)
    model_cfg = {**cfg["model"], **first.model_dims()}
    shared, _ = split_state(build_model(model_cfg, num_nodes=first.dataset.num_nodes))
    global_shared = cpu_state(shared)
    local: dict[int, dict[str, torch.Tensor] | None] = {i: None for i in range(len(tasks))}

    def territory_model(i: int) -> torch.nn.Module:
        task = tasks[i]
        torch.manual_seed(derive_seed(seed, i, 0))  # clients/territory.py: _model
        m = build_model({**cfg["model"], **task.model_dims()}, num_nodes=task.dataset.num_nodes)
        if local[i]:
            m.load_state_dict(local[i], strict=False)
        load_shared_state(m, global_shared)
        return m

    rounds = []
    for rnd in range(1, int(tr["rounds"]) + 1):
        clock, updates = time.perf_counter(), []
        for i, task in enumerate(tasks):
            m = territory_model(i)
            task.fit(m, epochs=tr["local_epochs"], lr=tr["lr"], seed=derive_seed(seed, i, rnd), weight_decay=tr["weight_decay"],
                     grad_clip=tr["grad_clip"], proximal_names=set(global_shared), optimizer=tr["optimizer"]["_target_"])
            sh, lo = split_state(m)
            updates.append((cpu_state(sh), task.num_windows("train")))
            local[i] = cpu_state(lo)
        train_s = time.perf_counter() - clock
        clock = time.perf_counter()
        total = sum(n for _, n in updates)
        global_shared = {k: (sum(u[k].double() * n for u, n in updates) / total).to(v.dtype) if v.is_floating_point() else v
                         for k, v in updates[0][0].items()}
        aggregate_s = time.perf_counter() - clock
        clock = time.perf_counter()
        sums = [evaluation_sums(task, territory_model(i), "val")["model"] for i, task in enumerate(tasks)]
        evaluate_s = time.perf_counter() - clock
        rounds.append({"round": rnd, "train_s": round(train_s, 4), "aggregate_train_s": round(aggregate_s, 4),
                       "evaluate_s": round(evaluate_s, 4), "val_mae": mae(pool(sums))})
    return {"task_build_s": round(build_s, 4), "rounds": rounds,
            "wall_s": round(time.perf_counter() - t0, 4)}


def round_time(row: dict[str, Any]) -> float:
    """Seconds of one round row (every ``*_s`` phase but the round number)."""
    return float(sum(v for k, v in row.items() if k.endswith("_s")))


def mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def markdown(report: dict[str, Any]) -> str:
    fed, plain = report["federated"], report["plain"]
    f = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, torch {report['machine']['torch']}, "
             f"flwr {report['machine']['flwr']}; pilot `{report['pilot']}`, {report['rounds']} rounds, "
             f"federation.client_cpus={report['client_cpus']}.", "",
             "| round | federated: train (s) | aggregate (s) | evaluate (s) | checkpoint (s) | round (s) | plain: train (s) | "
             "aggregate (s) | evaluate (s) | round (s) | overhead | val MAE federated | val MAE plain |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fr, pr, ov in zip(fed["timing"]["rounds"], plain["rounds"], report["overhead"]["per_round"]):
        lines.append(f"| {fr['round']} | {f(fr['train_s'])} | {f(fr['aggregate_train_s'] + fr['aggregate_evaluate_s'], 3)} | "
                     f"{f(fr['evaluate_s'])} | {f(fr['checkpoint_s'], 3)} | {f(round_time(fr))} | {f(pr['train_s'])} | "
                     f"{f(pr['aggregate_train_s'], 3)} | {f(pr['evaluate_s'])} | {f(round_time(pr))} | {f(100 * ov, 1)} % | "
                     f"{f(fr.get('val_mae'), 3)} | {f(pr['val_mae'], 3)} |")
    o = report["overhead"]
    lines += ["", f"Mean round overhead: **{f(100 * o['mean_round'], 1)} %** of the federated round time "
              "(target: at most 15 %).",
              f"Whole run: federated {f(fed['wall_s'], 1)} s (ServerApp setup {f(fed['timing']['setup_s'], 1)} s, rounds "
              f"{f(fed['timing']['rounds_s'], 1)} s, final test evaluation {f(fed['timing']['final_s'], 1)} s, outside the "
              f"ServerApp: SuperLink, Ray, app start, results {f(fed['outside_server_s'], 1)} s) against plain "
              f"{f(plain['wall_s'], 1)} s (task build {f(plain['task_build_s'], 1)} s): ratio {f(o['whole_run_ratio'])}.",
              f"Bytes per territory per round (serialised message contents): train {f(fed['bytes_per_round']['train_down'], 0)} "
              f"down / {f(fed['bytes_per_round']['train_up'], 0)} up, evaluate {f(fed['bytes_per_round']['evaluate_down'], 0)} "
              f"down / {f(fed['bytes_per_round']['evaluate_up'], 0)} up."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="federated rounds (train.rounds)")
    ap.add_argument("--out-dir", default=None, help="folder for federation.json/.md (default: a new temporary one)")
    ap.add_argument("--parallel", action="store_true", help="keep the pilot's federation.client_cpus (territories in parallel)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides (default: pilot=los_loop_3)")
    args = ap.parse_args(argv)

    from fedldt.config import compose_config, num_territories, resolve_config
    from fedldt.launch.simulation import run_simulation

    overrides = list(args.overrides) or ["pilot=los_loop_3"]
    overrides.append(f"train.rounds={args.rounds}")
    if not args.parallel:
        overrides.append(f"federation.client_cpus={os.cpu_count() or 1}")
    cfg = resolve_config(compose_config(overrides))
    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="fedldt-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedldt-bench-run-") as tmp:
        t0 = time.perf_counter()
        summary = run_simulation(overrides, Path(tmp) / "run", num_territories(cfg),
                                 client_cpus=int(cfg["federation"]["client_cpus"]))
        fed_wall = time.perf_counter() - t0
    torch.set_num_threads(int(cfg["train"]["torch_threads"]))
    plain = plain_fedavg(cfg)
    timing = summary["timing"]
    for row, hist in zip(timing["rounds"], summary["history"]):
        row["val_mae"] = hist["val"]["mae"]["all"]
    per_round = [(round_time(f) - round_time(p)) / round_time(f) for f, p in zip(timing["rounds"], plain["rounds"])]
    inside = timing["setup_s"] + timing["rounds_s"] + timing["final_s"]
    report = {
        "command": shlex.join([".venv/bin/python", "scripts/bench_federation.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(), "pilot": cfg["name"], "rounds": args.rounds,
        "client_cpus": cfg["federation"]["client_cpus"],
        "federated": {"wall_s": round(fed_wall, 3), "outside_server_s": round(fed_wall - inside, 3), "timing": timing,
                      "bytes_per_round": {k: mean([r[f"bytes_{k}"] for r in timing["rounds"] if r[f"bytes_{k}"] is not None])
                                          for k in ("train_down", "train_up", "evaluate_down", "evaluate_up")},
                      "test_mae": mae_all(summary)},
        "plain": plain,
        "overhead": {"per_round": per_round, "mean_round": mean(per_round),
                     "whole_run_ratio": fed_wall / plain["wall_s"] if plain["wall_s"] else None},
    }
    write_report(out, "federation", report, markdown(report))
    return 0


def mae_all(summary: dict[str, Any]) -> float | None:
    return summary["test"]["mae"]["all"]


if __name__ == "__main__":
    from fedldt.launch.provenance import guard_checkout

    guard_checkout(__file__)  # this checkout's fedldt, or a clear error naming both
    raise SystemExit(main())
