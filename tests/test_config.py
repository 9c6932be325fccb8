"""Hydra configs: every pilot and group composes, paths resolve, bad values are named."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from fedldt.config import CONF_DIR, compose_config, load_territories, parse_overrides, resolve_config

PILOTS = sorted(p.stem for p in (CONF_DIR / "pilot").glob("*.yaml"))


@pytest.mark.parametrize("pilot", PILOTS)
def test_every_pilot_composes_and_resolves(pilot, data_root):
    cfg = resolve_config(compose_config([f"pilot={pilot}"]))
    assert cfg["name"] == pilot
    assert Path(cfg["dataset"]["path"]).is_absolute() and Path(cfg["dataset"]["path"]).exists()
    assert "${" not in str(cfg)  # fully resolved, nothing left for a client to interpolate


GROUPS = ("dataset", "partition", "model", "strategy", "personalization", "train")


def test_every_config_group_is_tested():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"pilot", "provenance"}  # provenance: plain YAML
    assert groups == set(GROUPS)


@pytest.mark.parametrize("group,option", [(g, o.stem) for g in GROUPS for o in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_each_group_option_instantiates(group, option, data_root):
    """Each conf/<group>/<option>.yaml composes, resolves and builds what it configures."""
    from fedldt.engine import task_from_config
    from fedldt.federation.strategy import STRATEGIES, build_strategy
    from fedldt.models import build_model, local_state_names

    pilot = "charged_ev_3cities" if option == "charged_ev" or option == "as_given" else "los_loop_3"
    extra = ["model=stgcn"] if option == "fedbn" else []  # the default dcrnn has no normalization layers
    cfg = resolve_config(compose_config([f"pilot={pilot}", f"{group}={option}", *extra]))
    assert cfg[group]["name"] == option if group not in ("train", "partition") else True
    if group in ("dataset", "partition"):
        territories = load_territories(cfg)
        assert len(territories) == cfg["partition"]["num_territories"] and all(t.num_nodes > 0 for t in territories)
    elif group == "train":
        task = task_from_config(load_territories(cfg)[0], cfg["task"], cfg["train"])
        assert task.num_windows("train") > 0
    elif group == "model":
        model = build_model({**cfg["model"], "in_channels": 3, "out_channels": 1, "horizon": 12}, num_nodes=7)
        out = model(torch.randn(2, 12, 7, 3), torch.tensor([[0, 1], [1, 0]]), torch.ones(2))
        assert out.shape == (2, 12, 7, 1) and torch.isfinite(out).all()
    elif group == "strategy":
        s = build_strategy(cfg["strategy"], territory_ids={0: "t0", 1: "t1", 2: "t2"}, report_steps=[3], num_rounds=1,
                           min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3)
        assert isinstance(s, STRATEGIES[option])
    elif group == "personalization":
        for name in ("dcrnn", "stgcn", "gwnet"):
            model_cfg = resolve_config(compose_config([f"model={name}"]))["model"]
            model = build_model({**model_cfg, "in_channels": 3, "out_channels": 1, "horizon": 12}, num_nodes=7)
            if option == "fedbn" and name == "dcrnn":
                with pytest.raises(ValueError, match="no normalization layers"):
                    local_state_names(model, option)
                continue
            extra = set(local_state_names(model, option)) - set(local_state_names(model, "none"))
            assert bool(extra) == (option != "none")


@pytest.mark.parametrize("override,field", [("strategy.proximal_mu=-1", "proximal_mu"),
                                            ("+strategy.etaa=0.1", "etaa"),
                                            ("personalization.name=fedsgd", "personalization.name"),
                                            ("personalization=fedbn", "model 'dcrnn' has no normalization layers"),
                                            ("strategy.num_malicious_nodes=1", r"krum needs more than .* territories; "
                                                                               r"partition.num_territories=3")])
def test_bad_strategy_or_personalization_is_named(override, field, data_root):
    ov = {"proximal": ["strategy=fedprox"], "etaa": ["strategy=fedadam"], "malicious": ["strategy=krum"]}
    ov = next((v for key, v in ov.items() if key in override), [])
    with pytest.raises(ValueError, match=field):
        resolve_config(compose_config(["pilot=los_loop_3", *ov, override]))


def test_dataset_and_partition_instantiate(data_root):
    cfg = resolve_config(compose_config(["pilot=los_loop_3"]))
    ds = instantiate(cfg["dataset"])
    assert ds.num_nodes == 207
    territories = load_territories(cfg)
    assert [t.name for t in territories] == ["t0", "t1", "t2"]


def test_relative_data_root_does_not_depend_on_cwd(tmp_path, monkeypatch, data_root):
    monkeypatch.chdir(tmp_path)
    cfg = resolve_config(compose_config(["pilot=los_loop_3"]))
    assert Path(cfg["dataset"]["path"]) == (data_root / "los_loop").resolve()


def test_missing_data_path_names_field_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset.path=.*paths.data_root="):
        resolve_config(compose_config(["pilot=los_loop_3", f"paths.data_root={tmp_path}/nowhere"]))


@pytest.mark.parametrize("override,field", [("train.rounds=0", "train.rounds"), ("task.window=0", "task.window"),
                                            ("task.report_steps=[3,24]", "task.report_steps")])
def test_bad_values_are_named(override, field, data_root):
    with pytest.raises(ValueError, match=field):
        resolve_config(compose_config(["pilot=los_loop_3", override]))


def test_parse_overrides_accepts_json_and_plain():
    assert parse_overrides('["pilot=los_loop_3", "train.rounds=2"]') == ["pilot=los_loop_3", "train.rounds=2"]
    assert parse_overrides("pilot=los_loop_3 seed=1") == ["pilot=los_loop_3", "seed=1"]
    assert parse_overrides("") == []


def test_unknown_pilot_is_an_error_listing_the_pilots():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="los_loop_3"):
        compose_config(["pilot=los_loop3"])
