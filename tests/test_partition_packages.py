"""``fedldt partition`` and ``dataset=packages`` (issue 12 item 5): a pilot's territories written as
territory data packages load back bit for bit, and a run on them gives the built-in path's metrics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedldt.cli import main
from fedldt.config import compose_config, load_territories, resolve_config
from fedldt.data import TerritoryPackageError, load_package
from fedldt.data.package_writer import REPORT, PartitionError, border_edges, partition_pilot
from fedldt.data.windows import time_features
from fedldt.schema import ConfigError
from tests.conftest import LOS_LOOP_TZ, write_los_loop_like


@pytest.fixture(scope="session")
def los_loop_packages(tmp_path_factory, data_root) -> Path:
    """``fedldt partition --pilot los_loop_3 --timezone America/Los_Angeles`` on the real Los-loop data."""
    out = tmp_path_factory.mktemp("partition") / "los_loop_3"
    partition_pilot("los_loop_3", out, timezone=LOS_LOOP_TZ)
    return out


def packages_config(folder: Path, *extra: str) -> dict:
    return resolve_config(compose_config(["pilot=los_loop_3", "dataset=packages", f"dataset.path={folder}", *extra]))


def test_packages_equal_builtin_territories(los_loop_packages):
    """Every array of every territory read from its package equals the built-in path's, exactly."""
    builtin = load_territories(resolve_config(compose_config(["pilot=los_loop_3"])))
    cfg = packages_config(los_loop_packages)
    assert cfg["partition"] == {"_target_": "fedldt.data.partition.as_given", "num_territories": 3}
    packed = load_territories(cfg)
    assert [t.name for t in packed] == [t.name for t in builtin] == ["t0", "t1", "t2"]
    assert sorted(p.name for p in los_loop_packages.iterdir()) == ["partition.json", "t0", "t1", "t2"]
    for b, p in zip(builtin, packed):
        assert p.values.dtype == np.float32 and np.array_equal(p.values, b.values)
        assert np.array_equal(p.mask, b.mask)
        assert p.node_ids.tolist() == b.node_ids.tolist()
        assert torch.equal(p.edge_index, b.edge_index) and torch.equal(p.edge_weight, b.edge_weight)
        assert np.array_equal(p.coords, b.coords)
        assert p.units == b.units == ("mph",) and p.channels == b.channels == ("speed",)
        # same instants (Los-loop's naive stamps are Los Angeles time), same wall-clock covariates
        assert p.timestamps.equals(b.timestamps.tz_localize(LOS_LOOP_TZ))
        assert str(p.timestamps[0]) == "2012-03-01 00:00:00-08:00" and p.num_steps == 2016
        assert np.array_equal(time_features(p.timestamps, True, True), time_features(b.timestamps, True, True))
        assert p.extra["valid_range"] == {"speed": {"min": 0.0, "max": 120.0, "type": "number"}}


def test_border_edges_reported(los_loop_packages):
    """The dropped border edges per territory, counted here independently from the dense adjacency."""
    report = json.loads((los_loop_packages / REPORT).read_text())
    network = resolve_config(compose_config(["pilot=los_loop_3"]))
    from fedldt.config import DATASET_LOADERS, registered_call

    load, args = registered_call(network["dataset"], DATASET_LOADERS, "dataset")
    whole = load(**args)
    a = whole.adjacency() != 0
    np.fill_diagonal(a, False)
    index = pd.Index(whole.node_ids)
    total_cut = 0
    for c, t in zip(report["territories"], load_territories(network)):
        inside = np.zeros(whole.num_nodes, dtype=bool)
        inside[index.get_indexer(t.node_ids)] = True
        kept = int(a[np.ix_(inside, inside)].sum())
        cut = int(a[np.ix_(inside, ~inside)].sum() + a[np.ix_(~inside, inside)].sum())
        total_cut += cut
        assert (c["territory"], c["sensors"], c["edges_kept"], c["edges_dropped"]) == (t.name, t.num_nodes, kept, cut)
        assert c["share_dropped"] == round(cut / (kept + cut), 6)
    assert report["edges_total"] == int(a.sum()) == 2626
    assert report["edges_dropped"] == total_cut // 2 == 300
    assert report["share_dropped"] == round(300 / 2626, 6)
    assert [c["edges_dropped"] for c in report["territories"]] == [218, 300, 82]
    assert report["files"] == [f"t{k}/{f}" for k in range(3)
                               for f in ("territory.yaml", "observations.parquet", "sensors.csv", "edges.csv")]


def test_border_edges_known_answer():
    """A 4-node path 0-1-2-3 split {0,1} | {2,3}: the edge 1-2 (both directions) is cut."""
    from fedldt.data.territory import TerritoryDataset

    ei = torch.tensor([[0, 1, 1, 2, 2, 3], [1, 0, 2, 1, 3, 2]])
    whole = TerritoryDataset("net", np.zeros((3, 4, 1)), np.ones((3, 4, 1)), pd.date_range("2024-01-01", periods=3,
                             freq="5min"), ["a", "b", "c", "d"], ei, torch.ones(6))
    parts = [whole.subset([0, 1], "t0"), whole.subset([2, 3], "t1")]
    assert border_edges(whole, parts) == [
        {"territory": "t0", "sensors": 2, "edges_kept": 2, "edges_dropped": 2, "share_dropped": 0.5},
        {"territory": "t1", "sensors": 2, "edges_kept": 2, "edges_dropped": 2, "share_dropped": 0.5}]


#: The cheapest real run: one centralized round (no Flower) of a tiny DCRNN on every 16th training window.
TINY = ("train.rounds=1", "model.hidden=4", "task.train_stride=16")


def test_packages_run_gives_builtin_metrics(los_loop_packages, tmp_path):
    """A run from the written packages gives the built-in run's test metrics (same seed, to 1e-6),
    also those of persistence and the historical average."""
    from fedldt.runner import run_mode

    runs = {}
    for path, extra in (("builtin", []), ("packages", ["dataset=packages", f"dataset.path={los_loop_packages}"])):
        overrides = ["pilot=los_loop_3", *extra, *TINY]
        runs[path] = run_mode(resolve_config(compose_config(overrides)), overrides, tmp_path / path, mode="centralized")
    assert runs["packages"]["dataset"]["name"] == "packages" and runs["builtin"]["dataset"]["name"] == "los_loop"
    assert runs["packages"]["territories"] == runs["builtin"]["territories"]  # ids, sizes, window counts
    assert [t["id"] for t in runs["builtin"]["territories"]] == ["t0", "t1", "t2"]
    for key in ("test", "test_per_territory", "persistence", "historical_average"):
        _assert_close(runs["packages"][key], runs["builtin"][key], key)
    assert runs["builtin"]["test"]["mae"]["h3"] > 0


def _assert_close(a, b, where: str) -> None:
    if isinstance(b, dict):
        assert sorted(a) == sorted(b), where
        for k in b:
            _assert_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(b, float):
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-6), (where, a, b)
    else:
        assert a == b, where


def test_packages_config_errors(tmp_path, los_loop_packages):
    with pytest.raises(ConfigError, match="dataset.path"):
        resolve_config(compose_config(["pilot=los_loop_3", "dataset=packages"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(TerritoryPackageError, match="no sub-folder holds a territory.yaml"):
        packages_config(tmp_path / "empty")
    with pytest.raises(ConfigError, match="takes no argument"):
        packages_config(los_loop_packages, "+dataset.cities=[a]")


def test_packages_refuse_mismatched_channels(tmp_path, los_loop_packages):
    """Two packages whose channels differ cannot serve one model: refused, naming the file."""
    import shutil

    for k in (0, 1):
        shutil.copytree(los_loop_packages / f"t{k}", tmp_path / f"t{k}")
    manifest = tmp_path / "t1" / "territory.yaml"
    manifest.write_text(manifest.read_text().replace("unit: mph", "unit: km/h"))
    with pytest.raises(TerritoryPackageError, match=r"t1/territory.yaml: field 'channels'"):
        load_territories(packages_config(tmp_path))


def test_partition_never_overwrites(tmp_path):
    """A foreign file blocks the output folder; an earlier output is replaced only with --force,
    and only when it holds nothing but what fedldt wrote."""
    data = write_los_loop_like(tmp_path / "net", num_nodes=8)
    args = ["partition", "--pilot", "los_loop_3", "--out", str(tmp_path / "out"), f"dataset.path={data}",
            "partition.num_territories=2"]
    foreign = tmp_path / "out" / "notes.txt"
    foreign.parent.mkdir()
    foreign.write_text("mine")
    assert main(args) == 1 and foreign.read_text() == "mine"
    foreign.unlink()
    assert main(args) == 0
    first = load_package(tmp_path / "out" / "t0")
    assert main(args) == 1  # an earlier output: --force needed
    assert main([*args, "--force"]) == 0
    assert np.array_equal(load_package(tmp_path / "out" / "t0").values, first.values)
    (tmp_path / "out" / "t1" / "extra.csv").write_text("x")
    assert main([*args, "--force"]) == 1 and (tmp_path / "out" / "t1" / "extra.csv").read_text() == "x"
    # a forged report listing a foreign file does not make it fedldt's
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    (tmp_path / "out" / REPORT).write_text(json.dumps({**report, "files": report["files"] + ["t1/extra.csv"]}))
    assert main([*args, "--force"]) == 1 and (tmp_path / "out" / "t1" / "extra.csv").read_text() == "x"
    (tmp_path / "out" / "t1" / "extra.csv").unlink()
    (tmp_path / "out" / "t1" / "edges.csv").unlink()
    mine = tmp_path / "mine.csv"
    mine.write_text("mine")
    (tmp_path / "out" / "t1" / "edges.csv").symlink_to(mine)  # a link to a file that is not fedldt's
    assert main([*args, "--force"]) == 1 and mine.read_text() == "mine" and (tmp_path / "out" / "t1" / "edges.csv").is_symlink()
    with pytest.raises(PartitionError, match="not an IANA time zone"):
        partition_pilot("los_loop_3", tmp_path / "other", timezone="Mars/Olympus")
    with pytest.raises(PartitionError, match="Could not find"):
        partition_pilot("no_such_pilot", tmp_path / "other2")


def test_partition_cli_prints_report(tmp_path, capsys):
    data = write_los_loop_like(tmp_path / "net", num_nodes=12)
    assert main(["partition", "--pilot", "los_loop_3", "--out", str(tmp_path / "out"), f"dataset.path={data}",
                 "partition.num_territories=2"]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    for c in report["territories"]:
        assert f"{c['folder']}: {c['sensors']} sensors, {c['edges_kept']} edges kept, {c['edges_dropped']} border" in out
    # the ring graph of write_los_loop_like split in two arcs: 2 undirected edges (4 directed) of 12 cross
    assert report["edges_dropped"] == 4 and report["edges_total"] == 24
    assert [c["edges_dropped"] for c in report["territories"]] == [4, 4]
    assert "border edges dropped: 4 of 24 (16.7 %" in out


#: Opt-in (set to 1): the federated run from packages takes 70-130 s on 2 cores, too long for CI's budget.
FEDERATED_ENV = "FEDLDT_TEST_FEDERATED_PACKAGES"


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get(FEDERATED_ENV) != "1", reason=f"a second Flower run (70-130 s); set {FEDERATED_ENV}=1")
def test_federated_run_from_packages(los_loop_run, los_loop_packages, tmp_path):
    """The pilot federated with Flower from its packages gives the built-in run's test metrics
    (measured 2026-11-30: ``train.rounds=2``, every test metric identical, difference 0)."""
    if los_loop_run.returncode != 0:
        pytest.fail("the los_loop_3 run failed:\n" + los_loop_run.stderr[-3000:])
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "scripts/simulate.py", "pilot=los_loop_3", "train.rounds=2", "dataset=packages",
                           f"dataset.path={los_loop_packages}", f"hydra.run.dir={out}"],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    packed = json.loads((out / "summary.json").read_text())
    builtin = json.loads((los_loop_run.path / "summary.json").read_text())
    for key in ("test", "test_per_territory"):
        _assert_close(packed[key], builtin[key], key)
