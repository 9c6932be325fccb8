"""Strategies from config, personalization (local entries never leave a territory) and the
aggregation guards, through Flower's own round loop and the real ClientApp (in-process grid)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from clients import territory
from clients.client_app import LOCAL_KEY, app
from fedldt.config import compose_config, resolve_config
from fedldt.models import build_model, local_state_names, split_state
from server.rounds import config_record
from server.strategy import (STRATEGIES, AggregationGuardError, FederationError, build_strategy, reply_territory,
                             strategy_arguments)
from tests.conftest import small_config, write_los_loop_like
from tests.inprocess import InProcessGrid

NODES = {10: {"partition-id": 0}, 11: {"partition-id": 1}}
SMALL_GWNET = ["model=gwnet", "model.residual_channels=8", "model.dilation_channels=8", "model.skip_channels=16",
               "model.end_channels=16", "model.blocks=2", "model.emb_dim=4"]


def _strategy(strategy_cfg, n=2, **kw):  # n territories t0.. on SuperNodes 10..
    return build_strategy(strategy_cfg, territory_ids={i: f"t{i}" for i in range(n)}, report_steps=[3], num_rounds=1,
                          node_territories={10 + i: i for i in range(n)}, min_train_nodes=n, min_evaluate_nodes=n,
                          min_available_nodes=n, **kw)


# ------------------------------------------------------------------ guards, with hand-made replies
def _configure(strategy, template: dict[str, np.ndarray]):
    """Round 1 as the server starts it: the strategy sees the global arrays and the messages get ids."""
    grid = InProcessGrid(app, NODES)
    sent = strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in template.items()}), ConfigRecord(), grid)
    sent = grid.stamp(sent)  # the strategy's own list, stamped in place
    return {int(m.metadata.dst_node_id): m.metadata.message_id for m in sent}


def _reply(ids, idx: int, arrays: dict[str, np.ndarray], n_examples) -> Message:
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": n_examples, "train_loss": 0.5, "territory": idx})})
    md = Metadata(run_id=1, message_id=f"reply-{idx}", src_node_id=10 + idx, dst_node_id=0,
                  reply_to_message_id=ids[10 + idx], group_id="1", created_at=time.time(), ttl=3600.0,
                  message_type=MessageType.TRAIN)
    return Message(content, metadata=md)


def _aggregate(strategy_cfg, template, replies_spec):
    s = _strategy(strategy_cfg)
    ids = _configure(s, template)
    replies = [_reply(ids, i, arrays, n) for i, (arrays, n) in enumerate(replies_spec)]
    arrays, metrics = s.aggregate_train(1, replies)
    return arrays, metrics, s


F32 = np.float32
W = {"w": np.zeros(2, dtype=F32)}


@pytest.mark.parametrize("n0, n1, expected", [(0, 10, [3.0, 4.0]), (10, 30, [2.5, 3.5]), (10, 10, [2.0, 3.0])])
def test_fedavg_weights_by_training_windows(n0, n1, expected):
    arrays, metrics, _ = _aggregate({"name": "fedavg"}, W, [({"w": np.array([1, 2], F32)}, n0),
                                                            ({"w": np.array([3, 4], F32)}, n1)])
    got = arrays["w"].numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array(expected, F32))
    assert metrics["num-examples"] == n0 + n1 and metrics["train_loss"] == pytest.approx(0.5)
    assert "territory" not in metrics  # an averaged territory index means nothing


def test_zero_example_territory_leaves_unweighted_rules_unchanged_too():
    # the median of {[1,2], [3,4]} is [2,3]; the territory with 0 windows must not take part
    arrays, _, _ = _aggregate({"name": "fedmedian"}, W, [({"w": np.array([1, 2], F32)}, 0),
                                                         ({"w": np.array([3, 4], F32)}, 10)])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.array([3, 4], F32))


def test_round_where_every_territory_has_zero_examples_stops():
    with pytest.raises(FederationError, match=r"round 1: every territory that trained reported num-examples=0"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.array([1, 2], F32)}, 0), ({"w": np.array([3, 4], F32)}, 0)])


def test_negative_example_count_is_named():
    with pytest.raises(AggregationGuardError, match=r"territory t1 reported num-examples=-3"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.array([1, 2], F32)}, 5), ({"w": np.array([3, 4], F32)}, -3)])


def test_node_embeddings_of_different_sizes_are_never_broadcast():
    # a 5-node and a 1-node territory: (5, 10) and (1, 10) would broadcast in numpy; the round fails
    template = {"node_emb": np.zeros((5, 10), F32), "w": np.zeros(2, F32)}
    with pytest.raises(AggregationGuardError,
                       match=r"territory t1: parameter 'node_emb' has shape \(1, 10\), the global model has \(5, 10\)"):
        _aggregate({"name": "fedavg"}, template, [({"node_emb": np.ones((5, 10), F32), "w": np.ones(2, F32)}, 5),
                                                  ({"node_emb": np.ones((1, 10), F32), "w": np.ones(2, F32)}, 1)])


def test_reply_with_a_local_or_missing_key_is_named():
    with pytest.raises(AggregationGuardError, match=r"territory t0 .* missing \[\], not shared \['node_emb1'\]"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.ones(2, F32), "node_emb1": np.ones((3, 4), F32)}, 5),
                                           ({"w": np.ones(2, F32)}, 5)])
    with pytest.raises(AggregationGuardError, match=r"territory t1 .* missing \['w'\]"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.ones(2, F32)}, 5), ({"v": np.ones(2, F32)}, 5)])


def test_float64_or_integer_reply_is_refused_not_averaged():
    with pytest.raises(AggregationGuardError, match=r"territory t0: parameter 'w' is float64, the global model is float32"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.array([1, 2], np.float64)}, 5), ({"w": np.ones(2, F32)}, 5)])
    with pytest.raises(AggregationGuardError, match=r"territory t1: parameter 'w' is int64"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.ones(2, F32)}, 5), ({"w": np.array([1, 2], np.int64)}, 5)])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_rule_returns_float32_in_the_global_shapes(name):
    cfg = resolve_config(compose_config([f"strategy={name}"]), require_data=False)["strategy"]
    template = {"a": np.zeros((2, 3), F32), "b": np.zeros(4, F32)}
    rng = np.random.default_rng(0)
    replies = [({k: rng.normal(size=v.shape).astype(F32) for k, v in template.items()}, 10 + i) for i in range(3)]
    s = _strategy(cfg, n=3)
    grid = InProcessGrid(app, {10 + i: {"partition-id": i} for i in range(3)})
    sent = s.configure_train(1, ArrayRecord({k: Array(v) for k, v in template.items()}), ConfigRecord(), grid)
    sent = grid.stamp(sent)  # the strategy's own list, stamped in place
    ids = {int(m.metadata.dst_node_id): m.metadata.message_id for m in sent}
    arrays, _ = s.aggregate_train(1, [_reply(ids, i, a, n) for i, (a, n) in enumerate(replies)])
    for k, v in template.items():
        got = arrays[k].numpy()
        assert got.dtype == np.float32 and got.shape == v.shape and np.isfinite(got).all()
    if name == "fedavg":  # known answer: the example-weighted mean
        w = np.array([10, 11, 12], dtype=np.float64) / 33
        np.testing.assert_allclose(arrays["b"].numpy(), sum(wi * r[0]["b"] for wi, r in zip(w, replies)), rtol=1e-6)
    if name == "fedmedian":
        np.testing.assert_array_equal(arrays["b"].numpy(), np.median([r[0]["b"] for r in replies], axis=0).astype(F32))


def test_nan_example_count_is_named():
    with pytest.raises(AggregationGuardError, match=r"territory t0 reported num-examples=nan; it must be a whole number"):
        _aggregate({"name": "fedavg"}, W, [({"w": np.ones(2, F32)}, float("nan")), ({"w": np.ones(2, F32)}, 5)])


def test_server_optimizer_steps_parameters_but_averages_running_statistics():
    template = {"w": np.zeros(2, F32), "bn.running_var": np.ones(2, F32)}
    s = _strategy({"name": "fedadam", "eta": 0.1}, buffer_keys=["bn.running_var"])
    ids = _configure(s, template)
    replies = [_reply(ids, 0, {"w": np.full(2, 1.0, F32), "bn.running_var": np.full(2, 1.0, F32)}, 10),
               _reply(ids, 1, {"w": np.full(2, 3.0, F32), "bn.running_var": np.full(2, 3.0, F32)}, 30)]
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["bn.running_var"].numpy(), np.full(2, 2.5, F32))  # weighted mean
    w = arrays["w"].numpy()
    assert w.dtype == np.float32 and 0 < w[0] < 0.5  # an Adam step from 0 towards 2.5, not the mean itself
    plain = _strategy({"name": "fedadam", "eta": 0.1})  # without buffer_keys the statistic is stepped too
    ids = _configure(plain, template)
    stepped, _ = plain.aggregate_train(1, [_reply(ids, i, r, n) for i, (r, n) in enumerate(
        [({"w": np.ones(2, F32), "bn.running_var": np.ones(2, F32)}, 10),
         ({"w": np.full(2, 3.0, F32), "bn.running_var": np.full(2, 3.0, F32)}, 30)])])
    assert stepped["bn.running_var"].numpy()[0] != 2.5


def test_krum_needs_enough_territories_and_sampling_is_refused():
    with pytest.raises(ValueError, match=r"krum' needs more than 2\*num_malicious_nodes\+2 territories; the pilot has 2"):
        _strategy({"name": "krum", "num_malicious_nodes": 0}, n=2)
    with pytest.raises(ValueError, match=r"strategy.fraction_train is not supported: every connected territory trains"):
        strategy_arguments({"name": "fedavg", "fraction_train": 0.5})
    with pytest.raises(ValueError, match=r"strategy.num_malicious_nodes=0.5 must be an integer"):
        strategy_arguments({"name": "krum", "num_malicious_nodes": 0.5})
    with pytest.raises(ValueError, match=r"strategy.beta=0.5 must be a number in \[0.0, 0.5\)"):
        strategy_arguments({"name": "fedtrimmedavg", "beta": 0.5})


def test_strategy_options_are_checked_against_the_flower_class():
    assert strategy_arguments({"name": "fedprox", "proximal_mu": 0.1}) == {"proximal_mu": 0.1}
    with pytest.raises(ValueError, match=r"strategy 'fedadam' \(FedAdam\) has no option\(s\) \['etaa'\].*'eta'"):
        strategy_arguments({"name": "fedadam", "etaa": 0.1})
    with pytest.raises(ValueError, match=r"strategy.name='fedsgd' is not one of"):
        strategy_arguments({"name": "fedsgd"})
    with pytest.raises(ValueError, match=r"has no option\(s\) \['weighted_by_key'\]"):  # fedldt sets it
        strategy_arguments({"name": "fedavg", "weighted_by_key": "x"})


def test_flower_free_option_table_is_exactly_the_flower_constructors():
    """fedldt/schema.py lists each Flower class's options so that the config is checked without
    Flower; it must be exactly their constructor parameters, less those fedldt sets and those that
    do nothing on the server (eta_l)."""
    import inspect

    from fedldt.schema import FIXED, OPTIONS, UNUSED

    assert set(OPTIONS) == set(STRATEGIES)
    for name, cls in STRATEGIES.items():
        base = next(c for c in cls.__mro__ if c.__module__.startswith("flwr."))  # the Flower class
        accepted = set(inspect.signature(base.__init__).parameters) - {"self"} - FIXED - UNUSED
        assert OPTIONS[name] == (base.__name__, accepted), name


# ------------------------------------------------------------------ real rounds, real ClientApp
@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory) -> Path:
    return write_los_loop_like(tmp_path_factory.mktemp("strategies") / "syn", num_nodes=11, num_steps=300)


def _run(syn_dir, overrides, rounds=1, nodes=NODES, client_app=app):
    """``rounds`` federated rounds through Flower's ``Strategy.start`` and the real ClientApp
    (``client_app``: the production one, or one with test-only mods)."""
    small = [] if any(o.startswith("model=") for o in overrides) else ["model.hidden=8"]  # dcrnn
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={syn_dir}", f"partition.num_territories={len(nodes)}",
                                         *small, f"train.rounds={rounds}", *overrides]))
    infos = {i: territory.describe(cfg, i) for i in range(len(nodes))}
    torch.manual_seed(int(cfg["seed"]))
    model = build_model({**cfg["model"], **{k: infos[0][k.replace("_", "-")] for k in ("in_channels", "out_channels", "horizon")}},
                        num_nodes=infos[0]["num-nodes"])
    shared, _ = split_state(model, cfg["personalization"]["name"])
    grid = InProcessGrid(client_app, nodes)
    s = _strategy(cfg["strategy"], n=len(nodes))
    init = {k: v.clone() for k, v in shared.items()}
    result = s.start(grid=grid, initial_arrays=ArrayRecord(shared), num_rounds=rounds, timeout=60,
                     train_config=config_record(cfg), evaluate_config=config_record(cfg, split="val"))
    return cfg, init, result.arrays.to_torch_state_dict(), grid, s


def test_fedprox_with_mu_zero_equals_fedavg_on_one_round(syn_dir):
    _, _, avg, _, _ = _run(syn_dir, ["strategy=fedavg", "seed=5"])
    _, _, prox0, grid, _ = _run(syn_dir, ["strategy=fedprox", "strategy.proximal_mu=0.0", "seed=5"])
    assert all(float(m.content["config"]["proximal-mu"]) == 0.0 for m in grid.sent if m.metadata.message_type == "train")
    assert list(avg) == list(prox0) and all(torch.equal(avg[k], prox0[k]) for k in avg)
    _, _, prox1, _, _ = _run(syn_dir, ["strategy=fedprox", "strategy.proximal_mu=1.0", "seed=5"])
    assert any(not torch.equal(avg[k], prox1[k]) for k in avg)  # the proximal term does act


def test_script_only_blocks_never_reach_territories(syn_dir):
    """``sweep`` and ``compare`` are for scripts: no query, train or evaluate message carries them."""
    import json

    from fedldt.config import territory_view
    from fedldt.egress import CONFIG_KEY
    from server.rounds import discover_territories

    cfg, _, _, grid, _ = _run(syn_dir, [])
    assert {"sweep", "compare"} <= set(cfg)  # the scripts see them
    discover_territories(grid, cfg, timeout=30)
    sent = {str(m.metadata.message_type): json.loads(str(m.content["config"][CONFIG_KEY])) for m in grid.sent}
    assert set(sent) == {MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE}
    for kind, received in sent.items():
        assert not {"sweep", "compare"} & set(received), kind
        assert received == territory_view(cfg) and set(received) == set(cfg) - {"sweep", "compare", "resume"}, kind


def test_personalized_entries_never_leave_the_territory(syn_dir):
    cfg, _, final, grid, s = _run(syn_dir, [*SMALL_GWNET, "model.adaptive=true", "personalization=fedper"], rounds=2)
    never_sent = ("node_emb1", "node_emb2", "end1.", "end2.", "num_batches_tracked")
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 4 and not s.failures
    shared_keys = set(final)
    for r in train_replies:
        keys = list(r.content["arrays"].keys())
        assert set(keys) == shared_keys
        assert not [k for k in keys if k.startswith(never_sent) or k.endswith(never_sent)]
        assert all(r.content["arrays"][k].dtype == "float32" for k in keys)
    # each territory kept its own local entries between rounds, with its own node count
    n_nodes = [territory.describe(cfg, i)["num-nodes"] for i in range(2)]
    for node, n in zip(sorted(grid.contexts), n_nodes):
        local = grid.contexts[node].state.array_records[LOCAL_KEY]
        assert tuple(local["node_emb1"].shape) == (n, 4)
        model = build_model({**cfg["model"], **territory.get_task(cfg, node - 10).model_dims()}, num_nodes=n)
        assert set(local.keys()) == set(local_state_names(model, "fedper"))
        assert str(local["norms.0.num_batches_tracked"].dtype) == "int64"
        batches = -(-territory.describe(cfg, node - 10)["num-train"] // cfg["train"]["batch_size"])
        assert int(local["norms.0.num_batches_tracked"].numpy()) == 2 * batches  # its own count over 2 rounds
    assert n_nodes[0] != n_nodes[1]  # territories of different sizes shared one model


def test_local_state_is_used_in_the_next_round_and_in_evaluation(syn_dir):
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={syn_dir}", "partition.num_territories=2",
                                         *SMALL_GWNET, "model.adaptive=true", "personalization=fedper"]))
    task = territory.get_task(cfg, 0)
    torch.manual_seed(0)
    model = build_model({**cfg["model"], **task.model_dims()}, num_nodes=task.dataset.num_nodes)
    shared, init_local = split_state(model, "fedper")
    new_shared, local, _ = territory.train(cfg, 0, shared, server_round=1)
    assert set(local) == set(init_local) and not torch.equal(local["node_emb1"], init_local["node_emb1"])
    with_local = territory.evaluate(cfg, 0, new_shared, "val", local_state=local)["model.abs_err_sum"]
    fresh = territory.evaluate(cfg, 0, new_shared, "val", local_state=None)["model.abs_err_sum"]
    assert with_local != fresh  # the trained head and embeddings are what the territory evaluates
    with pytest.raises(ValueError, match="stored local state has keys"):
        territory.train(cfg, 0, new_shared, server_round=2, local_state={"node_emb1": local["node_emb1"]})


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_config_runs_a_round(syn_dir, name):
    three = {10 + i: {"partition-id": i} for i in range(3)}  # Krum needs more than 2f + 2 territories
    _, init, final, _, s = _run(syn_dir, [f"strategy={name}"], nodes=three)
    assert not s.failures and len(s.history) == 3 and list(final) == list(init)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in final.values())
    assert any(not torch.equal(final[k], init[k]) for k in init)  # the global model moved
    assert np.isfinite(s.rounds[0]["val"]["mae"]["all"])


# ------------------------------------------------------------------ cross-city, different node counts
CITY_NODES = {10: {"partition-id": 0}, 11: {"partition-id": 1}, 12: {"partition-id": 2}}
SMALL = {"dcrnn": ["model.hidden=8"],
         "stgcn": ["model.temporal_channels=8", "model.spatial_channels=4"],
         "gwnet": SMALL_GWNET[1:]}


@pytest.mark.parametrize("model,personalization", [(m, p) for m in ("dcrnn", "stgcn", "gwnet") for p in ("none", "fedper")]
                         + [("stgcn", "fedbn"), ("gwnet", "fedbn")])
def test_cross_city_pilot_with_different_node_counts_runs_every_model(model, personalization, data_root):
    """charged_ev_3cities (Johannesburg, Melbourne, São Paulo: 47/63/47 sites): one shared model
    (Graph WaveNet with per-city adaptive adjacency) over cities of different sizes, one round."""
    cfg = resolve_config(compose_config([
        "pilot=charged_ev_3cities", f"model={model}", *SMALL[model], f"personalization={personalization}",
        "train.rounds=1", "task.train_stride=24", "task.split=[0.3,0.05,0.65]"]))  # a short round: few windows
    infos = {i: territory.describe(cfg, i) for i in range(3)}
    assert sorted(info["num-nodes"] for info in infos.values()) == [47, 47, 63]
    torch.manual_seed(0)
    dims = {k: infos[0][k.replace("_", "-")] for k in ("in_channels", "out_channels", "horizon")}
    shared, local = split_state(build_model({**cfg["model"], **dims}, num_nodes=infos[0]["num-nodes"]), personalization)
    grid = InProcessGrid(app, CITY_NODES)
    s = _strategy(cfg["strategy"], n=3)
    result = s.start(grid=grid, initial_arrays=ArrayRecord(shared), num_rounds=1, timeout=60,
                     train_config=config_record(cfg), evaluate_config=config_record(cfg, split="val"))
    assert not s.failures and [h["train_status"] for h in s.history] == ["ok"] * 3
    assert set(result.arrays.keys()) == set(shared)
    for r in grid.replies:
        if r.metadata.message_type == "train":
            assert set(r.content["arrays"].keys()) == set(shared)  # nothing city-specific was sent
    per_city = [h["val_mae_all"] for h in s.history]
    assert all(np.isfinite(v) and v > 0 for v in per_city)
    if model == "gwnet":
        emb = [grid.contexts[n].state.array_records[LOCAL_KEY]["node_emb1"].shape[0] for n in CITY_NODES]
        assert emb == [infos[i]["num-nodes"] for i in range(3)]


# ------------------------------------------------------------------ server optimizers: known answers
def _round(s, rnd: int, global_arrays: dict[str, np.ndarray], replies_spec, nodes=NODES):
    """One aggregation as the server runs it: configure (the global model), then the replies."""
    grid = InProcessGrid(app, nodes)
    sent = list(s.configure_train(rnd, ArrayRecord({k: Array(v) for k, v in global_arrays.items()}), ConfigRecord(), grid))
    sent = grid.stamp(sent)  # the strategy's own list, stamped in place
    ids = {int(m.metadata.dst_node_id): m.metadata.message_id for m in sent}
    arrays, _ = s.aggregate_train(rnd, [_reply(ids, i, a, n) for i, (a, n) in enumerate(replies_spec)])
    return {k: arrays[k].numpy() for k in arrays.keys()}


ONES = [({"w": np.ones(1, F32)}, 10), ({"w": np.ones(1, F32)}, 10)]  # both territories return 1
ADAM = {"eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001}


def test_fedadam_bias_correction_uses_t_1_at_the_first_update():
    s = _strategy({"name": "fedadam", **ADAM})
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 0.001
    w1 = _round(s, 1, {"w": np.zeros(1, F32)}, ONES)["w"]
    # round 1 (t = 1): delta = 1 - 0 = 1
    m1 = (1 - b1) * 1.0                      # 0.1
    v1 = (1 - b2) * 1.0 ** 2                 # 0.01
    step1 = eta * np.sqrt(1 - b2 ** 1) / (1 - b1 ** 1)  # 0.1 * 0.1 / 0.1 = 0.1
    expected1 = 0 + step1 * m1 / (np.sqrt(v1) + tau)    # 0.1 * 0.1 / 0.101 = 0.0990099
    assert expected1 == pytest.approx(0.0990099, abs=1e-7)
    # the same as mhat/(sqrt(vhat) + tau_hat) with mhat = m1/(1-b1^1) = 1, vhat = v1/(1-b2^1) = 1 and tau
    # scaled as the bias-corrected step scales it (tau_hat = tau/sqrt(1-b2^1) = 0.01): 0.1 * 1 / 1.01
    assert expected1 == pytest.approx(eta * (m1 / (1 - b1)) / (np.sqrt(v1 / (1 - b2)) + tau / np.sqrt(1 - b2)), rel=1e-12)
    assert w1.dtype == np.float32 and w1[0] == pytest.approx(expected1, rel=1e-6)
    assert w1[0] != pytest.approx(0.0735109, abs=1e-4)  # Flower 1.42 (exponent t + 1)
    assert s.optimizer_step == 1 and s.m_t["w"][0] == pytest.approx(m1) and s.v_t["w"][0] == pytest.approx(v1)
    # round 2 (t = 2): the global model is w1, both territories return 1 again
    w2 = _round(s, 2, {"w": w1}, ONES)["w"]
    d2 = 1.0 - float(w1[0])
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = b2 * v1 + (1 - b2) * d2 ** 2
    step2 = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)
    expected2 = float(w1[0]) + step2 * m2 / (np.sqrt(v2) + tau)
    assert w2[0] == pytest.approx(expected2, rel=1e-6) and s.optimizer_step == 2
    with_t3 = float(w1[0]) + eta * np.sqrt(1 - b2 ** 3) / (1 - b1 ** 3) * m2 / (np.sqrt(v2) + tau)
    assert w2[0] != pytest.approx(with_t3, rel=1e-4)  # t did increment by one, not two


def test_fedyogi_follows_the_paper_without_bias_correction():
    """Reddi et al. (ICLR 2021), Algorithm 2: x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau), no
    bias correction; Flower starts v at 0."""
    s = _strategy({"name": "fedyogi", **ADAM})
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 0.001
    w1 = _round(s, 1, {"w": np.zeros(1, F32)}, ONES)["w"]
    m1 = (1 - b1) * 1.0                                           # 0.1
    v1 = 0.0 - (1 - b2) * 1.0 ** 2 * np.sign(0.0 - 1.0 ** 2)       # 0.01
    expected1 = 0 + eta * m1 / (np.sqrt(v1) + tau)                # 0.1 * 0.1 / 0.101 = 0.0990099
    assert expected1 == pytest.approx(0.0990099, abs=1e-7) and w1[0] == pytest.approx(expected1, rel=1e-6)
    w2 = _round(s, 2, {"w": w1}, ONES)["w"]
    d2 = 1.0 - float(w1[0])
    m2 = b1 * m1 + (1 - b1) * d2
    v2 = v1 - (1 - b2) * d2 ** 2 * np.sign(v1 - d2 ** 2)          # v1 < d2^2: v grows
    expected2 = float(w1[0]) + eta * m2 / (np.sqrt(v2) + tau)
    assert w2[0] == pytest.approx(expected2, rel=1e-6) and s.optimizer_step == 2


def test_fedadagrad_follows_the_paper_without_bias_correction():
    """Reddi et al. (ICLR 2021), Algorithm 2, FedAdagrad: v_t = v_{t-1} + delta_t^2 (no beta_2,
    no bias correction); Flower fixes beta_1 = 0, so m_t = delta_t."""
    s = _strategy({"name": "fedadagrad", "eta": 0.1, "tau": 0.001})
    eta, tau = 0.1, 0.001
    w1 = _round(s, 1, {"w": np.zeros(1, F32)}, ONES)["w"]
    m1, v1 = 1.0, 0.0 + 1.0 ** 2
    expected1 = eta * m1 / (np.sqrt(v1) + tau)                    # 0.1 / 1.001 = 0.0999001
    assert expected1 == pytest.approx(0.0999001, abs=1e-7) and w1[0] == pytest.approx(expected1, rel=1e-6)
    w2 = _round(s, 2, {"w": w1}, ONES)["w"]
    d2 = 1.0 - float(w1[0])
    v2 = v1 + d2 ** 2
    expected2 = float(w1[0]) + eta * d2 / (np.sqrt(v2) + tau)
    assert w2[0] == pytest.approx(expected2, rel=1e-6) and s.optimizer_step == 2


# ------------------------------------------------------------------ replies paired with the global model by name
ENC_DEC = {"enc.weight": np.zeros((4, 4), F32), "dec.weight": np.full((4, 4), 10.0, F32)}


def test_fedavgm_pairs_reply_arrays_by_name():
    s = _strategy({"name": "fedavgm", "server_learning_rate": 0.5, "server_momentum": 0.0})
    reordered = {"dec.weight": np.full((4, 4), 2.0, F32), "enc.weight": np.full((4, 4), 1.0, F32)}
    out = _round(s, 1, ENC_DEC, [(reordered, 10), (dict(reordered), 10)])
    # mean: enc 1, dec 2; step: x - 0.5 (x - mean): enc 0 - 0.5 (0 - 1) = 0.5, dec 10 - 0.5 (10 - 2) = 6
    np.testing.assert_array_equal(out["enc.weight"], np.full((4, 4), 0.5, F32))
    np.testing.assert_array_equal(out["dec.weight"], np.full((4, 4), 6.0, F32))
    assert list(out) == ["enc.weight", "dec.weight"]


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedmedian", "fedtrimmedavg", "krum", "fedavgm", "fedyogi"])
def test_reordered_replies_give_the_same_result(name):
    three = {10 + i: {"partition-id": i} for i in range(3)}
    template = {"enc.weight": np.zeros((4, 4), F32), "bias": np.zeros(3, F32), "dec.weight": np.full((4, 4), 10.0, F32)}
    rng = np.random.default_rng(3)  # a draw where Krum, pairing by position, would pick another reply
    replies = [({k: rng.normal(size=v.shape).astype(F32) for k, v in template.items()}, 10 + 5 * i) for i in range(3)]
    def rotated(a, i):  # reply i lists its keys rotated by i + 1: each territory in its own order
        keys = list(a)[i + 1:] + list(a)[:i + 1]
        return {k: a[k] for k in keys}
    reversed_replies = [(rotated(a, i), n) for i, (a, n) in enumerate(replies)]
    assert len({tuple(a) for a, _ in reversed_replies} | {tuple(template)}) == 3
    cfg = {"name": name, **({"server_learning_rate": 0.5} if name == "fedavgm" else {})}
    got = [_round(_strategy(cfg, n=3), 1, template, spec, nodes=three) for spec in (replies, reversed_replies)]
    assert list(got[0]) == list(got[1]) == list(template)
    for k in template:
        np.testing.assert_array_equal(got[0][k], got[1][k])


# ------------------------------------------------------------------ a territory without a valid validation target
def test_territory_with_no_valid_validation_target_does_not_stop_the_run(tmp_path, capsys):
    """Every sensor of one territory is missing over the validation split: its metrics are not
    available (null / empty, eval_status 'not available'), the pooled ones come from the other
    territory exactly, and the run goes on."""
    import json

    import pandas as pd

    from fedldt.config import load_territories
    from fedldt.data.windows import split_bounds
    from fedldt.metrics import MetricSums, pool, report
    from fedldt.results import write_run_outputs

    folder = write_los_loop_like(tmp_path / "syn", num_nodes=10, num_steps=300)
    speed = pd.read_csv(folder / "los_speed.csv", dtype=str)
    cfg = small_config(folder, "train.rounds=2")
    t1, t2 = split_bounds(len(speed), cfg["task"]["split"])["val"]
    dark = set(load_territories(cfg)[1].node_ids)  # territory t1: every sensor missing over the validation split
    speed.loc[t1:t2 - 1, [c for c in speed.columns if c in dark]] = ""
    speed.to_csv(folder / "los_speed.csv", index=False)
    cfg = small_config(folder, "train.rounds=2", "seed=1")  # another cache key: reload
    infos = {i: territory.describe(cfg, i) for i in range(2)}
    torch.manual_seed(0)
    model = build_model({**cfg["model"], **{k: infos[0][k.replace("_", "-")] for k in ("in_channels", "out_channels", "horizon")}},
                        num_nodes=infos[0]["num-nodes"])
    shared, _ = split_state(model, "none")
    grid = InProcessGrid(app, NODES)
    s = _strategy(cfg["strategy"], n=2)
    s.num_rounds = 2
    s.start(grid=grid, initial_arrays=ArrayRecord(shared), num_rounds=2, timeout=60,
            train_config=config_record(cfg), evaluate_config=config_record(cfg, split="val"))
    assert not s.failures and len(s.rounds) == 2
    rows = {(h["round"], h["territory"]): h for h in s.history}
    for rnd in (1, 2):
        assert rows[(rnd, "t1")]["eval_status"] == "not available" and rows[(rnd, "t1")]["val_mae_all"] is None
        assert "no valid target" in rows[(rnd, "t1")]["error"] and rows[(rnd, "t1")]["train_status"] == "ok"
        assert rows[(rnd, "t0")]["eval_status"] == "ok" and rows[(rnd, "t0")]["val_mae_all"] > 0
        # pooled = t0's own sums, exactly
        t0_reply = [r for r in grid.replies if r.metadata.message_type == MessageType.EVALUATE
                    and int(r.content["metrics"]["territory"]) == 0][rnd - 1]
        t0_sums = MetricSums.from_dict(t0_reply.content["metrics"], "model.")
        assert s.rounds[rnd - 1]["val"]["mae"]["all"] == report(pool([t0_sums]), [3])["mae"]["all"]
        assert s.rounds[rnd - 1]["val"]["mae"]["all"] == rows[(rnd, "t0")]["val_mae_all"]
    out = capsys.readouterr().out
    assert "round 2/2" in out and "t1=n/a" in out
    # the results folder: valid JSON (null, never NaN), an empty CSV cell with the status beside it
    write_run_outputs(tmp_path / "run", cfg, {"history": s.rounds}, s.history, {})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["history"][1]["val"]["mae"]["all"] == s.rounds[1]["val"]["mae"]["all"]
    frame = pd.read_csv(tmp_path / "run" / "history.csv")
    dark_rows = frame[frame["territory"] == "t1"]
    assert list(dark_rows["eval_status"]) == ["not available"] * 2 and dark_rows["val_mae_all"].isna().all()


def test_summary_names_a_territory_without_a_valid_test_target(tmp_path):
    import json

    from fedldt.metrics import MetricSums
    from fedldt.results import build_summary, write_run_outputs

    h = 3
    t0 = MetricSums(abs_err_sum=np.array([1.0, 2.0, 3.0]), sq_err_sum=np.array([1.0, 4.0, 9.0]),
                    ape_sum=np.array([0.1, 0.2, 0.3]), abs_target_sum=np.array([10.0, 10.0, 10.0]),
                    num_valid=np.array([2, 2, 2]), num_valid_ape=np.array([2, 2, 2]))
    dark = MetricSums.zeros(h)
    from fedldt.results import REFERENCES

    test = {"t0": {k: t0 for k in ("model", *REFERENCES)}, "t1": {k: dark for k in ("model", *REFERENCES)}}
    cfg = {"name": "p", "dataset": {"name": "d", "path": "/x"}, "train": {"rounds": 1, "local_epochs": 1}, "seed": 0,
           "strategy": {"name": "fedavg"}, "personalization": {"name": "none"}, "task": {"report_steps": [3]}}
    summary = build_summary(cfg, "federated", [], test, [], [], {}, 1.0)
    assert summary["test_not_available"] == ["t1"]
    assert summary["test_per_territory"]["t1"]["mae"] == {"h3": None, "all": None}
    assert summary["test"]["mae"] == {"h3": 1.5, "all": 1.0}  # t0 alone: 3/2 at h3, 6/6 over all steps
    write_run_outputs(tmp_path, cfg, summary, [], {})
    assert json.loads((tmp_path / "summary.json").read_text())["test_per_territory"]["t1"]["rmse"]["all"] is None


def test_a_territory_cannot_report_for_another():
    """A reply is the territory of its SuperNode (discovery), never the index it claims: t1's node
    claiming index 0 would overwrite t0's metrics and weight; a reply from an unknown node or with a
    non-integer index is refused too."""
    s = _strategy({"name": "fedavg"})
    ids = _configure(s, W)
    honest = _reply(ids, 0, {"w": np.ones(2, F32)}, 5)
    forged = _reply(ids, 1, {"w": np.ones(2, F32)}, 5)
    forged.content["metrics"]["territory"] = 0
    with pytest.raises(AggregationGuardError, match=r"SuperNode 11 \(territory index 1\) claims territory index 0"):
        s.aggregate_train(1, [honest, forged])
    assert reply_territory(honest, s.node_territories) == 0
    stranger = _reply(ids, 1, {"w": np.ones(2, F32)}, 5)
    md = stranger.metadata
    stranger = Message(stranger.content, metadata=Metadata(
        run_id=md.run_id, message_id=md.message_id, src_node_id=99, dst_node_id=md.dst_node_id,
        reply_to_message_id=md.reply_to_message_id, group_id=md.group_id, created_at=md.created_at, ttl=md.ttl,
        message_type=md.message_type))
    with pytest.raises(AggregationGuardError, match=r"SuperNode 99, which is not a discovered territory"):
        reply_territory(stranger, s.node_territories)
    bad = _reply(ids, 0, {"w": np.ones(2, F32)}, 5)
    bad.content["metrics"]["territory"] = 0.5
    with pytest.raises(AggregationGuardError, match=r"carries territory=0.5"):
        reply_territory(bad, s.node_territories)
