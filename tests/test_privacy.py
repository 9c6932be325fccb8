"""Differential privacy (``privacy=``, :mod:`fedldt.privacy`, ``server.strategy.TerritoryDP``):
the accountant against the libraries, the budget, clipping, seeded noise, DP-SGD with Opacus,
and ``privacy=none`` leaving runs as they were."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from clients import territory
from clients.client_app import app
from fedldt.config import compose_config, resolve_config
from fedldt.models import build_model, split_state
from fedldt.privacy import Accountant, Event, PrivacyLedger, dpsgd_schedule
from fedldt.schema import ConfigError
from server.rounds import run_federated
from server.strategy import TerritoryDP, build_strategy, with_privacy
from tests.conftest import small_config, write_los_loop_like
from tests.inprocess import InProcessGrid
from tests.test_strategies import _reply

NODES = {10: {"partition-id": 0}, 11: {"partition-id": 1}}
TRAIN = {"batch_size": 32, "local_epochs": 1}


def _territory_privacy(sigma=1.0, clip=5.0, delta=1e-3, max_epsilon=None):
    return {"mode": "territory", "noise_multiplier": sigma, "clipping_norm": clip, "delta": delta, "max_epsilon": max_epsilon}


# ------------------------------------------------------------------ the accountant
def test_accountant_epsilon_equals_the_libraries():
    """One territory's DP-SGD: q = 0.01, sigma = 1.1, 1000 steps, delta = 1e-5."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant
    from flwr.supercore.privacy_accounting import (GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig,
                                                   SamplingMethod)
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant as FlowerRdp
    from opacus.accountants import RDPAccountant as OpacusRdp

    acc = Accountant(1e-5)
    acc.compose([Event("t0", 1.1, 0.01, 600), Event("t0", 1.1, 0.01, 400)])
    ref = RdpAccountant()
    ref.compose(dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(1.1)), 1000)
    assert acc.epsilon() == ref.get_epsilon(1e-5)  # Google's dp-accounting, exactly
    flower = FlowerRdp(PrivacyConfig(1e-5, 100, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.POISSON))
    flower.compose(GaussianPrivacyEvent(1.1, 1, 100), 1000)
    assert acc.epsilon() == flower.get_epsilon(1e-5)  # Flower's accountant (same backend)
    opacus = OpacusRdp()
    opacus.history = [(1.1, 0.01, 1000)]
    assert acc.epsilon() == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-6)  # Opacus' own RDP code
    assert acc.epsilon() == pytest.approx(1.71177, abs=1e-5)


def test_territory_level_round_is_an_unsampled_gaussian_and_the_max_over_territories_is_reported():
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    ledger = PrivacyLedger(_territory_privacy(sigma=1.0), TRAIN)
    for r in (1, 2, 3):
        ledger.record_round(r, {"t0": 100, "t1": 50})
    ref = RdpAccountant()
    ref.compose(dp_event.GaussianDpEvent(1.0), 3)
    assert ledger.accountant.epsilon() == ref.get_epsilon(1e-3) == ledger.epsilon_by_round[3]
    assert ledger.epsilon_by_round[1] < ledger.epsilon_by_round[2] < ledger.epsilon_by_round[3]
    # sample level: each territory its own subject; the smaller territory (larger q) spends more
    sample = PrivacyLedger({**_territory_privacy(), "mode": "sample", "delta": 1e-5}, TRAIN)
    sample.record_round(1, {"t0": 640, "t1": 64})
    assert dpsgd_schedule(640, 32, 1) == (1 / 20, 20) and dpsgd_schedule(64, 32, 2) == (1 / 2, 4)
    small = Accountant(1e-5)
    small.compose([Event("t1", 1.0, 0.5, 2)])
    assert sample.accountant.epsilon() == small.epsilon()


def test_accountant_state_is_json_and_restores_the_same_epsilon():
    ledger = PrivacyLedger(_territory_privacy(sigma=0.8), TRAIN)
    ledger.record_round(1, {"t0": 10})
    ledger.record_round(2, {"t0": 10})
    text = json.dumps(ledger.state_dict(), allow_nan=False)
    back = PrivacyLedger(_territory_privacy(sigma=0.8), TRAIN)
    back.load_state_dict(json.loads(text))
    assert back.accountant.epsilon() == ledger.accountant.epsilon() and back.epsilon_by_round == ledger.epsilon_by_round
    back.record_round(3, {"t0": 10})
    ledger.record_round(3, {"t0": 10})
    assert back.accountant.epsilon() == ledger.accountant.epsilon()
    with pytest.raises(ValueError, match="delta"):
        PrivacyLedger(_territory_privacy(delta=1e-4), TRAIN).load_state_dict(json.loads(text))
    with pytest.raises(ValueError, match="event 0 is malformed"):  # a checkpoint file is input like any other
        back.load_state_dict({"accountant": {"delta": 1e-3, "events": [{"subject": "federation"}]}, "epsilon_by_round": {}})
    with pytest.raises(ValueError, match="epsilon_by_round"):
        back.load_state_dict({"accountant": {"delta": 1e-3, "events": []}})
    assert back.accountant.epsilon() == ledger.accountant.epsilon()  # a refused state changes nothing


@pytest.mark.parametrize("state, match", [
    ({"epsilon_by_round": {"1": "nan"}}, r"malformed epsilon_by_round"),  # float("nan") took it: summary.json failed at the end
    ({"epsilon_by_round": {"1": -1.0}}, r"negative or non-finite"),
    ({"events": [{"subject": "federation", "noise_multiplier": 1.0, "sampling_rate": 1.0, "count": 2.7}]}, r"event 0 is malformed"),
    ({"events": [{"subject": "federation", "noise_multiplier": "1", "sampling_rate": 1.0, "count": 1}]}, r"event 0 is malformed"),
    ({"events": [{"subject": "a", "noise_multiplier": 1.0, "sampling_rate": 1.0, "count": 1},
                 {"subject": "b", "noise_multiplier": 1.0, "sampling_rate": 1.0, "count": -1}]}, r"invalid privacy event"),
])
def test_a_refused_ledger_state_changes_nothing(state, match):
    ledger = PrivacyLedger(_territory_privacy(sigma=0.8), TRAIN)
    ledger.record_round(1, {"t0": 10})
    good = ledger.state_dict()
    before = (ledger.accountant.epsilon(), list(ledger.accountant.events), dict(ledger.epsilon_by_round))
    forged = {"accountant": {**good["accountant"], **{k: v for k, v in state.items() if k == "events"}},
              "epsilon_by_round": state.get("epsilon_by_round", good["epsilon_by_round"])}
    with pytest.raises(ValueError, match=match):
        ledger.load_state_dict(forged)
    assert (ledger.accountant.epsilon(), list(ledger.accountant.events), dict(ledger.epsilon_by_round)) == before

def test_budget_counts_the_rounds_that_fit():
    ledger = PrivacyLedger(_territory_privacy(sigma=1.0), TRAIN)
    eps = []
    probe = PrivacyLedger(_territory_privacy(sigma=1.0), TRAIN)
    for r in range(1, 6):
        eps.append(probe.record_round(r, {"t0": 1}))
    for fits in range(5):
        limit = (eps[fits - 1] + eps[fits]) / 2 if fits else eps[0] / 2
        ledger.privacy["max_epsilon"] = limit
        assert ledger.rounds_within_budget(5, {"t0": 1, "t1": 1}) == fits
    ledger.privacy["max_epsilon"] = eps[2]  # exactly epsilon after 3 rounds: 3 fit
    assert ledger.rounds_within_budget(5, {"t0": 1}) == 3
    ledger.privacy["max_epsilon"] = None
    assert ledger.rounds_within_budget(5, {"t0": 1}) == 5


def test_budget_of_many_rounds_is_quick_and_equals_composing_round_by_round():
    """The budget check runs before round 1: with sample-level DP and 100 000 rounds it took hours
    (each of the rounds composed again from scratch); bisection takes ~17 accountant calls."""
    privacy = {"mode": "sample", "noise_multiplier": 2.0, "clipping_norm": 1.0, "delta": 1e-5}
    windows = {"a": 1000, "b": 300}
    probe = PrivacyLedger(privacy, TRAIN)
    eps = [probe.record_round(r, windows) for r in range(1, 8)]
    ledger = PrivacyLedger({**privacy, "max_epsilon": (eps[4] + eps[5]) / 2}, TRAIN)
    assert ledger.rounds_within_budget(7, windows) == 5
    ledger.record_round(1, windows)  # after a resume: the ledger's rounds count too
    assert ledger.rounds_within_budget(7, windows) == 4
    ledger.privacy["max_epsilon"] = 1.0e12
    start = time.perf_counter()
    assert ledger.rounds_within_budget(100_000, windows) == 100_000
    assert time.perf_counter() - start < 10.0


# ------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, match", [
    (["privacy=territory", "strategy=fedadam"], "strategy=fedavg or fedprox"),
    (["privacy=territory", "strategy=krum"], "strategy=fedavg or fedprox"),
    (["privacy=sample", "model=gwnet"], "BatchNorm"),
    # shared BatchNorm running variances + Gaussian noise went below 0: NaN outputs
    (["privacy=territory", "model=gwnet"], r"personalization=none: its BatchNorm running statistics .* personalization=fedbn"),
    (["privacy=sample", "model=stgcn"], "ChebConv"),
    (["privacy=sample", "strategy=fedprox", "strategy.proximal_mu=0.1"], "proximal"),
    (["privacy=territory", "mode=centralized"], "mode=federated"),
    (["privacy=none", "+privacy.noise_multiplier=1.0"], "takes no"),
    (["privacy=territory", "privacy.delta=null"], "needs"),
    (["privacy=territory", "privacy.noise_multiplier=-1.0"], "noise_multiplier"),
    # epsilon was inf and the run failed writing summary.json after its last round
    (["privacy=territory", "privacy.noise_multiplier=1e-300"], r"privacy.noise_multiplier=1e-300 must be a number in \[1e-06, 1000000.0\]"),
])
def test_privacy_settings_that_cannot_be_honoured_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(compose_config(["pilot=los_loop_3", *overrides]), require_data=False)


def test_territory_dp_with_gwnet_keeps_batchnorm_at_home_with_fedbn():
    cfg = resolve_config(compose_config(["pilot=los_loop_3", "privacy=territory", "model=gwnet", "personalization=fedbn"]),
                         require_data=False)
    assert cfg["privacy"]["mode"] == "territory" and cfg["personalization"]["name"] == "fedbn"


# ------------------------------------------------------------------ territory-level DP on the server


def _dp_round(privacy, updates, weights, seed=0, server_round=1, strategy="fedavg"):
    """One aggregation of TerritoryDP on hand-made replies: global model 0, replies = updates."""
    cfg = {"privacy": privacy, "train": TRAIN, "seed": seed, "mode": "federated",
           "strategy": {"name": strategy}, "model": {"name": "dcrnn"}}
    s = with_privacy(build_strategy({"name": strategy}, territory_ids={0: "t0", 1: "t1"}, report_steps=[3], num_rounds=1,
                                    node_territories={10: 0, 11: 1}, min_train_nodes=2, min_evaluate_nodes=2,
                                    min_available_nodes=2), cfg)
    template = {"w": np.zeros(2, dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
    grid = InProcessGrid(app, NODES)
    sent = grid.stamp(s.configure_train(server_round, ArrayRecord({k: Array(v) for k, v in template.items()}),
                                        ConfigRecord(), grid))
    ids = {int(m.metadata.dst_node_id): m.metadata.message_id for m in sent}
    replies = [_reply(ids, i, {k: np.asarray(u[k], dtype=np.float32) for k in ("b", "w")}, n)  # keys in another order
               for i, (u, n) in enumerate(zip(updates, weights))]
    arrays, _ = s.aggregate_train(server_round, replies)
    return {k: arrays[k].numpy() for k in arrays.keys()}, s


BIG = {"w": [30.0, 40.0], "b": [0.0, 0.0, 0.0]}      # norm 50
SMALL = {"w": [0.3, 0.4], "b": [0.0, 0.0, 0.0]}      # norm 0.5


def test_clipping_bounds_each_update_and_the_mean_is_unweighted():
    out, s = _dp_round(_territory_privacy(sigma=1e-9, clip=5.0), [BIG, SMALL], [10, 30])
    assert isinstance(s, TerritoryDP)
    # BIG clipped to norm 5 -> [3, 4]; SMALL unchanged; unweighted mean despite 10 vs 30 windows
    np.testing.assert_allclose(out["w"], [1.65, 2.2], atol=1e-6)
    np.testing.assert_allclose(out["b"], [0.0, 0.0, 0.0], atol=1e-6)
    assert out["w"].dtype == np.float32 and list(out) == ["w", "b"]  # the global model's keys, order and dtype
    assert s.strategy._train == {0: (0.5, 10), 1: (0.5, 30)}  # the history keeps the real window counts
    assert s.privacy.epsilon_by_round[1] == s.privacy.accountant.epsilon() > 0


def test_noise_is_seeded_by_run_seed_and_round():
    p = _territory_privacy(sigma=1.0, clip=1.0)
    a, _ = _dp_round(p, [SMALL, SMALL], [1, 1], seed=3)
    b, _ = _dp_round(p, [SMALL, SMALL], [1, 1], seed=3)
    c, _ = _dp_round(p, [SMALL, SMALL], [1, 1], seed=4)
    d, _ = _dp_round(p, [SMALL, SMALL], [1, 1], seed=3, server_round=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)  # same seed, same noise, bit for bit
    assert not np.array_equal(a["w"], c["w"]) and not np.array_equal(a["w"], d["w"])
    state = np.random.get_state()[1].copy()
    _dp_round(p, [SMALL, SMALL], [1, 1], seed=5)
    assert np.array_equal(np.random.get_state()[1], state)  # numpy's global generator is left as it was
    # the noise has the calibrated std sigma * C / n = 0.5 around the clipped mean [0.3, 0.4, 0, 0, 0]
    draws = np.concatenate([np.concatenate([_dp_round(p, [SMALL, SMALL], [1, 1], seed=k)[0][x] for x in ("w", "b")])
                            - np.array([0.3, 0.4, 0, 0, 0]) for k in range(40)])
    assert abs(draws.std() - 0.5) < 0.05  # 200 seeded draws


def test_privacy_none_leaves_the_strategy_unwrapped():
    s = build_strategy({"name": "fedavg"}, territory_ids={0: "t0"}, report_steps=[3], num_rounds=1,
                       min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=1)
    assert with_privacy(s, {"privacy": {"mode": "none"}}) is s and s.privacy is None
    assert with_privacy(s, {}) is s  # a config written before the privacy group


# ------------------------------------------------------------------ whole runs, in process
@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory) -> Path:
    return write_los_loop_like(tmp_path_factory.mktemp("privacy") / "syn", num_nodes=10, num_steps=300)


def _run(syn_dir, tmp_path, *overrides):
    cfg = small_config(syn_dir, *overrides)
    summary = run_federated(InProcessGrid(app, NODES), cfg, tmp_path)
    return summary, pd.read_csv(tmp_path / "history.csv")


def test_budget_ends_the_run_after_the_last_round_that_fits(syn_dir, tmp_path):
    probe = PrivacyLedger(_territory_privacy(sigma=1.0, clip=5.0), TRAIN)
    eps = [probe.record_round(r, {"t0": 1}) for r in (1, 2, 3)]
    summary, hist = _run(syn_dir, tmp_path, "train.rounds=3", "privacy=territory", "privacy.clipping_norm=5.0",
                         f"privacy.max_epsilon={(eps[1] + eps[2]) / 2}")
    p = summary["privacy"]
    assert (p["rounds_planned"], p["rounds_run"], p["stopped_by_budget"]) == (3, 2, True)
    assert p["epsilon"] == eps[1] and p["epsilon_by_round"] == {"1": eps[0], "2": eps[1]}
    assert (p["delta"], p["noise_multiplier"], p["clipping_norm"], p["accountant"]) == (1e-3, 1.0, 5.0, "rdp (dp-accounting)")
    assert [r["round"] for r in summary["history"]] == [1, 2]
    assert list(hist["round"]) == [1, 1, 2, 2] and list(hist["privacy_epsilon"]) == [eps[0], eps[0], eps[1], eps[1]]
    json.loads((tmp_path / "summary.json").read_text())  # valid JSON


def test_same_seed_same_private_run(syn_dir, tmp_path):
    """Item 5: a territory-level DP run repeated with the same seed gives the same metrics and
    weights, bit for bit (noise seeded by the run seed and the round)."""
    a, ha = _run(syn_dir, tmp_path / "a", "train.rounds=1", "privacy=territory", "privacy.noise_multiplier=0.5")
    b, hb = _run(syn_dir, tmp_path / "b", "train.rounds=1", "privacy=territory", "privacy.noise_multiplier=0.5")
    assert a["test"] == b["test"] and a["privacy"] == b["privacy"] and ha.equals(hb)
    wa = torch.load(tmp_path / "a" / "model.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_privacy_none_writes_what_it_wrote_before(syn_dir, tmp_path):
    """The config of a run written before the group existed (no ``privacy`` block) and
    ``privacy=none`` give the same bits; neither writes a privacy field."""
    summary, hist = _run(syn_dir, tmp_path / "none", "train.rounds=1", "privacy=none")
    cfg = small_config(syn_dir, "train.rounds=1")
    del cfg["privacy"]
    old = run_federated(InProcessGrid(app, NODES), cfg, tmp_path / "old")
    assert "privacy" not in summary and "privacy_epsilon" not in hist.columns
    assert summary["test"] == old["test"] and summary["history"] == old["history"]
    a = torch.load(tmp_path / "none" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "old" / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ sample-level DP-SGD (Opacus)
def test_opacus_per_window_gradients_of_dcrnn_equal_one_window_backward_passes():
    from opacus import GradSampleModule

    from fedldt.models.diffusion import DiffusionConv, per_term_linears
    from fedldt.privacy import OPACUS_BATCH_FIRST

    cfg = compose_config(["model=dcrnn"])
    torch.manual_seed(0)
    model = build_model({**cfg["model"], "hidden": 8, "in_channels": 3, "out_channels": 1, "horizon": 4}, num_nodes=5)
    model.train()  # Opacus records activations in training mode; dropout is 0 (dcrnn default): the same function
    ei = torch.tensor([[0, 1, 2, 3, 4, 1], [1, 2, 3, 4, 0, 0]])
    ew = torch.ones(6)
    x = torch.randn(3, 12, 5, 3)
    with per_term_linears(model):  # as train_epochs_dpsgd runs it: each nn.Linear's own forward
        gsm = GradSampleModule(model, batch_first=OPACUS_BATCH_FIRST["dcrnn"], loss_reduction="sum")
        (gsm(x, ei, ew) ** 2).sum().backward()
        per = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
        gsm._close()
    assert all(m.fused for m in model.modules() if isinstance(m, DiffusionConv))  # the fast path is back
    for i in range(3):
        model.zero_grad()
        (model(x[i:i + 1], ei, ew) ** 2).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(per[n][i], p.grad, rtol=1e-4, atol=1e-5)


def test_dpsgd_is_seeded_per_territory_and_round(syn_dir):
    cfg = small_config(syn_dir, "privacy=sample")
    info = territory.describe(cfg, 0)
    torch.manual_seed(0)
    model = build_model({**cfg["model"], **{k: info[k.replace("_", "-")] for k in ("in_channels", "out_channels", "horizon")}},
                        num_nodes=info["num-nodes"])
    shared, _ = split_state(model, "none")

    def train(c, index=0, rnd=1):
        return territory.train(c, index, {k: v.clone() for k, v in shared.items()}, server_round=rnd)[0]

    a, b = train(cfg), train(cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], train(cfg, rnd=2)[k]) for k in a)
    plain = train(small_config(syn_dir))
    assert any(not torch.equal(a[k], plain[k]) for k in a)  # DP-SGD did run


# ------------------------------------------------------------------ checkpoint and resume (fedldt/checkpoint.py)
def test_resumed_private_run_continues_the_accountant_and_the_budget(syn_dir, tmp_path):
    """A territory-level DP run with a budget that fits 2 of 3 rounds: stopped after round 1 and
    resumed, it ends after round 2 with the weights, epsilons and history of the straight run
    (the ledger is the checkpoint component "privacy"; the noise is seeded by round)."""
    from fedldt.checkpoint import CHECKPOINT, load_checkpoint

    probe = PrivacyLedger(_territory_privacy(sigma=1.0, clip=5.0), TRAIN)
    eps = [probe.record_round(r, {"t0": 1}) for r in (1, 2, 3)]
    dp = ("privacy=territory", "privacy.clipping_norm=5.0", f"privacy.max_epsilon={(eps[1] + eps[2]) / 2}")

    def federate(run_dir, homes, *overrides):
        cfg = small_config(syn_dir, *dp, *overrides)
        grid = InProcessGrid(app, {10 + i: {"partition-id": i, "out-dir": str(homes / f"t{i}")} for i in range(2)})
        return cfg, run_federated(grid, cfg, run_dir)

    _, straight = federate(tmp_path / "straight", tmp_path / "homes-a", "train.rounds=3")
    run = tmp_path / "run"
    _, first = federate(run, tmp_path / "homes-b", "train.rounds=1")
    assert first["privacy"]["rounds_run"] == 1 and (run / CHECKPOINT).is_file()
    cfg, resumed = federate(run, tmp_path / "homes-b", "train.rounds=3", f"resume={run}")
    assert resumed["privacy"] == straight["privacy"] and resumed["privacy"]["rounds_run"] == 2
    assert resumed["privacy"]["stopped_by_budget"] and resumed["privacy"]["epsilon"] == eps[1]
    assert resumed["test"] == straight["test"] and resumed["history"] == straight["history"]
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(run / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(pd.read_csv(run / "history.csv"), pd.read_csv(tmp_path / "straight" / "history.csv"))
    ckpt = load_checkpoint(run, {**json.loads(json.dumps(cfg)), "resume": str(run)})
    assert [e["count"] for e in ckpt.components["privacy"].meta["accountant"]["events"]] == [1, 1]
