"""Shared fixtures: the real shared datasets, small synthetic territory files, the small config the
unit tests share, a real run folder of the los_loop_3 pilot made without Flower (one centralized round
on the real data, seconds) with a model package of it for the delivery tests, and one real federated
run of the pilot (made once per session, only by the tests that federate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
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


def write_territory_packages(base: Path, num_territories: int = 3, num_nodes: int = 12, num_steps: int = 300,
                             seed: int = 0) -> list[Path]:
    """Every territory's own data, as in a real federation: a :func:`write_los_loop_like` network
    split by ``fedldt partition --pilot los_loop_3`` (k-means, territories ``t0..t<K-1>``) into one
    territory data package per territory, each moved to a folder of its own,
    ``base/territory-<i>/t<i>``. The network and the partition report are removed, so ``base``
    holds nothing but the territories' folders, each with only its own package.

    Returns:
        The package folders, in territory order.
    """
    import shutil

    from fedldt.data.package_writer import partition_pilot

    scratch = base / "scratch"
    network = write_los_loop_like(scratch / "los_loop", num_nodes=num_nodes, num_steps=num_steps, seed=seed)
    partition_pilot("los_loop_3", scratch / "packages",
                    overrides=[f"dataset.path={network}", f"partition.num_territories={num_territories}"])
    folders = []
    for i in range(num_territories):
        (base / f"territory-{i}").mkdir(parents=True)
        folders.append(Path(shutil.move(scratch / "packages" / f"t{i}", base / f"territory-{i}" / f"t{i}")))
    shutil.rmtree(scratch)
    return folders


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    return write_los_loop_like(tmp_path / "synthetic")


#: What :func:`small_config` adds to the los_loop_3 pilot: two territories, a small DCRNN.
SMALL = ("partition.num_territories=2", "model.hidden=8")


def small_config(folder: Path | str, *extra: str) -> dict:
    """The resolved los_loop_3 config on the dataset at ``folder`` (e.g. :func:`write_los_loop_like`)
    with :data:`SMALL` and then ``extra`` Hydra overrides (later ones win)."""
    from fedldt.config import compose_config, resolve_config

    return resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", *SMALL, *extra]))


@pytest.fixture(scope="session")
def small_cfg():
    """:func:`small_config`, as a fixture: ``small_cfg(folder, *overrides) -> resolved config``."""
    return small_config


@dataclass
class SimulatedRun:
    """A finished ``scripts/simulate.py`` run: its folder and what the command printed."""

    path: Path
    returncode: int
    stdout: str
    stderr: str


#: Developers iterating on tests may point this at an existing los_loop_3 run folder to skip the
#: simulation (about 2-3 min on 2 cores); CI leaves it unset, so the suite runs the real simulation once.
REUSE_RUN_ENV = "FEDLDT_TEST_RUN_DIR"


@pytest.fixture(scope="session")
def los_loop_run(tmp_path_factory, data_root) -> SimulatedRun:
    """``scripts/simulate.py pilot=los_loop_3 train.rounds=2`` on the real data, once per session."""
    reuse = os.environ.get(REUSE_RUN_ENV)
    if reuse:
        run = Path(reuse)
        if json.loads((run / "summary.json").read_text())["pilot"] != "los_loop_3":
            pytest.fail(f"{REUSE_RUN_ENV}={reuse} is not a los_loop_3 run")
        out_file = run / "simulate.stdout"
        return SimulatedRun(run, 0, out_file.read_text() if out_file.is_file() else "", "")
    out = tmp_path_factory.mktemp("los_loop_3") / "run"
    proc = subprocess.run(
        [sys.executable, str(checkout_root() / "scripts" / "simulate.py"), "pilot=los_loop_3", "train.rounds=2",
         f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=900,
    )
    if out.is_dir():
        (out / "simulate.stdout").write_text(proc.stdout)
    return SimulatedRun(out, proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="session")
def federated_run(los_loop_run) -> Path:
    """The session's real federated los_loop_3 run folder, failing the test if the run did not finish."""
    if los_loop_run.returncode != 0:
        pytest.fail("the los_loop_3 run failed:\n" + los_loop_run.stdout[-3000:] + los_loop_run.stderr[-3000:])
    return los_loop_run.path


#: The run the delivery tests package: the los_loop_3 pilot on the real Los-loop data, one round of a
#: smaller DCRNN, trained centrally (no Flower): the results folder federated runs write, in seconds.
DELIVERY_RUN = ("pilot=los_loop_3", "train.rounds=1", "model.hidden=16")


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_root) -> Path:
    """A real, finished los_loop_3 run folder (``summary.json``, ``model.pt``, ``resolved_config.yaml``,
    ``history.csv``) written by ``fedldt.runner.run_mode(mode="centralized")`` on the real data with
    :data:`DELIVERY_RUN`: a real trained model and the run's own test metrics, without a Flower run.
    (``tests/test_export.py::test_export_of_a_real_federated_run`` exports from a Flower run.)"""
    from fedldt.config import compose_config, resolve_config
    from fedldt.runner import run_mode

    out = tmp_path_factory.mktemp("los_loop_3_centralized") / "run"
    run_mode(resolve_config(compose_config(list(DELIVERY_RUN))), list(DELIVERY_RUN), out, mode="centralized")
    return out


#: The territory whose model the delivery tests package, and the time zone of Los-loop's timestamps.
PACKAGED_TERRITORY = "t1"
LOS_LOOP_TZ = "America/Los_Angeles"


@pytest.fixture(scope="session")
def package_dir(finished_run, tmp_path_factory) -> Path:
    """``fedldt export RUN --territory t1 --timezone America/Los_Angeles`` of :func:`finished_run`."""
    from fedldt.delivery.export import export_package

    out = tmp_path_factory.mktemp("package") / PACKAGED_TERRITORY
    export_package(finished_run, PACKAGED_TERRITORY, out, timezone=LOS_LOOP_TZ)
    return out


@dataclass
class InRun:
    """What the run itself computes for the packaged territory: its task and the run's model."""

    task: object  # fedldt.engine.TerritoryTask
    model: object  # torch model with the run's final weights


@pytest.fixture(scope="session")
def in_run(finished_run) -> InRun:
    """The packaged territory rebuilt from the run's resolved config, and the run's model."""
    import torch
    import yaml

    from fedldt.config import load_territories
    from fedldt.engine import task_from_config
    from fedldt.models import build_model

    cfg = yaml.safe_load((finished_run / "resolved_config.yaml").read_text())
    territory = {t.name: t for t in load_territories(cfg)}[PACKAGED_TERRITORY]
    ckpt = torch.load(finished_run / "model.pt", weights_only=True)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return InRun(task_from_config(territory, cfg["task"], cfg["train"], cfg["dataset"].get("valid_range")), model.eval())


@pytest.fixture(scope="session")
def los_loop_3_simulation(los_loop_run) -> tuple[Path, SimulatedRun]:
    """``(results folder, the run)`` of the session's los_loop_3 simulation (``los_loop_run``),
    for the deployment test to compare against."""
    return los_loop_run.path, los_loop_run


@pytest.fixture(scope="session")
def body(in_run) -> dict:
    """A valid ``POST /forecast`` body: the 12 steps before 2012-03-07 08:00 of every sensor of the
    packaged territory, in the JSON table form."""
    ds = in_run.task.dataset
    end = int(ds.timestamps.get_loc(pd.Timestamp("2012-03-07 08:00")))
    return {"timestamps": [t.isoformat() for t in ds.timestamps[end - 12:end]],
            "sensors": {s: ds.values[end - 12:end, j, 0].astype(float).tolist() for j, s in enumerate(ds.node_ids)}}
