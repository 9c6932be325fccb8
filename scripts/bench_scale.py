"""Scale of the simulation: one federated round with 3 ... 1000 territories over networks of
realistic size (issue 15, item 3).

    .venv/bin/python scripts/bench_scale.py [--networks montevideo synthetic] \
        [--territories 3 10 30 100 1000] [--rounds 1] [--timeout-s 1800] [--out-dir DIR] [--tiny] \
        [-- <more Hydra overrides for every case>]

Networks:

* ``montevideo``: the 675 bus stops of ``../shared/data/montevideo_bus`` (hourly boardings, 744
  steps), read as pilot ``montevideo_bus_4`` reads it (node-link JSON as a territory data package)
  and split by k-means into N territories (N cannot exceed the stops: larger N are recorded as
  ``skipped``);
* ``synthetic``: a road-like network written by this script (seeded) as a territory data package
  in a temporary folder: ``--synthetic-nodes`` sensors (default 10 000) spread uniformly over a
  square of 0.4 km x sqrt(nodes) a side, each linked to its 3 nearest neighbours (the union made
  undirected: mean degree about 4, planar-ish, a similarity ``exp(-(d / mean link length)^2)``),
  5-minute speeds over ``--synthetic-days`` days (default 4) with a daily pattern (two rush-hour
  dips, deeper near the centre, shallower at weekends), AR(1) noise per sensor and a network-wide
  component; read with the pilot ``montevideo_bus_4``'s settings but the package's own
  ``territory.yaml`` and a 5-minute task (window 12, horizon 12), split by k-means.

Each case (network, N) runs ``--rounds`` federated rounds (default 1) of a small DCRNN
(``model.hidden`` = ``--hidden``, default 16; one layer, K = 2; FedAvg, one local epoch,
``federation.client_cpus`` of the pilot = 1, so Ray runs as many territories at once as there are
cores) on Flower's simulation engine through :func:`fedldt.launch.simulation.run_simulation`,
and records: wall time of the whole run (SuperLink, Ray, ServerApp, results), the ServerApp's
``timing`` block of ``summary.json`` (setup: territory discovery, model, strategy; each round's
training and evaluation; the final test evaluation), bytes per round (the mean serialised message
per territory, times the territories), the peak resident memory summed over every process of the
run (this process's descendants and every process with the run's ``FLWR_HOME``, sampled every
0.5 s; RSS sums count shared pages once per process) with the processes at that moment, and
whether the case finished within ``--timeout-s``. A case that fails, or runs past the limit (its
processes are then stopped), is recorded with its reason (the exception and the tail of the
server log) and the next case runs.

Writes ``scale.json`` (valid JSON, ``null`` where not measured) and ``scale.md`` to ``--out-dir``
(default: a new temporary folder); seconds are wall-clock seconds, sizes bytes or MiB (MB here).
``--tiny``: a 60-sensor synthetic network over 2 days, N in {2, 3}, ``model.hidden=8``
(``tests/test_bench_scale.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from fedldt.launch.measure import machine_info, write_report

NETWORKS = ("montevideo", "synthetic")
#: The task of the synthetic network (5-minute data) on top of pilot montevideo_bus_4's (hourly).
SYNTHETIC_TASK = ("task.window=12", "task.horizon=12", "task.report_steps=[3,6,12]", "task.day_of_week=false",
                  "task.ha_period=day")


# ------------------------------------------------------------------------------ the synthetic network
def write_synthetic_road(folder: Path, num_nodes: int, days: int, seed: int = 0) -> dict[str, Any]:
    """Write a road-like sensor network as a territory data package (``docs/data-format.md``).

    Sensors uniform over a square of ``0.4 * sqrt(num_nodes)`` km a side (about 400 m between
    neighbours, at 45 N 5 E); each joined to its 3 nearest (made undirected: every sensor has at
    least 3 links, mean degree about 4); weights ``exp(-(d / mean link length)^2)``. Speeds in km/h
    every 5 minutes from Monday 2024-03-04 00:00 UTC: a free-flow speed per sensor (30-110 km/h),
    morning (8:00) and evening (17:30) dips of a depth that grows towards the centre (a third of it
    at weekends), a network-wide AR(1) component and an AR(1) noise per sensor.

    Args:
        folder: the package folder (created): ``territory.yaml``, ``observations.parquet`` (wide:
            ``timestamp`` + one column per sensor), ``sensors.csv``, ``edges.csv``.
        num_nodes: sensors (at least 4).
        days: whole days of 288 steps.
        seed: seeds every random draw.

    Returns:
        ``{"nodes", "links" (undirected), "mean_degree", "steps", "interval", "side_km"}``.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    side = 0.4 * math.sqrt(num_nodes)
    xy = rng.uniform(0, side, size=(num_nodes, 2))  # km
    _, nearest = cKDTree(xy).query(xy, k=4)  # itself + 3 nearest
    pairs = {(min(i, int(j)), max(i, int(j))) for i in range(num_nodes) for j in nearest[i, 1:]}
    src, dst = np.array(sorted(pairs)).T
    length = np.linalg.norm(xy[src] - xy[dst], axis=1)
    weight = np.clip(np.exp(-(length / length.mean()) ** 2), 1e-3, 1.0)
    ids = np.array([f"s{i:05d}" for i in range(num_nodes)])
    lat = 45.0 + xy[:, 1] / 111.2
    lon = 5.0 + xy[:, 0] / (111.2 * math.cos(math.radians(45.0)))
    pd.DataFrame({"sensor_id": ids, "latitude": lat.round(6), "longitude": lon.round(6)}).to_csv(folder / "sensors.csv", index=False)
    pd.DataFrame({"source": ids[src], "target": ids[dst], "weight": weight.round(4)}).to_csv(folder / "edges.csv", index=False)

    steps = 288 * days
    stamps = pd.date_range("2024-03-04 00:00", periods=steps, freq="5min", tz="UTC")
    hour = (np.arange(steps) % 288) / 12.0  # (T,)
    weekend = (np.arange(steps) // 288) % 7 >= 5
    centre = np.exp(-(np.linalg.norm(xy - side / 2, axis=1) / (0.35 * side)) ** 2)  # (N,) 1 at the centre
    depth = (0.15 + 0.45 * centre) * rng.uniform(0.7, 1.3, num_nodes)  # (N,)
    dips = np.exp(-((hour - 8.0) / 1.0) ** 2) + 0.8 * np.exp(-((hour - 17.5) / 1.3) ** 2)  # (T,)
    dips = np.where(weekend, dips / 3, dips)
    free = rng.uniform(30, 110, num_nodes)  # (N,) km/h
    common, own = np.zeros(steps), np.zeros((steps, num_nodes), dtype=np.float32)
    shocks, noise = rng.normal(0, 0.02, steps), rng.normal(0, 2.0, (steps, num_nodes)).astype(np.float32)
    for t in range(1, steps):
        common[t] = 0.95 * common[t - 1] + shocks[t]
        own[t] = 0.8 * own[t - 1] + noise[t]
    speed = free[None, :] * (1 - dips[:, None] * depth[None, :]) * (1 + common[:, None]) + own  # (T, N)
    speed = np.clip(speed, 1.0, 150.0).round(1).astype(np.float32)
    obs = pd.DataFrame(speed, columns=ids)
    obs.insert(0, "timestamp", stamps)
    obs.to_parquet(folder / "observations.parquet", index=False)
    (folder / "territory.yaml").write_text(
        "# written by scripts/bench_scale.py: a synthetic road-like network (seeded), no real measurements\n"
        "name: synthetic_road\ninterval: 5min\ntimezone: UTC\n"
        "observations: {file: observations.parquet, layout: wide, timestamp_column: timestamp}\n"
        "channels:\n  - {name: speed, unit: km/h, min: 0, max: 200}\n"
        "sensors: {file: sensors.csv, crs: 'EPSG:4326'}\n"
        "graph: {edges: edges.csv, directed: false}\n"
        f"provenance: 'synthetic (scripts/bench_scale.py, seed {seed}, {num_nodes} sensors, {days} days)'\n"
        "licence: CC0-1.0\n")
    return {"nodes": num_nodes, "links": len(pairs), "mean_degree": round(2 * len(pairs) / num_nodes, 3),
            "steps": steps, "interval": "5min", "side_km": round(side, 2), "seed": seed}


# ------------------------------------------------------------------------------------- peak memory
def _label(p: psutil.Process) -> str:
    """A short name for a process: its title (Ray workers set one: ``ray::ClientAppActor...``) or program."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        cmd = []
    head = cmd[0] if cmd else p.name()
    if head.startswith("ray::"):
        return head.split()[0][:40]
    name = Path(head).name
    if name.startswith("python"):  # python [-u] -m x / python [-u] path/to/x: the module or file
        rest = cmd[1:]
        while rest and rest[0].startswith("-") and rest[0] != "-m":
            rest = rest[1:]
        arg = rest[1] if rest[:1] == ["-m"] and len(rest) > 1 else (rest[0] if rest else "")
        name = f"python {Path(arg).name}".strip()
    return name[:40]


class TreeMemory:
    """Samples, every ``interval`` s in a background thread, the resident memory summed over the
    run's processes: this process's descendants, plus every process whose ``FLWR_HOME`` is the
    run's (read from the first descendant that has one; it finds helpers whose parent has exited,
    :func:`fedldt.launch.simulation.processes_with_home`). This process itself is not counted."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak_bytes = 0
        self.peak_processes = 0
        self.max_processes = 0
        self.peak_breakdown: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.home: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _processes(self) -> list[psutil.Process]:
        from fedldt.launch.simulation import processes_with_home

        procs = {p.pid: p for p in psutil.Process().children(recursive=True)}
        if self.home is None:
            for p in procs.values():
                try:
                    home = p.environ().get("FLWR_HOME")
                except psutil.Error:
                    continue
                if home:
                    self.home = home
                    break
        if self.home is not None:
            procs.update({p.pid: p for p in processes_with_home(Path(self.home))})
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def sample(self) -> None:
        total, by_label = 0, {}
        procs = self._processes()
        for p in procs:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            row = by_label.setdefault(_label(p), {"count": 0, "rss_mb": 0.0})
            row["count"] += 1
            row["rss_mb"] += rss / 2**20
        self.samples += 1
        self.max_processes = max(self.max_processes, len(procs))
        if total > self.peak_bytes:
            self.peak_bytes, self.peak_processes = total, len(procs)
            self.peak_breakdown = {k: {"count": v["count"], "rss_mb": round(v["rss_mb"], 1)}
                                   for k, v in sorted(by_label.items(), key=lambda kv: -kv[1]["rss_mb"])}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # a sampling hiccup must not end the benchmark
                pass
            self._stop.wait(self.interval)


# ------------------------------------------------------------------------------------------ cases
def network_overrides(network: str, package: Path | None) -> list[str]:
    """The Hydra overrides that select ``network`` (without the territories)."""
    if network == "montevideo":
        return ["pilot=montevideo_bus_4", "name=scale_montevideo_bus"]
    return ["pilot=montevideo_bus_4", "name=scale_synthetic_road", f"dataset.path={package}", "dataset.name=synthetic_road",
            "dataset.manifest=null", *SYNTHETIC_TASK]


def network_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """Sensors, links (without self-loops, as stored: both directions of an undirected link),
    mean out-degree, steps and interval of the config's dataset (loaded here once)."""
    from fedldt.config import DATASET_LOADERS, registered_call

    load, kwargs = registered_call(cfg["dataset"], DATASET_LOADERS, "dataset")
    ds = load(**kwargs)
    ei = ds.edge_index.numpy()
    links = int((ei[0] != ei[1]).sum())
    return {"nodes": int(ds.num_nodes), "directed_links": links, "mean_out_degree": round(links / ds.num_nodes, 3),
            "steps": int(ds.num_steps), "interval": str(ds.extra.get("interval") or pd.infer_freq(ds.timestamps[:10]))}


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def run_case(network: str, n: int, overrides: list[str], args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """One federated run of ``n`` territories; never raises but for Ctrl-C/SIGTERM."""
    from fedldt.config import compose_config, resolve_config
    from fedldt.launch.simulation import RunFailed, run_simulation

    row: dict[str, Any] = {"network": network, "territories": n, "status": None, "reason": None, "within_limit": False,
                           "wall_s": None, "setup_s": None, "rounds": None, "round_s": None, "final_s": None,
                           "outside_server_s": None, "bytes_per_territory": None, "bytes_per_round": None,
                           "peak_rss_mb": None, "peak_processes": None, "max_processes": None, "peak_breakdown": None,
                           "driver_rss_mb": None, "nodes_per_territory": None, "config_s": None, "overrides": overrides}
    run_dir = scratch / f"{network}-{n}"
    t0 = time.perf_counter()
    try:
        cfg = resolve_config(compose_config(overrides))  # fails fast: config, data, N within the sensors
    except Exception as e:
        row.update(status="failed", reason=f"config: {type(e).__name__}: {str(e)[:1500]}")
        return row
    row["config_s"] = round(time.perf_counter() - t0, 3)
    memory = TreeMemory()
    t0 = time.perf_counter()
    summary = None
    try:
        with memory:
            summary = run_simulation(overrides, run_dir, n, client_cpus=int(cfg["federation"]["client_cpus"]),
                                     timeout_s=args.timeout_s)
        row["status"] = "completed"
    except RunFailed as e:
        row["status"] = "timeout" if "did not finish within" in str(e) else "failed"
        row["reason"] = f"{e}\n--- server log tail ---\n{_tail(run_dir / 'logs' / 'server.log')}"
    except Exception as e:  # anything else: recorded, the next case runs
        row["status"] = "failed"
        row["reason"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}\n--- server log tail ---\n" \
                        f"{_tail(run_dir / 'logs' / 'server.log')}"
    wall = time.perf_counter() - t0
    row["wall_s"] = round(wall, 3)
    row["within_limit"] = row["status"] == "completed" and wall <= args.timeout_s
    if memory.samples:
        row.update(peak_rss_mb=round(memory.peak_bytes / 2**20, 1), peak_processes=memory.peak_processes,
                   max_processes=memory.max_processes, peak_breakdown=memory.peak_breakdown)
    row["driver_rss_mb"] = round(psutil.Process().memory_info().rss / 2**20, 1)
    if summary is not None:
        timing = summary["timing"]
        rounds = timing["rounds"]
        row.update(setup_s=timing["setup_s"], rounds=rounds, final_s=timing["final_s"],
                   round_s=round(sum(sum(v for k, v in r.items() if k.endswith("_s")) for r in rounds) / len(rounds), 4)
                   if rounds else None,
                   outside_server_s=round(wall - timing["setup_s"] - timing["rounds_s"] - timing["final_s"], 3))
        keys = ("train_down", "train_up", "evaluate_down", "evaluate_up")
        per = {k: _mean([r[f"bytes_{k}"] for r in rounds if r.get(f"bytes_{k}") is not None]) for k in keys}
        row["bytes_per_territory"] = per
        sizes = [summary["territories"][i]["num_nodes"] for i in range(len(summary["territories"]))]
        if all(v is not None for v in per.values()):
            row["bytes_per_round"] = round(sum(per.values()) * len(sizes))  # every territory gets and answers both messages
        row["nodes_per_territory"] = {"min": min(sizes), "max": max(sizes), "mean": round(sum(sizes) / len(sizes), 2)}
    shutil.rmtree(run_dir, ignore_errors=True)
    return row


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


# ---------------------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    f = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    m, s = report["machine"], report["settings"]
    lines = [f"Command: `{report['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, torch {m['torch']}, flwr {m['flwr']}. "
             f"{s['rounds']} round(s) of a DCRNN (model.hidden={s['hidden']}, one layer, K=2), FedAvg, one local epoch, "
             f"federation.client_cpus=1; limit per case {s['timeout_s']:.0f} s.", ""]
    for name, facts in report["networks"].items():
        lines.append(f"- `{name}`: " + ", ".join(f"{k} {v}" for k, v in facts.items()))
    lines += ["", "| network | territories | nodes per territory (min-max) | status | wall (s) | ServerApp setup (s) | "
              "round (s) | train (s) | evaluate (s) | final test (s) | outside ServerApp (s) | bytes per round (MB) | "
              "peak RSS, all processes (MB) | processes | within limit |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cases"]:
        r0 = (c["rounds"] or [{}])[0]
        npt = c["nodes_per_territory"]
        sizes = "n/a" if npt is None else f"{npt['min']}-{npt['max']}"
        lines.append(
            f"| {c['network']} | {c['territories']} | {sizes} | {c['status']} | "
            f"{f(c['wall_s'])} | {f(c['setup_s'])} | {f(c['round_s'])} | {f(r0.get('train_s'))} | {f(r0.get('evaluate_s'))} | "
            f"{f(c['final_s'])} | {f(c['outside_server_s'])} | "
            f"{f(None if c['bytes_per_round'] is None else c['bytes_per_round'] / 2**20, 2)} | {f(c['peak_rss_mb'], 0)} | "
            f"{c['max_processes'] if c['max_processes'] is not None else 'n/a'} | {'yes' if c['within_limit'] else 'no'} |")
    lines += ["", "Wall: the whole run as `run_simulation` sees it (SuperLink, Ray, ServerApp, results). Round: the "
              "ServerApp's round phases (training, aggregation, validation, checkpoint), mean over rounds; train/evaluate "
              "of round 1. Bytes per round: mean serialised message per territory (train and validation, down and up) "
              "times the territories. Peak RSS: the largest sum, over the run's processes sampled every 0.5 s, of their "
              "resident memory (shared pages counted in each process); this script's own memory is not in it."]
    peaks = [c for c in report["cases"] if c["peak_breakdown"]]
    if peaks:
        lines += ["", "Processes at the peak (count x summed RSS, MB):", ""]
        for c in peaks:
            parts = ", ".join(f"{k} {v['count']}x {v['rss_mb']:.0f}" for k, v in list(c["peak_breakdown"].items())[:6])
            lines.append(f"- {c['network']} N={c['territories']}: {parts}")
    lines += ["", "Limits found:", ""] + [f"- {line}" for line in limits(report)]
    bad = [c for c in report["cases"] if c["status"] != "completed"]
    if bad:
        lines += ["", "Cases that did not complete:", ""]
        for c in bad:
            first = (c["reason"] or "").strip().splitlines()[:3]
            lines.append(f"- {c['network']} N={c['territories']}: {c['status']}: {' / '.join(first)[:600]}")
    return "\n".join(lines) + "\n"


def limits(report: dict[str, Any]) -> list[str]:
    """Per network: the largest N that completed within the limit, the first that did not, how the
    ServerApp's setup and round time grow per territory, and the memory of one territory actor."""
    out = []
    for network in report["networks"]:
        cases = [c for c in report["cases"] if c["network"] == network]
        ok = [c for c in cases if c["within_limit"]]
        not_ok = [c for c in cases if not c["within_limit"]]
        text = f"{network}: " + (f"largest N within the limit {max(c['territories'] for c in ok)}" if ok else "no case within the limit")
        if not_ok:
            c = min(not_ok, key=lambda c: c["territories"])
            text += f"; first N not within it: {c['territories']} ({c['status']})"
        if len(ok) >= 2:
            a, b = min(ok, key=lambda c: c["territories"]), max(ok, key=lambda c: c["territories"])
            dn = b["territories"] - a["territories"]
            grow = [(k, (b[k] - a[k]) / dn) for k in ("setup_s", "round_s", "final_s", "wall_s") if a[k] is not None and b[k] is not None]
            text += "; per added territory: " + ", ".join(f"{k} {v:+.3f} s" for k, v in grow)
        actors = [(c["territories"], v) for c in cases if c["peak_breakdown"] for k, v in c["peak_breakdown"].items()
                  if k.startswith("ray::ClientAppActor") and v["count"]]
        if actors:
            text += "; Ray territory actors at the peak: " + ", ".join(
                f"N={n}: {v['count']} x {v['rss_mb'] / v['count']:.0f} MB" for n, v in actors)
        out.append(text)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--networks", nargs="+", choices=NETWORKS, default=None, help="networks (default: both; --tiny: synthetic)")
    ap.add_argument("--territories", nargs="+", type=int, default=None,
                    help="territory counts N (default 3 10 30 100 1000; --tiny: 2 3)")
    ap.add_argument("--rounds", type=int, default=1, help="federated rounds per case (train.rounds)")
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="limit per case, seconds (the run is stopped past it)")
    ap.add_argument("--out-dir", default=None, help="folder for scale.json/.md (default: a new temporary one)")
    ap.add_argument("--tiny", action="store_true", help="a 60-sensor synthetic network, 2 days, N in {2, 3}, model.hidden=8")
    ap.add_argument("--synthetic-nodes", type=int, default=None, help="sensors of the synthetic network (default 10000)")
    ap.add_argument("--synthetic-days", type=int, default=None, help="days of 5-minute data (default 4)")
    ap.add_argument("--hidden", type=int, default=None, help="model.hidden of the DCRNN (default 16)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic network and of the runs")
    ap.add_argument("overrides", nargs="*", help="more Hydra overrides for every case")
    args = ap.parse_args(argv)
    networks = args.networks or (["synthetic"] if args.tiny else list(NETWORKS))
    counts = args.territories or ([2, 3] if args.tiny else [3, 10, 30, 100, 1000])
    nodes = args.synthetic_nodes or (60 if args.tiny else 10_000)
    days = args.synthetic_days or (2 if args.tiny else 4)
    hidden = args.hidden or (8 if args.tiny else 16)

    from fedldt.config import compose_config, resolve_config

    out = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="fedldt-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    common = [f"train.rounds={args.rounds}", f"model.hidden={hidden}", f"seed={args.seed}",
              f"federation.timeout_s={max(int(args.timeout_s), 1)}", *args.overrides]
    report: dict[str, Any] = {
        "command": shlex.join([".venv/bin/python", "scripts/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "settings": {"rounds": args.rounds, "timeout_s": args.timeout_s, "hidden": hidden, "common_overrides": common,
                     "synthetic_nodes": nodes if "synthetic" in networks else None,
                     "synthetic_days": days if "synthetic" in networks else None},
        "networks": {}, "cases": []}
    with tempfile.TemporaryDirectory(prefix="fedldt-scale-run-") as tmp:
        scratch = Path(tmp)
        for network in networks:
            package = None
            if network == "synthetic":
                t0 = time.perf_counter()
                package = scratch / "synthetic_road"
                facts = write_synthetic_road(package, nodes, days, seed=args.seed)
                facts["written_s"] = round(time.perf_counter() - t0, 2)
            else:
                facts = {}
            base = network_overrides(network, package)
            try:
                cfg = resolve_config(compose_config([*base, *common]))
                facts.update(network_facts(cfg))
            except Exception as e:
                facts["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            report["networks"][network] = facts
            for n in counts:
                print(f"[bench_scale] {network}: {n} territories", flush=True)
                if "nodes" in facts and n > facts["nodes"]:
                    report["cases"].append({"network": network, "territories": n, "status": "skipped", "within_limit": False,
                                            "reason": f"{n} territories > {facts['nodes']} sensors (k-means needs a sensor "
                                                      "per territory)", **{k: None for k in (
                                                "wall_s", "setup_s", "rounds", "round_s", "final_s", "outside_server_s",
                                                "bytes_per_territory", "bytes_per_round", "peak_rss_mb", "peak_processes",
                                                "max_processes", "peak_breakdown", "driver_rss_mb", "nodes_per_territory",
                                                "config_s")}, "overrides": None})
                else:
                    report["cases"].append(run_case(network, n, [*base, f"partition.num_territories={n}", *common], args,
                                                    scratch))
                c = report["cases"][-1]
                print(f"[bench_scale] {network} N={n}: {c['status']}, wall {c['wall_s']} s, peak {c['peak_rss_mb']} MB",
                      flush=True)
                # written after every case: a benchmark stopped half-way keeps what it measured
                (out / "scale.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    write_report(out, "scale", report, markdown(report))
    return 0


if __name__ == "__main__":
    from fedldt.launch.provenance import guard_checkout
    from fedldt.launch.simulation import interruptible

    guard_checkout(__file__)  # this checkout's fedldt, or a clear error naming both
    with interruptible(" (scale.json holds the cases finished)"):
        raise SystemExit(main())
