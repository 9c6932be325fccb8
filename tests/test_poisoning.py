"""A poisoned territory: the test-only attack mods (tests/mods.py) and the norm-clipping rule
(server.strategy.FedLDTClipAvg). The measured study is scripts/poisoning.py
(docs/results/los_loop_4_poisoned/)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from clients.client_app import build_app
from fedldt.config import checkout_root
from tests.apps import write_test_app
from tests.mods import gaussian_noise, poison_mod, resolve_mods, sign_flip
from flwr.app import Array, ArrayRecord, ConfigRecord

from clients.client_app import app
from tests.inprocess import InProcessGrid
from server.strategy import AggregationGuardError
from tests.test_strategies import F32, _reply, _run, _strategy, syn_dir  # noqa: F401  (syn_dir: a fixture)

# ------------------------------------------------------------------ the attacks, known answers


def test_sign_flip_reverses_and_scales_the_update_exactly():
    g = np.array([1.0, 2.0, -0.5], dtype=F32)
    w = np.array([2.0, 0.0, -0.5], dtype=F32)  # update [1, -2, 0]
    out = sign_flip(g, w, -10.0)
    assert out.dtype == np.float32
    assert out.tolist() == [-9.0, 22.0, -0.5]  # 1 - 10, 2 + 20, unchanged
    assert sign_flip(g, w, 1.0).tolist() == w.tolist()  # scale 1: the honest parameters
    with pytest.raises(ValueError, match=r"global shape \(3,\) != local shape \(2,\)"):
        sign_flip(g, w[:2], -10.0)


def test_gaussian_noise_has_the_arrays_own_scale_and_is_seeded():
    w = np.array([[0.0, 2.0], [4.0, 6.0]], dtype=F32)  # population std sqrt(5)
    expected = w.astype(np.float64) + np.random.default_rng(7).normal(0.0, np.sqrt(5.0), size=(2, 2))
    out = gaussian_noise(w, np.random.default_rng(7))
    assert out.dtype == np.float32 and np.array_equal(out, expected.astype(F32))
    assert np.array_equal(gaussian_noise(np.full(3, 1.5, F32), np.random.default_rng(0)), np.full(3, 1.5, F32))  # std 0
    big = np.random.default_rng(1).normal(3.0, 0.2, size=100_000).astype(F32)
    noise = gaussian_noise(big, np.random.default_rng(2)).astype(np.float64) - big
    assert noise.std() == pytest.approx(big.std(), rel=0.01) and abs(noise.mean()) < 0.005


@settings(max_examples=40, deadline=None)
@given(g=arrays(np.float32, 5, elements=st.floats(-100, 100, width=32)),
       u=arrays(np.float32, 5, elements=st.floats(-100, 100, width=32)))
def test_sign_flip_update_is_minus_ten_times_the_honest_one(g, u):
    w = (g + u).astype(F32)
    flipped = sign_flip(g, w, -10.0).astype(np.float64)
    honest = w.astype(np.float64) - g
    assert np.allclose(flipped - g, -10.0 * honest, rtol=1e-5, atol=1e-3)


def test_poison_mod_arguments_are_checked():
    with pytest.raises(ValueError, match=r"attack='flip' must be one of \('sign_flip', 'gaussian_noise'\)"):
        poison_mod("flip", 0)
    with pytest.raises(ValueError, match="attacker=-1 must be a territory index"):
        poison_mod("sign_flip", -1)
    for scale in (float("nan"), float("inf"), "10", True):
        with pytest.raises(ValueError, match="scale=.* must be a finite number"):
            poison_mod("sign_flip", 0, scale=scale)
    with pytest.raises(ValueError, match="unknown test mods"):
        resolve_mods([["poison_mod", "sign_flip"]])


# ------------------------------------------------------------------ the mod in the real ClientApp


def _arrays(msg):
    return {k: v.numpy().copy() for k, v in msg.content["arrays"].items()}


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian_noise"])
def test_poison_mod_corrupts_only_the_attackers_train_replies(syn_dir, attack):  # noqa: F811
    """One FedAvg round, 2 territories, in process, the same seed with the production app and with
    territory 1 as attacker. Training starts from the same global model, so territory 0's train
    reply is identical and territory 1's is exactly the attack applied to its honest reply. The
    evaluate messages (of the poisoned global model) get the same reply from the production app."""
    ov = ["strategy=fedavg", "seed=4"]
    _, init, _, clean, _ = _run(syn_dir, ov)
    _, _, _, poisoned, _ = _run(syn_dir, ov, client_app=build_app([poison_mod(attack, attacker=1, seed=4)]))
    train = {}
    for grid in (clean, poisoned):
        replies = [m for m in grid.replies if m.metadata.message_type == "train"]
        assert len(replies) == 2 and not any(m.has_error() for m in replies)
        train[grid] = {int(m.content["metrics"]["territory"]): _arrays(m) for m in replies}
    (c0, c1), (p0, p1) = (train[clean][0], train[clean][1]), (train[poisoned][0], train[poisoned][1])
    assert list(c0) == list(p0) == list(c1) == list(p1)
    assert all(np.array_equal(c0[k], p0[k]) for k in c0)  # the honest territory: untouched
    if attack == "sign_flip":
        g = {k: v.numpy() for k, v in init.items()}
        assert all(np.array_equal(p1[k], sign_flip(g[k], c1[k], -10.0)) for k in c1)
    else:
        rng = np.random.default_rng([4, 1, 1])  # (seed, round, attacker), arrays in the reply's order
        assert all(np.array_equal(p1[k], gaussian_noise(c1[k], rng)) for k in c1)
    assert all(not np.array_equal(p1[k], c1[k]) for k in c1 if c1[k].size > 1)
    evaluated = 0
    for msg, reply in zip(poisoned.sent, poisoned.replies):
        if msg.metadata.message_type == "evaluate":
            prod = app(msg, poisoned.contexts[int(msg.metadata.dst_node_id)])
            assert reply.content["metrics"] == prod.content["metrics"] and not reply.content.array_records
            evaluated += 1
    assert evaluated == 2


def test_test_app_carries_the_mod_arguments_and_production_code_has_no_attack(tmp_path):
    app_dir = write_test_app(tmp_path / "app", [["poison_mod", {"attack": "sign_flip", "attacker": 3}]])
    assert '"attacker": 3' in (app_dir / "fedldt_test_app.py").read_text()
    with pytest.raises(TypeError, match="unexpected keyword argument 'bad'"):
        write_test_app(tmp_path / "bad", [["poison_mod", {"attack": "sign_flip", "attacker": 3, "bad": 1}]])
    for folder in ("clients", "server", "fedldt"):
        for f in (checkout_root() / folder).rglob("*.py"):
            assert "poison_mod" not in f.read_text() and "sign_flip" not in f.read_text(), f


# ------------------------------------------------------------------ the norm-clipping rule

G = {"w": np.zeros(2, dtype=F32)}


def _aggregate(strategy_cfg, template, replies_spec):
    """One round of ``strategy_cfg`` over hand-made replies of territories 0.. (SuperNodes 10..)."""
    n = len(replies_spec)
    s = _strategy(strategy_cfg, n=n)
    grid = InProcessGrid(app, {10 + i: {"partition-id": i} for i in range(n)})
    sent = grid.stamp(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in template.items()}), ConfigRecord(), grid))
    ids = {int(m.metadata.dst_node_id): m.metadata.message_id for m in sent}
    arrays, metrics = s.aggregate_train(1, [_reply(ids, i, a, k) for i, (a, k) in enumerate(replies_spec)])
    return arrays, metrics, s
HONEST = [np.array([3.0, 4.0], F32), np.array([4.0, 3.0], F32), np.array([0.0, 5.0], F32)]  # norms 5, 5, 5


def test_clipped_average_bounds_a_sign_flipped_territory_exactly():
    """3 honest updates of norm 5 and a sign-flipped x10 one (norm 50): the median norm is 5, the
    attacker's update becomes [-3, -4], the mean ([3,4]+[4,3]+[0,5]+[-3,-4])/4 = [1, 2]. FedAvg
    gives ([7, 12] - [30, 40]) / 4 = [-5.75, -7]; the honest mean is [7/3, 4]."""
    attacker = sign_flip(G["w"], HONEST[0], -10.0)  # [-30, -40]
    spec = [({"w": h}, 10) for h in HONEST] + [({"w": attacker}, 10)]
    clipped, _, s = _aggregate({"name": "fedclipavg"}, G, spec)
    assert clipped["w"].numpy().dtype == np.float32
    assert clipped["w"].numpy().tolist() == [1.0, 2.0]
    assert s.last_clip == {"clip_norm": 5.0, "update_norms": [5.0, 5.0, 5.0, 50.0]}
    plain, _, _ = _aggregate({"name": "fedavg"}, G, spec)
    assert plain["w"].numpy().tolist() == [-5.75, -7.0]


def test_clipped_average_without_an_outlier_is_fedavg():
    """Updates no longer than the median are untouched: equal norms give exactly FedAvg, weights included."""
    spec = [({"w": h}, n) for h, n in zip(HONEST, (1, 2, 1))]
    clipped, _, _ = _aggregate({"name": "fedclipavg"}, G, spec)
    plain, _, _ = _aggregate({"name": "fedavg"}, G, spec)
    assert clipped["w"].numpy().tolist() == plain["w"].numpy().tolist() == [2.75, 3.75]  # [11, 15] / 4



@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("rule", ["fedclipavg", "fedmedian", "fedavg"])
def test_a_non_finite_update_is_refused_naming_the_territory(rule, bad):
    """One territory sending NaN/inf made the aggregate NaN and the round failed with "the aggregated
    parameter 'w' is not finite", naming no territory; now its reply is refused by name."""
    spec = [({"w": h}, 10) for h in HONEST] + [({"w": np.array([bad, 1.0], F32)}, 10)]
    with pytest.raises(AggregationGuardError, match=r"territory t3: parameter 'w' is not finite"):
        _aggregate({"name": rule}, G, spec)


def test_clipped_average_of_zero_updates_and_of_one_territory():
    """All updates zero: the median norm is 0 and nothing is clipped (no 0/0); one territory: its own
    norm is the median, so it is kept whole."""
    zero, _, s = _aggregate({"name": "fedclipavg"}, G, [({"w": np.zeros(2, F32)}, 10)] * 3)
    assert zero["w"].numpy().tolist() == [0.0, 0.0] and s.last_clip == {"clip_norm": 0.0, "update_norms": [0.0] * 3}
    one, _, s = _aggregate({"name": "fedclipavg"}, G, [({"w": np.array([30.0, 40.0], F32)}, 10)])
    assert one["w"].numpy().tolist() == [30.0, 40.0] and s.last_clip == {"clip_norm": 50.0, "update_norms": [50.0]}

def test_clipped_average_runs_a_real_round(syn_dir):  # noqa: F811
    _, init, out, _, s = _run(syn_dir, ["strategy=fedclipavg", "seed=2"])
    assert set(out) == set(init) and all(torch.isfinite(v).all() for v in out.values())
    assert len(s.last_clip["update_norms"]) == 2 and s.last_clip["clip_norm"] > 0
