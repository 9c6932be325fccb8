"""The simulation engine on an existing Ray cluster (issue 15, item 4): a head and a worker started
as separate `ray start` processes on this machine, the run given only `federation.ray_address`.

The head offers no CPU, so every territory's ClientApp can only run on the worker node: a finished
run shows the cluster ran it (not a Ray instance the run started for itself), and that the run's
numbers are those of the same run without a cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from fedldt.launch.simulation import flwr_env, free_port, processes_with_home, run_simulation, stop_all
from fedldt.schema import ConfigError

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


def _ray(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_cluster():
    """``(host:port, temp dir)`` of a two-node Ray cluster on this machine: a head with 0 CPUs and
    a worker with 2, each a `ray start` process (stopped, with its files, at the end)."""
    tmp = Path(tempfile.mkdtemp(prefix="r", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**flwr_env(tmp), "RAY_ADDRESS": ""}
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = _ray("start", "--head", f"--port={port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=false",
                f"--temp-dir={tmp}", "--disable-usage-stats", env=env)
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _ray("start", f"--address={address}", "--num-cpus=2", "--num-gpus=0", env=env)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        probe = subprocess.run([sys.executable, "-c", "import ray, json; ray.init(address='%s', logging_level='ERROR'); "
                                "print(json.dumps([n['Resources'].get('CPU', 0) for n in ray.nodes() if n['Alive']]))"
                                % address], env=env, capture_output=True, text=True, timeout=120)
        assert sorted(json.loads(probe.stdout.strip().splitlines()[-1])) == [0, 2.0], probe.stderr[-2000:]
        yield address, tmp
    finally:
        # only this cluster's processes (they carry its FLWR_HOME): `ray stop` would also stop every
        # other Ray on the machine, e.g. a simulation a developer runs beside the tests
        stop_all(processes_with_home(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def test_territories_run_on_an_existing_cluster(ray_cluster, synthetic_dir, tmp_path):
    address, ray_tmp = ray_cluster
    overrides = ["pilot=los_loop_3", f"dataset.path={synthetic_dir}", "partition.num_territories=2",
                 "train.rounds=1", "model.hidden=8", "task.train_stride=8", "seed=3"]
    on_cluster = run_simulation(overrides + [f"federation.ray_address='{address}'"], tmp_path / "cluster",
                                num_supernodes=2, ray_address=address)
    assert on_cluster["rounds"] == 1 and not on_cluster["failures"]
    # the ClientApp actors' logs are in the cluster's session folder (a Ray instance of the run's
    # own would have written them under /tmp/ray)
    actor_logs = [p for p in (ray_tmp / "session_latest" / "logs").glob("worker-*.out")
                  if "ClientAppActor" in p.read_text(errors="replace")]
    assert actor_logs, sorted(p.name for p in (ray_tmp / "session_latest" / "logs").iterdir())
    alone = run_simulation(overrides, tmp_path / "alone", num_supernodes=2)
    assert on_cluster["test_per_territory"] == alone["test_per_territory"]  # same seed, same numbers


def test_unreachable_cluster_is_refused_before_anything_starts(synthetic_dir, tmp_path):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    overrides = ["pilot=los_loop_3", f"dataset.path={synthetic_dir}", "partition.num_territories=2", "train.rounds=1",
                 "model.hidden=8", f"federation.ray_address='{dead}'"]
    with pytest.raises(ConfigError, match=rf"federation.ray_address={dead}: no Ray cluster head answers there"):
        run_simulation(overrides, tmp_path / "run", num_supernodes=2, ray_address=dead)
    assert not (tmp_path / "run").exists()  # refused before the run folder, the SuperLink or Ray
    assert os.environ.get("RAY_ADDRESS") in (None, "")  # the caller's environment is untouched
