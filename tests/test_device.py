"""train.device and federation.client_gpus (issue 15, item 5): the device is resolved once and
refused clearly where it cannot exist; training on the CPU gives the same numbers whichever way
the CPU is chosen; what leaves a model is a CPU copy."""

from __future__ import annotations

import pytest
import torch

from fedldt.baselines import run_local
from fedldt.engine import cpu_state, model_device, resolve_device, train_device
from fedldt.launch.simulation import check_gpu_share
from fedldt.schema import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_auto_follows_cuda_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert train_device({}) == torch.device("cpu")  # a config written before train.device: the CPU, as then
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")  # cpu stays cpu even where a GPU is visible


def test_cuda_without_a_gpu_and_unknown_names_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.device=cuda but this process sees no CUDA device.*train.device=auto or cpu"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"train.device='gpu' must be one of \['auto', 'cpu', 'cuda'\]"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match=r"federation.client_gpus=0.5 .*no CUDA device.*federation.client_gpus=0"):
        check_gpu_share(0.5)
    check_gpu_share(0.0)  # no GPU share asked: nothing to check


@pytest.mark.parametrize("override, message", [
    ("train.device=gpu", r"train.device"),
    ("federation.client_gpus=-1", r"federation.client_gpus=-1"),
    ("federation.client_gpus=nan", r"federation.client_gpus=nan"),
])
def test_schema_refuses_bad_device_keys(synthetic_dir, small_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        small_cfg(synthetic_dir, override)


def test_cpu_state_is_a_detached_cpu_copy():
    model = torch.nn.Linear(2, 1)
    state = cpu_state(model.state_dict())
    with torch.no_grad():
        model.weight.add_(1.0)  # training in place after the copy (Ditto's v starts from such a copy)
    assert not torch.equal(state["weight"], model.weight)
    assert torch.equal(state["weight"] + 1.0, model.weight.detach())
    assert all(v.device.type == "cpu" and not v.requires_grad for v in state.values())
    assert model_device(model) == torch.device("cpu") and model_device(torch.nn.ReLU()) == torch.device("cpu")


@no_cuda
def test_cpu_auto_and_no_key_give_identical_runs(synthetic_dir, small_cfg, tmp_path):
    """The README's numbers do not move: train.device=cpu, auto (no GPU here) and a config
    without the key train the same model to the same test metrics, bit for bit."""
    base = small_cfg(synthetic_dir, "train.rounds=1", "task.train_stride=8")
    runs = {}
    for name in ("cpu", "auto", None):
        train = {**base["train"], "device": name} if name else {k: v for k, v in base["train"].items() if k != "device"}
        runs[name] = run_local({**base, "mode": "local", "train": train}, tmp_path / str(name))
    assert runs["cpu"]["test"] == runs["auto"]["test"] == runs[None]["test"]
    assert runs["cpu"]["test"]["mae"]["all"] > 0
    with pytest.raises(ConfigError, match="train.device=cuda"):
        run_local({**base, "mode": "local", "train": {**base["train"], "device": "cuda"}}, tmp_path / "cuda")


def test_federated_cuda_without_a_gpu_share_is_refused(monkeypatch, synthetic_dir, small_cfg, tmp_path):
    """On a GPU machine, Ray hides the GPUs from territory actors without a share: a federated run
    with train.device=cuda and federation.client_gpus=0 would fail in every territory; refused first."""
    from fedldt.runner import run_mode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    cfg = small_cfg(synthetic_dir)
    cfg = {**cfg, "train": {**cfg["train"], "device": "cuda"}}
    with pytest.raises(ConfigError, match=r"train.device=cuda with federation.client_gpus=0.*set federation.client_gpus"):
        run_mode(cfg, [], tmp_path / "run", mode="federated")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
