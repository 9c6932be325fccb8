"""Hydra configs: every pilot and group composes, paths resolve, bad values are named."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from fedldt.config import CONF_DIR, compose_config, load_territories, parse_overrides, resolve_config

PILOTS = sorted(p.stem for p in (CONF_DIR / "pilot").glob("*.yaml"))


@pytest.mark.parametrize("pilot", PILOTS)
def test_every_pilot_composes_and_resolves(pilot, data_root):
    cfg = resolve_config(compose_config([f"pilot={pilot}"]))
    assert cfg["name"] == pilot
    assert Path(cfg["dataset"]["path"]).is_absolute() and Path(cfg["dataset"]["path"]).exists()
    assert "${" not in str(cfg)  # fully resolved, nothing left for a client to interpolate


def test_each_group_option_composes():
    for group in ("dataset", "partition", "model", "strategy", "train"):
        for option in sorted((CONF_DIR / group).glob("*.yaml")):
            cfg = compose_config([f"{group}={option.stem}"])
            assert group in cfg


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
