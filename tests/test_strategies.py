"""Strategies from config, personalization (local entries never leave a territory) and the
aggregation guards, through Flower's own round loop and the real ClientApp (in-process grid)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from clients.client_app import LOCAL_KEY, app
from fedldt.config import compose_config, resolve_config
from fedldt.federation import client as territory
from fedldt.federation.server import config_record
from fedldt.federation.strategy import (STRATEGIES, AggregationGuardError, FederationError, build_strategy,
                                        strategy_arguments)
from fedldt.models import build_model, local_state_names, split_state
from tests.conftest import write_los_loop_like
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
    sent = list(strategy.configure_train(1, ArrayRecord({k: Array(v) for k, v in template.items()}), ConfigRecord(), grid))
    grid.stamp(sent)
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
    sent = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in template.items()}), ConfigRecord(), grid))
    grid.stamp(sent)
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


# ------------------------------------------------------------------ real rounds, real ClientApp
@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory) -> Path:
    return write_los_loop_like(tmp_path_factory.mktemp("strategies") / "syn", num_nodes=11, num_steps=300)


def _run(syn_dir, overrides, rounds=1, nodes=NODES):
    """``rounds`` federated rounds through Flower's ``Strategy.start`` and the real ClientApp."""
    small = [] if any(o.startswith("model=") for o in overrides) else ["model.hidden=8"]  # dcrnn
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={syn_dir}", f"partition.num_territories={len(nodes)}",
                                         *small, f"train.rounds={rounds}", *overrides]))
    infos = {i: territory.describe(cfg, i) for i in range(len(nodes))}
    torch.manual_seed(int(cfg["seed"]))
    model = build_model({**cfg["model"], **{k: infos[0][k.replace("_", "-")] for k in ("in_channels", "out_channels", "horizon")}},
                        num_nodes=infos[0]["num-nodes"])
    shared, _ = split_state(model, cfg["personalization"]["name"])
    grid = InProcessGrid(app, nodes)
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
