"""scripts/compare.py over seeds (issue 14): aggregation, paired gains, references, finetune ->
federated, who helps whom, and one real two-seed comparison (centralized and local, seconds)."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedldt.compare import (
    ARTIFACTS,
    base_overrides,
    comparison_json,
    comparison_markdown,
    contribution_matrix,
    federated_from_finetune,
    paired_gain,
    plot_territory_mae,
    run_comparison,
    run_overrides,
    runs_for,
)
from fedldt.results import REFERENCES

STEPS = ("h3", "h12", "all")
#: Reference MAE used in every territory; seasonal naive (and any later reference) worse than both.
REF_MAE = {"persistence": 5.0, "historical_average": 3.0}


def block(v):
    """A summary.json metric block with MAE ``v`` at every step (RMSE 2v, MAPE/WAPE v/10)."""
    scale = {"mae": 1.0, "rmse": 2.0, "mape": 0.1, "wape": 0.1}
    return {m: {s: None if v is None else v * k for s in STEPS} for m, k in scale.items()}


def summary(seed, per_territory, **extra):
    """A synthetic summary.json: test MAE per territory ``{id: value}``, the references of REF_MAE."""
    terr = list(per_territory)
    out = {"territories": [{"id": t, "num_nodes": 3, "num_test_windows": 10} for t in terr], "rounds": 1,
           "local_epochs": 1, "seed": seed, "wall_time_s": 2.0,
           "test": block(next(v for v in per_territory.values() if v is not None)),
           "test_per_territory": {t: block(v) for t, v in per_territory.items()}}
    for r in REFERENCES:
        out[r] = block(REF_MAE.get(r, 10.0))
        out[f"{r}_per_territory"] = {t: block(REF_MAE.get(r, 10.0)) for t in terr}
    return {**out, **extra}


def three_seeds():
    """Seeds 0-2: local MAE of a = 1, 2, 4 (b: None in seed 2); federated a = local - 1 +- 0.1."""
    local = [{"a": 1.0, "b": 6.0}, {"a": 2.0, "b": 6.0}, {"a": 4.0, "b": None}]
    fed = [{"a": 0.1, "b": 2.5}, {"a": 0.9, "b": 2.6}, {"a": 3.0, "b": 2.4}]
    return {s: {"federated": summary(s, fed[s]), "local": summary(s, local[s])} for s in range(3)}


def test_three_seeds_are_averaged_with_sample_std_and_none_stays_none():
    cmp = comparison_json(three_seeds())
    assert cmp["seeds"] == [0, 1, 2]
    assert {"federated", "local", *REFERENCES, "gains", "best_reference", "useful"} <= set(cmp)
    a = cmp["local"]["test_per_territory"]["a"]["mae"]["all"]
    assert a == pytest.approx(7 / 3)
    assert cmp["local"]["test_per_territory_std"]["a"]["mae"]["all"] == pytest.approx(math.sqrt(7 / 3))  # ddof=1
    assert cmp["local"]["test_per_territory_std"]["a"]["rmse"]["h3"] == pytest.approx(2 * math.sqrt(7 / 3))
    assert cmp["local"]["test_per_territory"]["b"]["mae"]["all"] is None  # None in one seed: None
    assert cmp["local"]["test_per_territory_std"]["b"]["mae"]["all"] is None
    assert cmp["federated"]["test_per_territory"]["b"]["mae"]["h3"] == pytest.approx(2.5)
    assert cmp["federated"]["test_per_territory_std"]["b"]["mae"]["h3"] == pytest.approx(0.1)
    assert cmp["persistence"]["test"]["mae"]["all"] == 5.0 and cmp["persistence"]["test_std"]["mae"]["all"] == 0.0
    text = json.dumps(cmp, allow_nan=False)  # valid JSON: no NaN anywhere
    assert "NaN" not in text and json.loads(text)["seeds"] == [0, 1, 2]


def test_paired_verdict_gains_loses_no_clear_difference_and_one_seed():
    g = paired_gain([1.0, 1.1, 0.9], [2.0, 2.0, 2.0])  # d = -1, -0.9, -1.1: mean -1, sd 0.1
    assert g["verdict"] == "gains" and g["mean_diff"] == pytest.approx(-1.0) and g["std_diff"] == pytest.approx(0.1)
    assert g["relative_change"] == pytest.approx(-0.5) and g["basis"] == "paired over 3 seeds"
    assert paired_gain([3.0, 2.9, 3.1], [2.0, 2.0, 2.0])["verdict"] == "loses"
    g = paired_gain([1.7, 2.1, 1.9], [2.0, 2.0, 2.0])  # d = -0.3, 0.1, -0.1: mean -0.1 within sd 0.2
    assert g["verdict"] == "no clear difference" and g["std_diff"] == pytest.approx(0.2)
    # both move together over seeds: d = -0.1 every seed (sd(d) = 0) but each method's MAE spreads by
    # sd 1.0 over seeds, so a 0.1 gain is inside the seed-to-seed spread
    g = paired_gain([1.9, 2.9, 3.9], [2.0, 3.0, 4.0])
    assert g["std_diff"] == pytest.approx(0.0, abs=1e-12) and g["spread"] == pytest.approx(1.0)
    assert g["verdict"] == "no clear difference"
    one = paired_gain([0.98], [1.0])
    assert one == {"mean_diff": pytest.approx(-0.02), "std_diff": None, "spread": None, "relative_change": pytest.approx(-0.02),
                   "verdict": "gains", "basis": "one seed"}
    assert paired_gain([0.995], [1.0])["verdict"] == "no clear difference"
    assert paired_gain([1.02], [1.0])["verdict"] == "loses"
    assert paired_gain([1.0, None], [1.0, 1.0])["verdict"] == "n/a"
    with pytest.raises(ValueError, match="one MAE per seed"):
        paired_gain([1.0], [1.0, 2.0])


def test_gains_in_comparison_json_are_paired_per_territory():
    cmp = comparison_json(three_seeds())
    a = cmp["gains"]["federated"]["a"]  # d = -0.9, -1.1, -1.0, but local's own MAE spreads by sd sqrt(7/3) over seeds
    assert a["mean_diff"] == pytest.approx(-1.0) and a["std_diff"] == pytest.approx(0.1)
    assert a["spread"] == pytest.approx(math.sqrt(7 / 3)) and a["verdict"] == "no clear difference"
    assert cmp["gains"]["federated"]["b"]["verdict"] == "n/a"
    assert "local" not in cmp["gains"]


def test_best_reference_and_useful_only_where_it_beats_it_by_more_than_its_spread():
    # territory a: mean 2.5 +- 0.3 vs historical average 3.0: useful; b: 2.95 +- 0.1: not (2.95 > 2.9)
    seeds = {s: {"federated": summary(s, {"a": 2.5 + d, "b": 2.95 + d / 3})} for s, d in enumerate((-0.3, 0.0, 0.3))}
    cmp = comparison_json(seeds)
    assert cmp["best_reference"] == {t: {"reference": "historical_average", "mae": 3.0} for t in ("a", "b")}
    ua, ub = cmp["useful"]["federated"]["a"], cmp["useful"]["federated"]["b"]
    assert ua["useful"] is True and ua["std"] == pytest.approx(0.3) and ua["margin"] == pytest.approx(0.5)
    assert ub["useful"] is False and ub["margin"] == pytest.approx(0.05)
    assert cmp["gains"] == {}  # no local run: nothing to pair with
    one = comparison_json({0: {"federated": summary(0, {"a": 2.99, "b": None})}})
    assert one["useful"]["federated"]["a"]["useful"] is True and one["useful"]["federated"]["a"]["std"] is None
    assert one["useful"]["federated"]["b"]["useful"] is None


def test_finetune_run_gives_federated_from_its_global_test():
    assert runs_for(["federated", "finetune", "local"]) == ["finetune", "local"]
    assert runs_for(["federated", "ditto"]) == ["federated", "ditto"]
    ft = summary(0, {"a": 1.0}, global_test=block(2.0), global_test_per_territory={"a": block(2.5)},
                 personalization="finetune", personalization_result={"a": {"kept": "finetuned"}})
    fed = federated_from_finetune(ft)
    assert fed["test"] == block(2.0) and fed["test_per_territory"] == {"a": block(2.5)}
    assert fed["personalization"] == "none" and "personalization_result" not in fed and "global_test" not in fed
    assert ft["test"] == block(1.0)  # the finetune summary itself is unchanged
    with pytest.raises(ValueError, match="no global_test"):
        federated_from_finetune(summary(0, {"a": 1.0}))


def test_overrides_of_each_run():
    base = base_overrides(["pilot=los_loop_3", "seed=3", "mode=local", "personalization=fedper", "compare.seeds=[0,1]",
                           "hydra.run.dir=x", "train.rounds=2"])
    assert base == ["pilot=los_loop_3", "train.rounds=2"]
    assert run_overrides(base, "finetune", 2) == ["pilot=los_loop_3", "train.rounds=2", "seed=2", "personalization=finetune"]
    assert run_overrides(base, "local", 1) == ["pilot=los_loop_3", "train.rounds=2", "seed=1"]
    assert run_overrides(base + ["federation.holdout=t9"], "federated", 0, holdout="t1")[-2:] == [
        "personalization=none", "federation.holdout='t1'"]
    with pytest.raises(ValueError, match="cannot be held out"):
        run_overrides(base, "federated", 0, holdout="a,b")


def test_contribution_matrix_from_synthetic_summaries():
    with_all = {s: summary(s, {"a": 2.0, "b": 3.0, "c": 4.0}) for s in (0, 1)}
    without = {0: {"a": summary(0, {"b": 3.5, "c": 4.0}), "b": summary(0, {"a": 1.9, "c": None})},
               1: {"a": summary(1, {"b": 3.3, "c": 4.2}), "b": summary(1, {"a": 2.1, "c": 4.0})}}
    m = contribution_matrix(with_all, without)
    assert list(m) == ["a", "b"] and set(m["a"]) == {"b", "c"} and set(m["b"]) == {"a", "c"}
    assert m["a"]["b"]["mean"] == pytest.approx(0.4) and m["a"]["b"]["std"] == pytest.approx(math.sqrt(0.02))
    assert m["a"]["b"]["per_seed"] == [pytest.approx(0.5), pytest.approx(0.3)]
    assert m["a"]["c"]["mean"] == pytest.approx(0.1)
    assert m["b"]["a"]["mean"] == pytest.approx(0.0)
    assert m["b"]["c"] == {"mean": None, "std": None, "per_seed": [None, pytest.approx(0.0)]}
    per_seed = {s: {"federated": with_all[s]} for s in (0, 1)}
    cmp = comparison_json(per_seed, without)
    assert cmp["contribution"]["a"]["b"]["mean"] == pytest.approx(0.4)
    md = comparison_markdown(cmp, per_seed, "syn")
    assert "## Who helps whom" in md and "| a | — | 0.400 ± 0.141 | 0.100 ± 0.141 |" in md
    json.dumps(cmp, allow_nan=False)


def test_holdout_blocks_get_their_own_section():
    hold = [{"territory": "c", "zero_shot": block(z), "finetuned": None, "finetune_history": None,
             "references": {r: block(REF_MAE.get(r, 10.0)) for r in REFERENCES}} for z in (2.0, 4.0)]
    per_seed = {s: {"federated": summary(s, {"a": 1.0, "b": 1.0}, holdout=hold[s])} for s in (0, 1)}
    cmp = comparison_json(per_seed)
    h = cmp["holdout"]["federated"]
    assert h["territory"] == "c" and h["zero_shot"]["mae"]["h3"] == 3.0
    assert h["zero_shot_std"]["mae"]["h3"] == pytest.approx(math.sqrt(2))
    assert h["finetuned"] is None and h["references"]["historical_average"]["mae"]["all"] == 3.0
    md = comparison_markdown(cmp, per_seed, "syn")
    assert "### federated: c held out" in md and "| zero-shot | 3.000 ± 1.414 |" in md


def test_markdown_has_a_section_per_territory_and_the_plot(tmp_path):
    per_seed = three_seeds()
    cmp = comparison_json(per_seed)
    md = comparison_markdown(cmp, per_seed, "syn")
    assert "## What federation gives a" in md and "## What federation gives b" in md
    assert "| local | 1.000 ± 1.000 | 1.000 ± 1.000 | 2.333 ± 1.528 |" not in md  # per territory, not pooled
    assert "| local | 2.333 ± 1.528 | 2.333 ± 1.528 | 2.333 ± 1.528 |" in md  # territory a, every step
    assert "-1.000 (spread 1.528) (-42.9%): no clear difference" in md and "Best reference: historical_average (MAE 3.000)" in md
    assert "does each territory gain" in md.lower() and f"({ARTIFACTS[4]})" in md and "Plot: panel `b`" in md
    path = plot_territory_mae(cmp, tmp_path)
    assert path.name == "mae_by_territory.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_two_seeds_of_centralized_and_local_run_into_seed_folders(synthetic_dir, small_cfg, tmp_path):
    cfg = small_cfg(synthetic_dir, "train.rounds=1", "task.train_stride=8", "compare.seeds=[0,1]",
                    "compare.methods=[centralized,local]")
    cmp = run_comparison(cfg, [], tmp_path / "out", publish_dir=tmp_path / "pub")
    for s in (0, 1):
        for m in ("centralized", "local"):
            run = json.loads((tmp_path / "out" / f"seed{s}" / m / "summary.json").read_text())
            assert run["seed"] == s and run["mode"] == m
    assert cmp["seeds"] == [0, 1] and set(cmp["gains"]) == {"centralized"}
    s0 = json.loads((tmp_path / "out" / "seed0" / "local" / "summary.json").read_text())
    s1 = json.loads((tmp_path / "out" / "seed1" / "local" / "summary.json").read_text())
    t = s0["territories"][0]["id"]
    v0, v1 = s0["test_per_territory"][t]["mae"]["all"], s1["test_per_territory"][t]["mae"]["all"]
    assert v0 != v1  # the seed reached the runs
    assert cmp["local"]["test_per_territory"][t]["mae"]["all"] == pytest.approx((v0 + v1) / 2)
    assert cmp["local"]["test_per_territory_std"][t]["mae"]["all"] == pytest.approx(abs(v0 - v1) / math.sqrt(2))
    assert json.loads((tmp_path / "out" / "comparison.json").read_text(), parse_constant=pytest.fail) == cmp
    assert sorted(p.name for p in (tmp_path / "pub").iterdir() if not p.name.startswith(".")) == sorted(ARTIFACTS)


def test_contribution_needs_every_territory_in_the_full_run(synthetic_dir, small_cfg, tmp_path):
    cfg = small_cfg(synthetic_dir, "compare.contribution=true", "compare.methods=[local]")
    cfg = {**cfg, "federation": {**cfg["federation"], "holdout": "t0"}}
    with pytest.raises(ValueError, match="compare.contribution=true needs every territory.*federation.holdout=t0"):
        run_comparison(cfg, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before any run
    per_seed = {0: {"local": summary(0, {"a": 1.0})}}
    with pytest.raises(ValueError, match="method 'federated'"):
        comparison_json(per_seed, {0: {"a": summary(0, {"b": 1.0})}})


def test_methods_and_seeds_of_the_config():
    from fedldt.compare import compare_methods, compare_seeds

    assert compare_seeds({"seed": 7, "compare": {"seeds": None}}) == [7]
    assert compare_seeds({"seed": 7, "compare": {"seeds": [2, 0]}}) == [2, 0]
    assert compare_methods({"compare": {"methods": ["local"], "contribution": True}}) == ["local", "federated"]
    assert compare_methods({"compare": {"methods": ["finetune", "federated"]}}) == ["finetune", "federated"]
    with pytest.raises(ValueError, match=r"\['fedsgd'\] unknown"):
        compare_methods({"compare": {"methods": ["fedsgd"]}})


finite = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


@given(st.lists(st.tuples(finite, finite), min_size=1, max_size=6))
def test_paired_verdict_flips_when_method_and_local_swap(pairs):
    m, loc = [p[0] for p in pairs], [p[1] for p in pairs]
    a, b = paired_gain(m, loc), paired_gain(loc, m)
    flip = {"gains": "loses", "loses": "gains", "no clear difference": "no clear difference", "n/a": "n/a"}
    assert a["mean_diff"] == -b["mean_diff"]
    if len(pairs) > 1:  # (one seed: the 1 % rule is relative to local, not symmetric)
        assert b["verdict"] == flip[a["verdict"]]
        assert a["std_diff"] == pytest.approx(b["std_diff"]) and a["std_diff"] >= 0


def test_compared_seeds_keep_the_base_seeds_territories():
    """The bug of stop 12: ``seed=<k>`` also moved the k-means clusters of los_loop_3 (t0 had 92 or
    91 sensors instead of 93 in seeds 1 and 2), so the seeds compared different territories. Pinned
    (:func:`partition_pin`), every seed's federated run has the base seed's sensors."""
    from fedldt.compare import partition_pin
    from fedldt.config import compose_config, load_territories, resolve_config

    base_cfg = resolve_config(compose_config(["pilot=los_loop_3"]))
    pin = partition_pin(base_cfg)
    assert pin == [f"partition.seed={base_cfg['seed']}"]
    nodes = lambda cfg: {t.name: list(t.node_ids) for t in load_territories(cfg)}  # noqa: E731
    want = nodes(base_cfg)
    moved = [s for s in (1, 2) if nodes(resolve_config(compose_config(run_overrides(["pilot=los_loop_3"], "federated", s)))) != want]
    assert moved, "the unpinned seed no longer moves the clusters: this test lost its point"
    for s in (1, 2):
        cfg = resolve_config(compose_config(run_overrides(["pilot=los_loop_3", *pin], "finetune", s)))
        assert cfg["seed"] == s and nodes(cfg) == want


def test_reuse_reads_finished_runs_of_the_same_config_only(synthetic_dir, small_cfg, tmp_path, capsys):
    """compare.reuse: a comparison that stopped continues in its folder. Runs finished there with
    the same config are read (their files untouched), a run of another config runs again, and the
    comparison is the same as the first one."""
    over = ("train.rounds=1", "task.train_stride=8", "compare.seeds=[0,1]", "compare.methods=[centralized,local]")
    first = run_comparison(small_cfg(synthetic_dir, *over), [], tmp_path / "out")
    summaries = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("seed*/*/summary.json")}
    assert len(summaries) == 4
    (tmp_path / "out" / "seed1" / "local" / "summary.json").unlink()  # as if the run had stopped there
    capsys.readouterr()
    again = run_comparison(small_cfg(synthetic_dir, *over, "compare.reuse=true"), [], tmp_path / "out")
    log = capsys.readouterr().out
    assert log.count("(compare.reuse)") == 3 and "=== seed 1 local ===" in log
    assert again == first
    for p, mtime in summaries.items():
        if p.parent.name != "local" or p.parent.parent.name != "seed1":
            assert p.stat().st_mtime_ns == mtime  # read, not rewritten
    other = run_comparison(small_cfg(synthetic_dir, *over, "compare.reuse=true", "train.lr=0.002"), [], tmp_path / "out")
    assert "(compare.reuse)" not in capsys.readouterr().out  # another learning rate: every run runs again
    assert other["local"]["test"] != first["local"]["test"]
