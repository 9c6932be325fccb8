"""Training throughput and peak memory of fedldt's models next to reference implementations.

    python scripts/bench_models.py [--steps 20] [--warmup 3] [--batch-sizes 32 64] [--threads 2]
                                   [--models dcrnn stgcn gwnet] [--implementations fedldt tsl tsl-sparse pgt]
                                   [--lr 0.01] [--seed 0] [--val-windows N] [--no-memory] [--mem-jobs 2]
                                   [--out-dir docs/results/benchmarks] [--tiny] [--profile] [HYDRA_OVERRIDE ...]

What it measures, per model (``dcrnn``, ``gwnet``, ``stgcn`` with the hyper-parameters of
``conf/model/<name>.yaml``), batch size and implementation (``fedldt``; ``tsl``,
torch-spatiotemporal fed ``edge_index``/``edge_weight`` (its message passing); ``tsl-sparse``, the
same tsl model fed a torch_sparse ``SparseTensor`` adjacency built from them each step with tsl's
own ``convert_torch_connectivity(..., "sparse")`` (its sparse-matrix products, tsl's fast path);
``pgt``, PyTorch Geometric Temporal):

* ``windows_per_s``: training throughput, windows per second of wall-clock time, one step =
  forward, masked MAE loss on the scaled targets, backward, gradient clipping to
  ``train.grad_clip`` and an Adam step (as :func:`fedldt.engine.train_epochs` trains). The
  implementations of a model train in one process on the same batches, their steps interleaved
  (fedldt step, tsl step, tsl-sparse step, pgt step, fedldt step, ...) so that machine noise hits them alike;
  ``--warmup`` steps are trained but not timed; ``steps`` are the timed ones.
  ``fedldt_over_ref`` (reference rows) is fedldt's windows/s divided by the reference's.
* ``val_mae``: validation masked MAE in data units (mph for Los-loop) of each implementation
  after the same ``warmup + steps`` training steps (same batches, same learning rate, Adam):
  a fairness check, not a result (far from converged). Every implementation's output must have
  fedldt's shape ``[batch, horizon, node, channel]``, or its row is marked failed.
* ``peak_mem_mb``: peak resident set size (MiB) of a fresh subprocess per (model,
  implementation, batch) that loads the data, builds that one model and trains it for a few
  steps: the kernel's ``VmHWM`` (``/proc/self/status``), reset through ``/proc/self/clear_refs``
  after the data is loaded, so data loading does not set it (``resource.getrusage`` ``ru_maxrss``
  where the reset is not possible: then it includes data loading). ``peak_mem_over_baseline_mb``
  subtracts the process's RSS just before the model is built (Python, torch, the library, data).
  These processes run after the timing, ``--mem-jobs`` at a time (a process's RSS is its own).

Data: Los-loop as fedldt loads it (``conf/dataset/los_loop.yaml``, ``fedldt.config.load_territories``)
with the whole 207-sensor graph as one territory (``partition.num_territories=1``), window 12,
horizon 12 (``task.*`` of ``conf/config.yaml``); positional arguments are further Hydra overrides
(e.g. ``paths.data_root=/abs/shared/data``). ``--tiny``: a small subgraph (32 sensors reached
breadth-first from the first), 1 warm-up and 2 timed steps at batch 8, ``val_mae`` on the first 64
validation windows, output to ``outputs/benchmarks_tiny`` (the test's setting).

A reference library that cannot be imported gives rows ``not installed: <ImportError text>``; an
architecture the library does not have (tsl has no STGCN, pgt no Graph WaveNet), ``not available:
...``; one whose import raises something else, ``import failed: ...``; one that fails while
training or gives another output shape, ``failed: ...`` (the other rows are still measured).
The references need torch-scatter/torch-sparse built for this torch: ``pip install
--no-build-isolation torch-scatter torch-sparse``, then ``pip install -c constraints.txt -e
".[bench]"`` (``pyproject.toml``). The adapters below build each reference with fedldt's sizes;
each row's ``notes`` say where the architectures still differ.

Outputs in ``--out-dir``: ``models.json`` (machine, command, rows) and ``models.md`` (the table);
the table is printed too.

``--profile``: no timing table; instead ``torch.profiler`` over 3 training steps of each
implementation (after ``--warmup``), per model, at the first batch size: CPU time per step, the
share of matrix products and the operators with the most self time, to ``profile.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from fedldt.config import checkout_root, compose_config, load_territories, resolve_config
from fedldt.data.windows import collate
from fedldt.engine import TerritoryTask, masked_mae_loss, seed_everything, task_from_config
from fedldt.launch.measure import run_python
from fedldt.metrics import MetricSums, mae, masked_error_sums
from fedldt.models import MODELS, build_model
from fedldt.models.stgcn import undirected_graph

IMPLEMENTATIONS = ("fedldt", "tsl", "tsl-sparse", "pgt")
#: the module each reference's adapters import (imported before a memory process's baseline is taken)
LIBRARY_MODULES = {"tsl": "tsl.nn.models", "tsl-sparse": "tsl.nn.models", "pgt": "torch_geometric_temporal.nn"}
MEM_STEPS = 3  # training steps of a memory subprocess (Adam's state exists from the first step on)
TINY = {"steps": 2, "warmup": 1, "batch_sizes": [8], "nodes": 32, "val_windows": 64}
MEM_METHOD = ("peak RSS of a fresh subprocess per (model, implementation, batch) that loads the data, builds "
              f"the model and trains it {MEM_STEPS} steps: VmHWM of /proc/self/status, reset via "
              "/proc/self/clear_refs after data loading (ru_maxrss of resource.getrusage where the reset fails)")


class Unavailable(Exception):
    """The library has no implementation of this architecture (a ``not available`` row)."""


# ---------------------------------------------------------------------------------------------- adapters
# Each builder takes fedldt's model config (with the data sizes) and the number of nodes and returns
# (module, notes); the module is called as fedldt's models are, model(x [B, T, N, F], edge_index,
# edge_weight) -> [B, H, N, C]. Written from the libraries' documented signatures (tsl 0.9.5,
# torch_geometric_temporal 0.56).

def tsl_dcrnn(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    from tsl.nn.models import DCRNNModel

    model = DCRNNModel(input_size=cfg["in_channels"], output_size=cfg["out_channels"], horizon=cfg["horizon"],
                       hidden_size=cfg["hidden"], kernel_size=cfg["K"], ff_size=cfg["hidden"],
                       n_layers=cfg["num_layers"], dropout=cfg["dropout"])
    return model, ("tsl adds a linear input encoder (in -> hidden) and reads out with an MLP "
                   f"(hidden -> ff_size={cfg['hidden']} -> horizon*C) where fedldt has one linear layer")


def tsl_gwnet(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    from tsl.nn.models import GraphWaveNetModel

    model = GraphWaveNetModel(input_size=cfg["in_channels"], output_size=cfg["out_channels"], horizon=cfg["horizon"],
                              hidden_size=cfg["residual_channels"], ff_size=cfg["skip_channels"],
                              n_layers=cfg["blocks"] * cfg["layers"], temporal_kernel_size=cfg["kernel_size"],
                              spatial_kernel_size=cfg["order"], learned_adjacency=cfg["adaptive"],
                              n_nodes=num_nodes if cfg["adaptive"] else None, emb_size=cfg["emb_dim"],
                              dilation=2, dilation_mod=cfg["layers"], norm="batch", dropout=cfg["dropout"])
    notes = ["tsl's readout MLP is ff_size -> 2*ff_size -> horizon*C"]
    if cfg["end_channels"] != 2 * cfg["skip_channels"]:
        notes.append(f"(fedldt end_channels={cfg['end_channels']}, tsl uses {2 * cfg['skip_channels']})")
    if cfg["dilation_channels"] != cfg["residual_channels"]:
        notes.append(f"tsl's gated TCN has hidden_size={cfg['residual_channels']} channels "
                     f"(fedldt dilation_channels={cfg['dilation_channels']})")
    notes.append("input encoder: a linear layer (fedldt: 1x1 convolution, the same map)")
    return model, "; ".join(notes)


def tsl_stgcn(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    raise Unavailable("tsl has no STGCN model (its STCNModel interleaves diffusion convolutions: another architecture)")


class TslSparse(nn.Module):
    """A tsl model fed the graph as a torch_sparse ``SparseTensor`` (the transposed adjacency,
    row = target, built each step from ``edge_index``/``edge_weight`` by tsl's
    ``convert_torch_connectivity``, as fedldt builds its operators each step): tsl's sparse-matrix
    products instead of its message passing over ``edge_index``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from tsl.ops.connectivity import convert_torch_connectivity

        self.model, self.convert = model, convert_torch_connectivity

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        adj_t = self.convert((edge_index, edge_weight), "sparse", input_layout="edge_index", num_nodes=x.shape[2])
        return self.model(x, adj_t)


def tsl_sparse_dcrnn(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    model, notes = tsl_dcrnn(cfg, num_nodes)
    model.cache_support = True  # the graph is fixed: tsl's fastest setting (the tsl row keeps its default, False)
    return TslSparse(model), (notes + "; adjacency as a torch_sparse SparseTensor, its supports computed once "
                              "(cache_support=True; default False recomputes them at every gate and step)")


def tsl_sparse_gwnet(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    model, notes = tsl_gwnet(cfg, num_nodes)
    return TslSparse(model), notes + "; adjacency as a torch_sparse SparseTensor"


class PGTDCRNN(nn.Module):
    """fedldt's DCRNN layout on PyTorch Geometric Temporal's ``BatchedDCRNN`` (DCGRU encoder over
    ``[B, T, N, F]``) with the same per-node linear readout of the last hidden state."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        from torch_geometric_temporal.nn.recurrent import BatchedDCRNN

        self.horizon, self.out_channels = cfg["horizon"], cfg["out_channels"]
        dims = [cfg["in_channels"]] + [cfg["hidden"]] * cfg["num_layers"]
        # pgt's K counts the 0-hop term: K = fedldt's diffusion steps + 1
        self.layers = nn.ModuleList(BatchedDCRNN(dims[i], cfg["hidden"], K=cfg["K"] + 1) for i in range(cfg["num_layers"]))
        self.dropout = nn.Dropout(cfg["dropout"])
        self.readout = nn.Linear(cfg["hidden"], cfg["horizon"] * cfg["out_channels"])

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        b, _, n, _ = x.shape
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], dtype=x.dtype)
        h = x
        for layer in self.layers:
            h = layer(h, edge_index, edge_weight)  # [B, T, N, hidden]
        out = self.readout(self.dropout(h[:, -1]))  # [B, N, H*C]
        return out.view(b, n, self.horizon, self.out_channels).permute(0, 2, 1, 3)  # [B, H, N, C]


def pgt_dcrnn(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    return PGTDCRNN(cfg), (f"BatchedDCRNN with K={cfg['K'] + 1} (pgt's K counts the 0-hop term): pgt gives each "
                           "direction its own 0-hop weight (2K+2 weight blocks per convolution where fedldt has 2K+1) "
                           "and its update and reset gates separate convolutions; for K>2 its diffusion terms follow a "
                           "Chebyshev-like recursion, not powers of the transition matrix")


class PGTSTGCN(nn.Module):
    """fedldt's STGCN layout on PyTorch Geometric Temporal's ``STConv`` blocks and ``TemporalConv``
    output layer, with fedldt's head (LayerNorm over channels, two linear layers, all horizon steps)
    and fedldt's undirected graph."""

    def __init__(self, cfg: dict[str, Any], num_nodes: int) -> None:
        super().__init__()
        from torch_geometric_temporal.nn.attention import STConv, TemporalConv

        c_t, c_s = cfg["temporal_channels"], cfg["spatial_channels"]
        self.horizon, self.out_channels = cfg["horizon"], cfg["out_channels"]
        self.blocks = nn.ModuleList(
            STConv(num_nodes, cfg["in_channels"] if i == 0 else c_t, c_s, c_t, kernel_size=cfg["Kt"], K=cfg["Ks"])
            for i in range(cfg["num_blocks"]))
        self.dropout = nn.Dropout(cfg["dropout"])
        self.out_temporal = TemporalConv(c_t, c_t, kernel_size=cfg["output_kernel"])
        self.out_norm = nn.LayerNorm(c_t)
        self.out_fc = nn.Sequential(nn.Linear(c_t, c_t), nn.ReLU(), nn.Linear(c_t, cfg["horizon"] * cfg["out_channels"]))

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor | None) -> Tensor:
        b, _, n, _ = x.shape
        if edge_weight is None:
            edge_weight = torch.ones(edge_index.shape[1], dtype=x.dtype)
        edge_index, edge_weight = undirected_graph(edge_index, edge_weight, n)
        h = x
        for block in self.blocks:
            h = self.dropout(block(h, edge_index, edge_weight))  # [B, T', N, c_t]
        h = self.out_temporal(h)[:, -1]  # [B, N, c_t] (last step)
        out = self.out_fc(self.out_norm(h))  # [B, N, H*C]
        return out.view(b, n, self.horizon, self.out_channels).permute(0, 2, 1, 3)  # [B, H, N, C]


def pgt_stgcn(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    return PGTSTGCN(cfg, num_nodes), (
        f"STConv(hidden_channels={cfg['spatial_channels']}, out_channels={cfg['temporal_channels']}): pgt's first "
        f"temporal conv outputs {cfg['spatial_channels']} channels and its Chebyshev conv keeps them (fedldt: "
        f"{cfg['temporal_channels']} -> {cfg['spatial_channels']}); pgt normalises with BatchNorm over nodes (fedldt: "
        "LayerNorm over channels), runs ChebConv once per (batch item, step) and its GLU is relu(P*sigmoid(Q)+conv(x))")


def pgt_gwnet(cfg: dict[str, Any], num_nodes: int) -> tuple[nn.Module, str]:
    raise Unavailable("torch_geometric_temporal has no Graph WaveNet model")


ADAPTERS: dict[tuple[str, str], Callable[[dict[str, Any], int], tuple[nn.Module, str]]] = {
    ("tsl", "dcrnn"): tsl_dcrnn, ("tsl", "gwnet"): tsl_gwnet, ("tsl", "stgcn"): tsl_stgcn,
    ("tsl-sparse", "dcrnn"): tsl_sparse_dcrnn, ("tsl-sparse", "gwnet"): tsl_sparse_gwnet,
    ("tsl-sparse", "stgcn"): tsl_stgcn,
    ("pgt", "dcrnn"): pgt_dcrnn, ("pgt", "gwnet"): pgt_gwnet, ("pgt", "stgcn"): pgt_stgcn,
}


def build(impl: str, model_cfg: dict[str, Any], num_nodes: int, seed: int) -> tuple[nn.Module, str]:
    """One implementation of ``model_cfg["name"]``, weights drawn after ``seed_everything(seed)``.

    Raises:
        Unavailable: the library has no such architecture.
        ImportError (or another exception of the library's import): the library is not usable.
    """
    seed_everything(seed)
    if impl == "fedldt":
        return build_model(model_cfg, num_nodes=num_nodes), ""
    model, notes = ADAPTERS[(impl, model_cfg["name"])]({k: v for k, v in model_cfg.items() if k != "_target_"},
                                                      num_nodes)
    if model_cfg.get("residual"):
        notes += "; model.residual=true is not applied to the reference (it forecasts values, not changes)"
    return model, notes


def unusable(exc: BaseException) -> str:
    """The row status of a reference that could not be built."""
    if isinstance(exc, Unavailable):
        return f"not available: {exc}"
    if isinstance(exc, ImportError):
        return f"not installed: {exc}"
    return f"import failed: {type(exc).__name__}: {exc}"


# ---------------------------------------------------------------------------------------------- data
def load_task(models: list[str], overrides: list[str], tiny: bool
              ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], TerritoryTask]:
    """``(model configs, train config, task)``: the Los-loop task as fedldt builds it, the whole
    graph as one territory (``--tiny``: its induced subgraph on 32 nodes reached breadth-first from
    node 0), and each model's config (``conf/model/<name>.yaml``) with the data sizes injected."""
    base = ["pilot=los_loop_3", "partition.num_territories=1", "task.window=12", "task.horizon=12", *overrides]
    cfgs = {m: resolve_config(compose_config([*base, f"model={m}"])) for m in models}
    cfg = cfgs[models[0]]
    territory = load_territories(cfg)[0]
    if tiny:
        territory = territory.subset(breadth_first(territory.edge_index, territory.num_nodes, TINY["nodes"]), "tiny")
    task = task_from_config(territory, cfg["task"], cfg["train"], cfg["dataset"].get("valid_range"))
    return {m: {**c["model"], **task.model_dims()} for m, c in cfgs.items()}, cfg["train"], task


def breadth_first(edge_index: Tensor, num_nodes: int, size: int) -> list[int]:
    """``size`` nodes reached breadth-first from node 0 over the edges taken both ways (a connected
    piece of the graph; topped up with the lowest other nodes where it is smaller), sorted."""
    neighbours: list[set[int]] = [set() for _ in range(num_nodes)]
    for a, b in edge_index.t().tolist():
        neighbours[a].add(b)
        neighbours[b].add(a)
    seen, queue = [0], [0]
    while queue and len(seen) < size:
        for v in sorted(neighbours[queue.pop(0)]):
            if v not in seen and len(seen) < size:
                seen.append(v)
                queue.append(v)
    seen += [v for v in range(num_nodes) if v not in seen][: max(0, size - len(seen))]
    return sorted(seen)


def train_batches(task: TerritoryTask, batch: int, count: int, seed: int) -> list:
    """``count`` shuffled training batches (the loader cycled), the same for every implementation."""
    out: list = []
    epoch = 0
    while len(out) < count:
        gen = torch.Generator().manual_seed(seed + epoch)
        loader = DataLoader(task.windows["train"], batch_size=batch, shuffle=True, generator=gen, collate_fn=collate,
                            drop_last=len(task.windows["train"]) >= batch)
        out.extend(b for _, b in zip(range(count - len(out)), loader))
        epoch += 1
    return out


def train_step(model: nn.Module, opt: torch.optim.Optimizer, task: TerritoryTask, batch, grad_clip: float | None) -> Tensor:
    """One training step as :func:`fedldt.engine.train_epochs` takes it; returns the output."""
    opt.zero_grad()
    y_hat = model(batch.x, task.edge_index, task.edge_weight)  # [B, H, N, C]
    loss = masked_mae_loss(y_hat, batch.y_scaled, batch.mask)
    loss.backward()
    if grad_clip:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return y_hat.detach()


def val_mae(task: TerritoryTask, model: nn.Module | None, limit: int | None) -> float | None:
    """Validation masked MAE in data units over the first ``limit`` validation windows (all with
    ``None``), forecasts as fedldt makes them (:meth:`TerritoryTask.predict`: scaled back, clipped
    to the valid range); ``model=None``: the persistence forecast (last observed value)."""
    windows = task.windows["val"]
    if limit is not None:
        windows = Subset(windows, range(min(limit, len(windows))))
    total = MetricSums.zeros(task.horizon)
    for batch in DataLoader(windows, batch_size=task.eval_batch_size, collate_fn=collate):
        y_hat = batch.last.unsqueeze(1).expand_as(batch.y) if model is None else task.predict(model, batch)
        total = total + masked_error_sums(y_hat, batch.y, batch.mask)
    return mae(total)


# ---------------------------------------------------------------------------------------------- memory
def rss_mb() -> float:
    """Current resident set size of this process, MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (``VmHWM``), MiB; ``ru_maxrss`` without ``/proc``."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(args: argparse.Namespace) -> None:
    """``--mem-child MODEL IMPL BATCH``: train one model a few steps in this fresh process and
    print ``{"peak_mem_mb", "baseline_mb", "reset"}`` as one JSON line."""
    name, impl, batch = args.mem_child[0], args.mem_child[1], int(args.mem_child[2])
    torch.set_num_threads(args.threads)
    cfgs, train_cfg, task = load_task([name], args.overrides, args.tiny)
    if impl != "fedldt":
        importlib.import_module(LIBRARY_MODULES[impl])  # the library's import counts in the baseline, not in the peak
    batches = train_batches(task, batch, MEM_STEPS, args.seed)
    reset = reset_peak_rss()
    baseline = rss_mb()
    model, _ = build(impl, cfgs[name], task.dataset.num_nodes, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for b in batches:
        train_step(model, opt, task, b, train_cfg.get("grad_clip"))
    print(json.dumps({"peak_mem_mb": peak_rss_mb(), "baseline_mb": baseline, "reset": reset}))


def measure_memory(args: argparse.Namespace, name: str, impl: str, batch: int) -> dict[str, Any]:
    """Run :func:`memory_child` in a fresh interpreter; ``{"error": ...}`` when it fails."""
    child = ["--mem-child", name, impl, batch, "--threads", args.threads, "--lr", args.lr, "--seed", args.seed,
             *(["--tiny"] if args.tiny else []), *args.overrides]
    threads = str(args.threads)
    try:
        proc = run_python(Path(__file__).resolve(), child, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    except TimeoutError as exc:
        return {"error": str(exc)}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1][:300]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------------------------- timing
def bench_model(args: argparse.Namespace, model_cfg: dict[str, Any], grad_clip: float | None, task: TerritoryTask,
                batch: int, impls: list[str]) -> list[dict[str, Any]]:
    """Rows of one model and batch size: every implementation trained on the same batches, steps
    interleaved, the last ``args.steps`` of each timed; then the validation MAE of each."""
    name, n = model_cfg["name"], task.dataset.num_nodes
    expected = [batch, task.horizon, n, task.out_channels]
    rows: dict[str, dict[str, Any]] = {}
    live: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for impl in impls:
        row = rows[impl] = {"model": name, "implementation": impl, "batch": batch, "status": "ok", "windows_per_s": None,
                            "fedldt_over_ref": None, "step_ms_median": None, "peak_mem_mb": None,
                            "peak_mem_over_baseline_mb": None, "val_mae": None, "steps": 0, "warmup": 0,
                            "params": None, "output_shape": None, "notes": ""}
        try:
            model, row["notes"] = build(impl, model_cfg, n, args.seed)
        except Exception as exc:  # noqa: BLE001  # a reference library that is missing or fails to import
            if impl == "fedldt":
                raise
            row["status"] = unusable(exc)
            continue
        row["params"] = sum(p.numel() for p in model.parameters())
        live[impl] = (model.train(), torch.optim.Adam(model.parameters(), lr=args.lr))
    times: dict[str, list[float]] = {impl: [] for impl in live}
    for i, b in enumerate(train_batches(task, batch, args.warmup + args.steps, args.seed)):
        for impl in list(live):
            model, opt = live[impl]
            try:
                t0 = time.perf_counter()
                y_hat = train_step(model, opt, task, b, grad_clip)
                elapsed = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001
                if impl == "fedldt":
                    raise
                rows[impl]["status"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                del live[impl]
                continue
            rows[impl]["output_shape"] = list(y_hat.shape)
            if list(y_hat.shape) != expected:
                rows[impl]["status"] = f"failed: output shape {list(y_hat.shape)}, fedldt's is {expected}"
                del live[impl]
                continue
            if i >= args.warmup:
                times[impl].append(elapsed)
    for impl, (model, _) in live.items():
        row, t = rows[impl], times[impl]
        row.update(steps=len(t), warmup=args.warmup, windows_per_s=batch * len(t) / sum(t) if t else None,
                   step_ms_median=1000 * statistics.median(t) if t else None,
                   val_mae=val_mae(task, model, args.val_windows))
    fedldt_wps = rows["fedldt"]["windows_per_s"]
    for impl, row in rows.items():
        if impl != "fedldt" and row["windows_per_s"] and fedldt_wps:
            row["fedldt_over_ref"] = fedldt_wps / row["windows_per_s"]
    return list(rows.values())


# ---------------------------------------------------------------------------------------------- profile
#: operators that are matrix products (dense, sparse CSR/COO, torch_sparse's, batched, convolutions)
#: with their backward: the work every implementation of an architecture must do, against everything
#: else (elementwise maps, copies, normalisation, autograd bookkeeping)
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_sparse_mm", "aten::_sparse_addmm",
               "aten::_sparse_csr_mm", "aten::addmm_", "aten::spmm", "torch_sparse::spmm_sum",
               "torch::autograd::CppNode<SPMMSum>", "aten::mkldnn_convolution", "aten::convolution_backward")
PROFILE_STEPS = 3


def profile_models(args: argparse.Namespace, cfgs: dict[str, dict[str, Any]], grad_clip: float | None,
                   task: TerritoryTask, command: str) -> str:
    """``--profile``: ``torch.profiler`` tables of :data:`PROFILE_STEPS` training steps (after
    ``--warmup`` steps) of each implementation, per model, at the first batch size: CPU time per
    step, the share of matrix products (:data:`PRODUCT_OPS`, self time) and the operators with the
    most self time. Returns the markdown."""
    from torch.profiler import ProfilerActivity, profile

    batch = args.batch_sizes[0]
    lines = ["# Where a training step's time goes: torch.profiler, fedldt and the references", "",
             f"Command: `{command}`", "",
             f"{PROFILE_STEPS} profiled training steps (after {args.warmup} warm-up steps) per implementation, batch "
             f"{batch}, {args.threads} torch threads, Los-loop as in models.md. Self CPU time: time in an operator "
             "itself, not its children; matrix products (their share is the work every implementation must do): " + ", ".join(f"`{o}`" for o in PRODUCT_OPS) + ".", ""]
    for name in args.models:
        lines += [f"## {name}", ""]
        for impl in args.implementations:
            try:
                model, _ = build(impl, cfgs[name], task.dataset.num_nodes, args.seed)
            except Exception as exc:  # noqa: BLE001  # a reference library that is missing or fails to import
                lines += [f"### {impl}: {unusable(exc)}", ""]
                continue
            opt = torch.optim.Adam(model.train().parameters(), lr=args.lr)
            batches = train_batches(task, batch, args.warmup + PROFILE_STEPS, args.seed)
            for b in batches[: args.warmup]:
                train_step(model, opt, task, b, grad_clip)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for b in batches[args.warmup:]:
                    train_step(model, opt, task, b, grad_clip)
                wall = (time.perf_counter() - t0) / PROFILE_STEPS
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1000 / PROFILE_STEPS  # ms per step
            products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCT_OPS) / 1000 / PROFILE_STEPS
            lines += [f"### {impl}: {1000 * wall:.0f} ms per step under the profiler; self CPU {total:.0f} ms per step, "
                      f"matrix products {products:.0f} ms ({100 * products / total:.0f} %), the rest "
                      f"{total - products:.0f} ms", "",
                      "| operator | self CPU ms per step | share | calls per step |", "|---|---:|---:|---:|"]
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
                ms = e.self_cpu_time_total / 1000 / PROFILE_STEPS
                lines.append(f"| `{e.key}` | {ms:.1f} | {100 * ms / total:.1f} % | {e.count / PROFILE_STEPS:g} |")
            lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- report
def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine(threads: int) -> dict[str, Any]:
    """CPU model, cores, library versions, the thread count and the load average."""
    cpu = None
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or None, "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "threads": threads, "torch_num_threads": torch.get_num_threads(), "torch": torch.__version__,
            "torch_geometric": version("torch-geometric"), "torch_spatiotemporal": version("torch-spatiotemporal"),
            "torch_geometric_temporal": version("torch-geometric-temporal"), "torch_scatter": version("torch-scatter"),
            "torch_sparse": version("torch-sparse"), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": list(os.getloadavg())}


def fmt(value: Any, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Training throughput and peak memory of fedldt's models and reference implementations", "",
        f"Command: `{result['command']}`", "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), torch {m['torch']}, "
        f"{m['threads']} torch threads; load average {fmt(m['loadavg_start'][0], 2)} at the start, "
        f"{fmt(m['loadavg_end'][0], 2)} at the end. {result['started']} to {result['finished']}.", "",
        f"Data: {result['data']['description']}. Windows/s: forward + masked MAE + backward + gradient clipping + Adam "
        f"step, {result['steps']} timed steps after {result['warmup']} warm-up steps, implementations interleaved "
        "step by step on the same batches. fedldt/ref: fedldt's windows/s over the reference's (above 1: fedldt is "
        f"faster). Val MAE: validation masked MAE (mph) after the same {result['steps'] + result['warmup']} steps, "
        f"lr {result['lr']}, Adam (a fairness check, not converged; persistence forecast: "
        f"{fmt(result['data']['persistence_val_mae'], 2)}, on {result['data']['val_windows_scored']} windows). "
        f"Memory: {result['memory_method']}; Δ: over the RSS before the model was built.", "",
        "| model | implementation | batch | windows/s | fedldt/ref | step ms (median) | peak RSS MiB | Δ MiB | val MAE | params | status |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['implementation']} | {r['batch']} | {fmt(r['windows_per_s'])} | "
                     f"{fmt(r['fedldt_over_ref'], 2)} | {fmt(r['step_ms_median'])} | {fmt(r['peak_mem_mb'], 0)} | "
                     f"{fmt(r['peak_mem_over_baseline_mb'], 0)} | {fmt(r['val_mae'], 2)} | "
                     f"{'–' if r['params'] is None else r['params']} | {r['status'].replace('|', '/')} |")
    notes = sorted({(r["model"], r["implementation"], r["notes"]) for r in result["rows"] if r["notes"]})
    if notes:
        lines += ["", "Where the reference architectures differ from fedldt's:", ""]
        lines += [f"- {model}, {impl}: {text}" for model, impl, text in notes]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per implementation (default 20; --tiny 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps first (default 3; --tiny 1)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 32 64 (--tiny 8)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, every implementation (default 2)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS),
                   help="fedldt is always included")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate, every implementation (train.lr)")
    p.add_argument("--seed", type=int, default=0, help="weights and batch order")
    p.add_argument("--val-windows", type=int, default=None,
                   help="score val_mae on the first N validation windows (default: all; --tiny 64)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    p.add_argument("--mem-jobs", type=int, default=2, help="memory subprocesses run at once (default 2)")
    p.add_argument("--out-dir", default=None,
                   help="default docs/results/benchmarks of the checkout (--tiny: outputs/benchmarks_tiny)")
    p.add_argument("--tiny", action="store_true", help="a few steps on a small subgraph (the test)")
    p.add_argument("--profile", action="store_true",
                   help=f"instead of timing: torch.profiler tables of {PROFILE_STEPS} steps per implementation at the "
                        "first batch size, to profile.md in --out-dir")
    p.add_argument("--mem-child", nargs=3, metavar=("MODEL", "IMPL", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. paths.data_root=/abs/shared/data")
    args = p.parse_args(argv)
    args.steps = args.steps if args.steps is not None else (TINY["steps"] if args.tiny else 20)
    args.warmup = args.warmup if args.warmup is not None else (TINY["warmup"] if args.tiny else 3)
    args.batch_sizes = args.batch_sizes or (TINY["batch_sizes"] if args.tiny else [32, 64])
    if args.val_windows is None and args.tiny:
        args.val_windows = TINY["val_windows"]
    if args.val_windows is not None and args.val_windows < 1:
        p.error("--val-windows must be >= 1")
    if min(args.steps, args.threads, args.mem_jobs, *args.batch_sizes) < 1 or args.warmup < 0:
        p.error("--steps, --threads, --mem-jobs and --batch-sizes must be >= 1, --warmup >= 0")
    if "fedldt" not in args.implementations:
        args.implementations = ["fedldt", *args.implementations]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mem_child:
        memory_child(args)
        return 0
    root = checkout_root()
    out_dir = Path(args.out_dir) if args.out_dir else root / ("outputs/benchmarks_tiny" if args.tiny else "docs/results/benchmarks")
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    command = shlex.join(["python", str(shown), *(sys.argv[1:] if argv is None else argv)])
    result: dict[str, Any] = {"command": command, "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "machine": machine(args.threads), "steps": args.steps, "warmup": args.warmup, "lr": args.lr,
                              "seed": args.seed, "batch_sizes": args.batch_sizes, "memory_method": MEM_METHOD, "rows": []}
    cfgs, train_cfg, task = load_task(args.models, args.overrides, args.tiny)
    if args.profile:  # before the timing result's data block (its persistence MAE is not needed)
        text = profile_models(args, cfgs, train_cfg.get("grad_clip"), task, command)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "profile.md").write_text(text)
        print(text)
        print(f"written: {out_dir / 'profile.md'}", file=sys.stderr)
        return 0
    result["data"] = {
        "description": f"{task.dataset.name} of {task.dataset.source or 'the shared data'}: {task.dataset.num_nodes} "
                       f"sensors as one territory, window {task.window}, horizon {task.horizon}, "
                       f"{task.num_windows('train')} training and {task.num_windows('val')} validation windows"
                       + (f" (val_mae on the first {args.val_windows})" if args.val_windows else ""),
        "num_nodes": task.dataset.num_nodes, "window": task.window, "horizon": task.horizon,
        "train_windows": task.num_windows("train"), "val_windows": task.num_windows("val"),
        "val_windows_scored": min(args.val_windows or task.num_windows("val"), task.num_windows("val")),
        "persistence_val_mae": val_mae(task, None, args.val_windows), "overrides": args.overrides}
    result["models"] = {m: {k: v for k, v in cfgs[m].items() if k != "_target_"} for m in args.models}
    for name in args.models:
        for batch in args.batch_sizes:
            print(f"[bench] {name} batch {batch} ...", file=sys.stderr, flush=True)
            result["rows"].extend(bench_model(args, cfgs[name], train_cfg.get("grad_clip"), task, batch,
                                              args.implementations))
    if not args.no_memory:  # after the timing; a fresh process per row, --mem-jobs at a time (RSS is per process)
        todo = [row for row in result["rows"] if row["status"] == "ok"]
        with ThreadPoolExecutor(max_workers=args.mem_jobs) as pool:
            mems = list(pool.map(lambda r: measure_memory(args, r["model"], r["implementation"], r["batch"]), todo))
        for row, mem in zip(todo, mems):
            row["peak_mem_mb"] = mem.get("peak_mem_mb")
            if "baseline_mb" in mem:
                row["peak_mem_over_baseline_mb"] = mem["peak_mem_mb"] - mem["baseline_mb"]
            if "error" in mem:
                row["mem_error"] = mem["error"]
            if mem.get("reset") is False:
                row["mem_note"] = "peak RSS counter not reset: includes data loading"
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = finite(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "models.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    table = markdown(result)
    (out_dir / "models.md").write_text(table)
    print(table)
    print(f"written: {out_dir / 'models.json'}, {out_dir / 'models.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
