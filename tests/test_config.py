"""Hydra configs: every pilot and group composes, paths resolve, bad values are named."""

from pathlib import Path

import pytest
import torch
import yaml

from fedldt.config import (CONF_DIR, DATASET_LOADERS, PARTITIONS, compose_config, load_territories, parse_overrides,
                           registered_call, resolve_config)

PILOTS = sorted(p.stem for p in (CONF_DIR / "pilot").glob("*.yaml"))


@pytest.mark.parametrize("pilot", PILOTS)
def test_every_pilot_composes_and_resolves(pilot, data_root):
    cfg = resolve_config(compose_config([f"pilot={pilot}"]))
    assert cfg["name"] == pilot
    assert Path(cfg["dataset"]["path"]).is_absolute() and Path(cfg["dataset"]["path"]).exists()
    assert "${" not in str(cfg)  # fully resolved, nothing left for a client to interpolate


GROUPS = ("dataset", "partition", "model", "strategy", "personalization", "privacy", "train")


def test_every_config_group_is_tested():
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} - {"pilot", "provenance"}  # provenance: plain YAML
    assert groups == set(GROUPS)


@pytest.mark.parametrize("group,option", [(g, o.stem) for g in GROUPS for o in sorted((CONF_DIR / g).glob("*.yaml"))])
def test_each_group_option_instantiates(group, option, data_root):
    """Each conf/<group>/<option>.yaml composes, resolves and builds what it configures."""
    from fedldt.engine import task_from_config
    from server.strategy import STRATEGIES, build_strategy
    from fedldt.models import build_model, local_state_names

    pilot = "charged_ev_3cities" if option == "charged_ev" or option == "as_given" else "los_loop_3"
    extra = ["model=stgcn"] if option == "fedbn" else []  # the default dcrnn has no normalization layers
    if option == "packages":  # a folder of territory data packages: tests/data holds the example package
        extra.append(f"dataset.path={CONF_DIR.parent / 'tests' / 'data'}")
    cfg = resolve_config(compose_config([f"pilot={pilot}", f"{group}={option}", *extra]))
    if group in ("train", "partition"):  # no name field: the group holds the option file's values (the pilot's win)
        pilot_sets = yaml.safe_load((CONF_DIR / "pilot" / f"{pilot}.yaml").read_text()).get(group, {})
        own = {k: cfg["seed"] if v == "${seed}" else v
               for k, v in yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()).items()}
        assert cfg[group] == {**own, **pilot_sets} and len(own) >= 2
    elif group == "privacy":  # named by its mode
        assert cfg[group]["mode"] == option
    else:
        assert cfg[group]["name"] == option
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
            assert bool(extra) == (option in ("fedper", "fedbn"))  # finetune/ditto share what none shares
    elif group == "privacy":
        from server.strategy import TerritoryDP, with_privacy
        s = with_privacy(build_strategy(cfg["strategy"], territory_ids={0: "t0", 1: "t1", 2: "t2"}, report_steps=[3],
                                        num_rounds=1, min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3), cfg)
        assert isinstance(s, TerritoryDP) == (option == "territory") and (s.privacy is None) == (option == "none")


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
    load, args = registered_call(cfg["dataset"], DATASET_LOADERS, "dataset")
    assert load(**args).num_nodes == 207
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


# ------------------------------------------------------------------ no code from files: registered loaders only
def test_every_target_in_conf_is_registered():
    """Existing configs and run folders keep working: every ``_target_`` conf/ uses is registered."""
    for group, registry in (("dataset", DATASET_LOADERS), ("partition", PARTITIONS)):
        for f in sorted((CONF_DIR / group).glob("*.yaml")):
            target = next(line.split(":", 1)[1].strip() for line in f.read_text().splitlines() if line.startswith("_target_:"))
            assert target in registry, f


def _marker_cfg(data_root, tmp_path):
    cfg = resolve_config(compose_config(["pilot=los_loop_3"]))
    marker = tmp_path / "pwned"
    return cfg, marker


@pytest.mark.parametrize("field,block", [
    ("dataset", {"_target_": "builtins.exec", "source": "open({marker!r}, 'w').write('x')"}),
    ("dataset", {"_target_": "os.system", "command": "touch {marker}"}),
    ("partition", {"_target_": "os.system", "command": "touch {marker}"}),
    ("partition", {"_target_": "builtins.exec", "source": "open({marker!r}, 'w').write('x')"}),
])
def test_unregistered_target_is_refused_before_anything_runs(field, block, data_root, tmp_path):
    cfg, marker = _marker_cfg(data_root, tmp_path)
    cfg[field] = {**({"path": cfg["dataset"]["path"]} if field == "dataset" else {"num_territories": 3}),
                  **{k: v.format(marker=str(marker)) for k, v in block.items()}}
    for call in (load_territories, resolve_config):  # a territory's loader and the config check both refuse
        with pytest.raises(ValueError) as err:
            call(cfg)
        assert f"{field}._target_={block['_target_']!r} is not a registered" in str(err.value)
        registry = DATASET_LOADERS if field == "dataset" else PARTITIONS
        assert str(sorted(registry)) in str(err.value)  # the allowed list is named
        assert not marker.exists()


def test_nested_target_in_an_argument_is_refused(data_root, tmp_path):
    cfg, marker = _marker_cfg(data_root, tmp_path)
    cfg["dataset"]["path"] = {"_target_": "os.system", "command": f"touch {marker}"}
    with pytest.raises(ValueError, match=r"dataset\.path\._target_ is not allowed"):
        load_territories(cfg)
    cfg["dataset"]["path"] = str(data_root / "los_loop")
    cfg["partition"]["seed"] = [1, {"x": {"_target_": "os.system", "command": f"touch {marker}"}}]
    with pytest.raises(ValueError, match=r"partition\.seed\[1\]\.x\._target_ is not allowed"):
        load_territories(cfg)
    assert not marker.exists()


def test_unknown_or_missing_loader_argument_is_refused(data_root, tmp_path):
    cfg, _ = _marker_cfg(data_root, tmp_path)
    bad = {**cfg["dataset"], "_args_": ["touch x"], "callback": "os.system"}
    with pytest.raises(ValueError, match=r"dataset: fedldt.data.load_los_loop takes no argument\(s\) \['_args_', 'callback'\]"):
        registered_call(bad, DATASET_LOADERS, "dataset")
    with pytest.raises(ValueError, match=r"partition: fedldt.data.partition_kmeans takes no argument\(s\) \['_partial_'\]"):
        load_territories({**cfg, "partition": {**cfg["partition"], "_partial_": True}})
    no_path = {k: v for k, v in cfg["dataset"].items() if k != "path"}
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['path'\]"):
        registered_call(no_path, DATASET_LOADERS, "dataset")
