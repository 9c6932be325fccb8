"""Shared fixtures: the real shared datasets and small synthetic territory files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedldt.config import checkout_root

DATA_ROOT = (checkout_root() / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "los_loop" / "los_speed.csv").is_file():
        pytest.fail(f"shared data not found at {DATA_ROOT}: the fedldt checkout must sit next to shared/")
    return DATA_ROOT


def write_los_loop_like(folder: Path, num_nodes: int = 12, num_steps: int = 300, seed: int = 0) -> Path:
    """Write a small synthetic network in the Los-loop file layout (speed CSV, adjacency CSV,
    sensor locations): daily sinusoids plus noise, a ring graph, two spatial clusters."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    t = np.arange(num_steps)[:, None]
    phase = rng.uniform(0, 2 * np.pi, size=num_nodes)[None, :]
    speed = 50 + 10 * np.sin(2 * np.pi * t / 288 * 4 + phase) + rng.normal(0, 1, size=(num_steps, num_nodes))
    ids = [str(700000 + i) for i in range(num_nodes)]
    pd.DataFrame(speed, columns=ids).to_csv(folder / "los_speed.csv", index=False)
    adj = np.eye(num_nodes)
    for i in range(num_nodes):
        adj[i, (i + 1) % num_nodes] = adj[(i + 1) % num_nodes, i] = 0.5
    pd.DataFrame(adj).to_csv(folder / "los_adj.csv", header=False, index=False)
    loc_dir = folder / "metr_la_sensor_graph"
    loc_dir.mkdir(exist_ok=True)
    lat = np.where(np.arange(num_nodes) < num_nodes // 2, 34.0, 34.5) + rng.normal(0, 0.01, num_nodes)
    lon = -118.0 + rng.normal(0, 0.01, num_nodes)
    pd.DataFrame({"index": range(num_nodes), "sensor_id": ids, "latitude": lat, "longitude": lon}).to_csv(
        loc_dir / "graph_sensor_locations.csv", index=False
    )
    return folder


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    return write_los_loop_like(tmp_path / "synthetic")


@pytest.fixture(scope="session")
def los_loop_3_simulation(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    """``scripts/simulate.py pilot=los_loop_3 train.rounds=2`` (seed 0), run once per session:
    the end-to-end simulation test checks it, the deployment test compares against it.

    Returns:
        ``(results folder, completed process)``.
    """
    out = tmp_path_factory.mktemp("los_loop_3_sim") / "run"
    proc = subprocess.run(
        [sys.executable, str(checkout_root() / "scripts" / "simulate.py"), "pilot=los_loop_3", "train.rounds=2",
         f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=900,
    )
    return out, proc
