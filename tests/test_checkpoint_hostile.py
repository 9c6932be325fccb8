"""Forged server checkpoints (``fedldt/checkpoint.py``): each forgery is refused at load time
with a :class:`CheckpointError` naming the file, never a NaN carried into the run, a raw
``TypeError`` in the middle of a resume or a crash when the run writes its results."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedldt.checkpoint import CHECKPOINT, CheckpointError, load_checkpoint, restore_components, save_checkpoint
from fedldt.privacy import PrivacyLedger

CFG = {"mode": "federated", "seed": 0, "train": {"rounds": 4, "batch_size": 8, "local_epochs": 1},
       "privacy": {"mode": "territory", "noise_multiplier": 1.0, "clipping_norm": 1.0, "delta": 1e-3, "max_epsilon": None}}
KEY = "0123456789abcdef0123456789abcdef"


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(CFG["privacy"], CFG["train"])


def _written(run_dir: Path) -> Path:
    ledger = _ledger()
    ledger.record_round(1, {"a": 10, "b": 20})
    return save_checkpoint(run_dir, round=1, run_key=KEY, config=CFG, territories={0: "a", 1: "b"},
                           arrays={"w": np.ones((2, 3), np.float32)}, components={"privacy": ledger}, elapsed_s=1.5)


def _forge(path: Path, meta=None, tensors=None, raw_meta: str | None = None) -> None:
    doc = torch.load(path, weights_only=True)
    m = json.loads(doc["meta"])
    for k, v in (meta or {}).items():
        m[k] = v
    doc["meta"] = raw_meta if raw_meta is not None else json.dumps(m)
    doc["tensors"].update(tensors or {})
    torch.save(doc, path)


def test_an_untouched_checkpoint_restores_the_ledger_and_random_states(tmp_path):
    _written(tmp_path)
    random.seed(1)
    ckpt = load_checkpoint(tmp_path, CFG)
    ledger = _ledger()
    restore_components(ckpt, {"privacy": ledger})
    assert ledger.epsilon_by_round.keys() == {1} and ledger.epsilon_by_round[1] == _ledger().record_round(1, {"a": 10})


@pytest.mark.parametrize("forge, match", [
    (lambda p: _forge(p, raw_meta=p.with_suffix(".meta").read_text().replace('"elapsed_s": 1.5', '"elapsed_s": NaN')),
     r"field 'meta' is not valid JSON"),
    (lambda p: _forge(p, raw_meta=p.with_suffix(".meta").read_text().replace('"elapsed_s": 1.5', '"elapsed_s": Infinity')),
     r"field 'meta' is not valid JSON"),
    (lambda p: _forge(p, meta={"elapsed_s": "nan"}), r"elapsed_s 'nan' must be a number of seconds >= 0"),
    (lambda p: _forge(p, meta={"elapsed_s": -5}), r"elapsed_s -5 must be a number of seconds >= 0"),
    (lambda p: _forge(p, raw_meta="[" * 100_000 + "]" * 100_000), r"field 'meta' is not valid JSON"),
    (lambda p: _forge(p, meta={"rng": {"python": [3, [1, 2], None], "numpy": ["MT19937", 0, 0, 0.0]}}),
     r"the random state is malformed"),
    (lambda p: _forge(p, tensors={"rng/torch": torch.zeros(3, dtype=torch.uint8)}), r"the random state is malformed"),
    (lambda p: _forge(p, meta={"components": {"privacy": []}}), r"each component's state and 'rng' must be JSON objects"),
    (lambda p: _forge(p, tensors={"component/privacy/m_t/w": torch.full((2, 3), float("nan"))}),
     r"array 'm_t/w' of component 'privacy' is not finite"),
])
def test_forged_checkpoints_are_refused_at_load(tmp_path, forge, match):
    path = _written(tmp_path)
    path.with_suffix(".meta").write_text(torch.load(path, weights_only=True)["meta"])
    before = torch.get_rng_state()
    forge(path)
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(tmp_path, CFG)
    assert str(path) in str(e.value)
    assert torch.equal(torch.get_rng_state(), before)  # a refused random state leaves the process's as it was


@pytest.mark.parametrize("events, match", [
    ([{"subject": "federation", "noise_multiplier": 0.0, "sampling_rate": 1.0, "count": 1}], r"invalid privacy event"),
    ([{"subject": "federation", "noise_multiplier": 1.0, "sampling_rate": 1.0, "count": -3}], r"invalid privacy event"),
    ([{"subject": "federation"}], r"event 0 is malformed"),
])
def test_a_forged_accountant_is_refused_naming_the_file_and_component(tmp_path, events, match):
    path = _written(tmp_path)
    meta = json.loads(torch.load(path, weights_only=True)["meta"])
    meta["components"]["privacy"]["accountant"]["events"] = events
    _forge(path, meta={"components": meta["components"]})
    ckpt = load_checkpoint(tmp_path, CFG)
    with pytest.raises(CheckpointError, match=rf"{CHECKPOINT}: the state of 'privacy' is malformed \(.*{match}"):
        restore_components(ckpt, {"privacy": _ledger()})
    with pytest.raises(CheckpointError, match=r"holds no state of \['strategy'\]"):
        restore_components(ckpt, {"strategy": _ledger()})
