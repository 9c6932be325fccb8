"""Checkpoint and resume (fedldt/checkpoint.py, server/rounds.py): a run stopped after round 2
and resumed to 4 equals a straight 4-round run bit for bit; what a checkpoint refuses.

The runs go through fedldt's real server (``run_federated``), strategy and ClientApp on an
in-process grid (tests/inprocess.py): a resumed run is a new grid, so every territory starts
with a fresh ``context`` and must reload its local entries from its own folder, as a new Flower run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clients.client_app import app
from fedldt.checkpoint import (CHECKPOINT, RESUMABLE_KEYS, CheckpointError, State, config_differences, load_checkpoint,
                               load_local_state, local_state_path, resume_folder, save_local_state)
from server.rounds import run_federated
from tests.conftest import small_config, write_los_loop_like
from tests.inprocess import InProcessGrid

#: a small, fast federation: 2 territories of 6 nodes, DCRNN with 8 hidden units, 1 local epoch
FAST = ("train.local_epochs=1", "task.train_stride=4")


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return write_los_loop_like(tmp_path_factory.mktemp("resume") / "syn", num_nodes=12, num_steps=300)


def _federate(syn: Path, run_dir: Path, homes: Path, *overrides: str) -> dict:
    """One federated run (a new "Flower run": fresh contexts) of the small config; territory i
    keeps its own folder ``homes/t<i>`` (node config ``out-dir``) across runs."""
    cfg = small_config(syn, *FAST, *overrides)
    grid = InProcessGrid(app, {10 + i: {"partition-id": i, "out-dir": str(homes / f"t{i}")} for i in range(2)})
    return run_federated(grid, cfg, run_dir)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("extra", [("strategy=fedadam", "personalization=fedper"), ("strategy=fedavgm",
                                                                                    "strategy.server_momentum=0.9"),
                                   ("personalization=ditto",)])
def test_two_rounds_resumed_to_four_equal_four_straight_rounds(syn, tmp_path, extra):
    """FedAdam's moments and step count / FedAvgM's momentum, the metric history, the RNG states
    and (FedPer) each territory's own output head all continue exactly."""
    straight = _federate(syn, tmp_path / "straight", tmp_path / "homes-a", "train.rounds=4", *extra)
    run = tmp_path / "run"
    first = _federate(syn, run, tmp_path / "homes-b", "train.rounds=2", *extra)
    assert first["rounds"] == 2 and (run / CHECKPOINT).is_file()
    resumed = _federate(syn, run, tmp_path / "homes-b", "train.rounds=4", f"resume={run}", *extra)

    a, b = _final(tmp_path / "straight"), _final(run)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    assert resumed["test"] == straight["test"] and resumed["test_per_territory"] == straight["test_per_territory"]
    if "personalization=ditto" in extra:  # each territory's personal model continued from its own checkpoint
        assert resumed["personalization_result"] == straight["personalization_result"]
        assert resumed["global_test"] == straight["global_test"] and resumed["test"] != resumed["global_test"]
    assert resumed["history"] == straight["history"] and resumed["rounds"] == 4 and resumed["resumed_after_round"] == 2
    hist = pd.read_csv(run / "history.csv")
    assert list(hist["round"]) == [1, 1, 2, 2, 3, 3, 4, 4]  # rounds 1 to 4, once each per territory
    pd.testing.assert_frame_equal(hist, pd.read_csv(tmp_path / "straight" / "history.csv"))
    ckpt = load_checkpoint(run, {**json.loads(json.dumps(small_config(syn, *FAST, "train.rounds=4", *extra))),
                                 "resume": str(run)})
    assert ckpt.round == 4 and ckpt.components["strategy"].meta["rounds"] == straight["history"]
    if "strategy=fedadam" in extra:
        assert ckpt.components["strategy"].meta["optimizer_step"] == 4
        assert set(ckpt.components["strategy"].meta["m_t"]) == set(a)
        # the head stayed on each territory: in its own checkpoint folder, never in the server's
        head = load_local_state(tmp_path / "homes-b" / "t0", ckpt.run_key, 4)
        assert head and not set(head) & set(a) and not set(head) & set(ckpt.arrays)


def test_fedadam_same_seed_same_metrics(syn, tmp_path):
    """Item 5 of issue 13: FedAdam twice with one seed gives exactly the same metrics and weights."""
    runs = [_federate(syn, tmp_path / n, tmp_path / f"homes-{n}", "train.rounds=2", "strategy=fedadam", "seed=7")
            for n in ("a", "b")]
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["history"] == runs[1]["history"]
    a, b = _final(tmp_path / "a"), _final(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = _federate(syn, tmp_path / "c", tmp_path / "homes-c", "train.rounds=2", "strategy=fedadam", "seed=8")
    assert other["test"] != runs[0]["test"]  # the seed does act


@pytest.fixture(scope="module")
def one_round(syn, tmp_path_factory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("one")
    cfg = small_config(syn, *FAST, "train.rounds=1")
    _federate(syn, base / "run", base / "homes", *FAST, "train.rounds=1")
    return base / "run", cfg


def test_resume_refuses_another_config_naming_the_keys(one_round):
    run, cfg = one_round
    changed = {**cfg, "seed": 1, "train": {**cfg["train"], "lr": 0.5, "rounds": 3}, "resume": str(run)}
    with pytest.raises(CheckpointError, match=r"differs from the checkpoint's in seed \(checkpoint 0, now 1\), "
                                              r"train\.lr \(checkpoint 0\.01, now 0\.5\); a resume may change only "
                                              r"train\.rounds"):
        load_checkpoint(run, changed)
    ok = load_checkpoint(run, {**cfg, "train": {**cfg["train"], "rounds": 3}, "resume": str(run)})
    assert ok.round == 1 and len(ok.run_key) == 32
    with pytest.raises(CheckpointError, match=r"after round 1, more than train.rounds=0"):
        load_checkpoint(run, {**cfg, "train": {**cfg["train"], "rounds": 0}})


def test_resume_refuses_a_missing_corrupt_or_pickled_checkpoint(one_round, tmp_path):
    run, cfg = one_round
    with pytest.raises(CheckpointError, match=rf"checkpoint {tmp_path}/{CHECKPOINT} does not exist; resume=<run "
                                              "folder> must name the folder of a federated fedldt run"):
        load_checkpoint(tmp_path, cfg)
    (tmp_path / CHECKPOINT).write_bytes((run / CHECKPOINT).read_bytes()[:200])  # cut short
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT} cannot be read \(\w+\); it is corrupt"):
        load_checkpoint(tmp_path, cfg)
    torch.save({"format": "fedldt-checkpoint", "payload": State()}, tmp_path / CHECKPOINT)  # needs code to load
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path, cfg)
    torch.save({"format": "fedldt-checkpoint", "version": 1, "meta": "{", "tensors": {}}, tmp_path / CHECKPOINT)
    with pytest.raises(CheckpointError, match="field 'meta' is not valid JSON"):
        load_checkpoint(tmp_path, cfg)
    with pytest.raises(CheckpointError, match="continues federated runs only"):
        resume_folder({**cfg, "mode": "local", "resume": str(run)})
    assert resume_folder({**cfg, "resume": str(run)}) == str(run)


def test_territory_checkpoint_names_its_run_and_round_and_keeps_two(tmp_path):
    key = "0123456789abcdef0123456789abcdef"
    for r in (1, 2, 3):
        save_local_state(tmp_path, key, r, {"head.weight": torch.full((2, 3), float(r))})
    kept = sorted(p.name for p in local_state_path(tmp_path, key, 1).parent.iterdir())
    assert kept == ["local-round-000002.pt", "local-round-000003.pt"]
    assert torch.equal(load_local_state(tmp_path, key, 3)["head.weight"], torch.full((2, 3), 3.0))
    with pytest.raises(CheckpointError, match=r"territory checkpoint .*local-round-000001.pt does not exist"):
        load_local_state(tmp_path, key, 1)
    with pytest.raises(ValueError, match=r"run key '../../etc' must be 32 hex digits"):
        local_state_path(tmp_path, "../../etc", 1)
    np.testing.assert_array_equal(load_local_state(tmp_path, key, 2)["head.weight"].numpy(), np.full((2, 3), 2.0, np.float32))


def test_simulate_refuses_a_changed_resume_before_flower_starts(one_round, syn, tmp_path):
    """``scripts/simulate.py ... resume=RUN_DIR`` with another seed: exit 2, one line naming the key."""
    import subprocess
    import sys

    from fedldt.config import checkout_root
    from tests.conftest import SMALL

    run, _ = one_round
    args = ["pilot=los_loop_3", f"dataset.path={syn}", *SMALL, *FAST, "train.rounds=3", f"resume={run}", "seed=1",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run([sys.executable, str(checkout_root() / "scripts" / "simulate.py"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert (f"fedldt: bad config: resume={run}: the run config differs from the checkpoint's in partition.seed "
            "(checkpoint 0, now 1), seed (checkpoint 0, now 1); a resume may change only train.rounds") in proc.stderr
    assert "Flower run" not in proc.stdout and not (tmp_path / "hydra" / "logs").exists()


#: dotted config keys, none a prefix of another (each names a leaf)
_KEY = st.sampled_from(["seed", "name", "train.lr", "train.rounds", "model.hidden", "task.window", "resume", "a.b.c"])


@given(st.dictionaries(_KEY, st.integers(-3, 3), min_size=1), _KEY, st.integers(-3, 3))
def test_config_differences_name_exactly_the_changed_keys_but_rounds_and_resume(flat, key, value):
    def nest(d):
        out: dict = {}
        for k, v in d.items():
            *path, last = k.split(".")
            node = out
            for p in path:
                node = node.setdefault(p, {})
            node[last] = v
        return out

    changed = {**flat, key: value}
    expected = [] if key in RESUMABLE_KEYS or flat.get(key, ...) == value else [key]
    assert config_differences(nest(flat), nest(changed)) == expected
    assert config_differences(nest(flat), nest(flat)) == []


def test_a_territory_that_missed_rounds_keeps_its_last_local_entries(tmp_path):
    """A territory whose training failed (or that was away) in a round trains the next one with the
    entries of its last training: round 1 saved, rounds 2-3 missed, round 4 asks for round 3."""
    from clients.territory import local_state

    key = "0123456789abcdef0123456789abcdef"
    assert local_state(tmp_path, key, 3, None, None) is None  # never trained: initialised from the seed
    save_local_state(tmp_path, key, 1, {"head.weight": torch.full((2,), 1.0)})
    assert torch.equal(local_state(tmp_path, key, 3, None, None)["head.weight"], torch.full((2,), 1.0))  # restarted process
    kept = {"head.weight": torch.full((2,), 7.0)}
    assert torch.equal(local_state(tmp_path, key, 3, kept, (key, 1))["head.weight"], torch.full((2,), 7.0))  # in memory
    save_local_state(tmp_path, key, 2, {"head.weight": torch.full((2,), 2.0)})
    assert torch.equal(local_state(tmp_path, key, 3, kept, (key, 1))["head.weight"], torch.full((2,), 2.0))  # newer file
    assert torch.equal(local_state(tmp_path, key, 1, None, None)["head.weight"], torch.full((2,), 1.0))
