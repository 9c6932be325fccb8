"""The models x strategies sweep: its combinations, shared overrides and results table."""

import pytest

from fedldt.config import compose_config, resolve_config
from fedldt.sweep import base_overrides, sweep_combinations, sweep_markdown


def test_combinations_follow_the_config_order():
    cfg = resolve_config(compose_config(["pilot=los_loop_3"]), require_data=False)
    combos = sweep_combinations(cfg["sweep"])
    assert len(combos) == 12 and combos[0] == ("dcrnn", "fedavg", "none") and combos[3] == ("dcrnn", "fedavg", "fedper")
    assert [c[0] for c in combos] == ["dcrnn"] * 4 + ["stgcn"] * 4 + ["gwnet"] * 4
    with pytest.raises(ValueError, match="must be non-empty"):
        sweep_combinations({"models": [], "strategies": [{"strategy": "fedavg"}]})
    with pytest.raises(ValueError, match=r"entry 'fedavg' must be \{strategy"):
        sweep_combinations({"models": ["dcrnn"], "strategies": ["fedavg"]})


def test_shared_overrides_keep_the_pilot_and_refuse_per_model_keys():
    ov = ["pilot=los_loop_3", "seed=2", "model=stgcn", "strategy=fedprox", "mode=local", "hydra.run.dir=/x",
          "sweep.publish_dir=d", "train.rounds=3"]
    assert base_overrides(ov) == ["pilot=los_loop_3", "seed=2", "train.rounds=3"]
    with pytest.raises(ValueError, match=r"overrides \['model.hidden=8', '\+strategy.eta=1'\] would apply to every"):
        base_overrides(["pilot=los_loop_3", "model.hidden=8", "+strategy.eta=1"])


def test_markdown_table_marks_the_best_row_and_lists_persistence():
    cfg = resolve_config(compose_config(["pilot=los_loop_3"]), require_data=False)
    block = lambda x: {"mae": {"h3": x, "h6": x + 1, "h12": x + 2, "all": x + 0.5}}  # noqa: E731
    rows = [{"model": "dcrnn", "strategy": "fedavg", "personalization": "none", "test": block(3.0),
             "persistence": block(4.0), "wall_time_s": 100.4},
            {"model": "gwnet", "strategy": "fedadam", "personalization": "fedper", "test": block(2.5),
             "persistence": block(4.0), "wall_time_s": 250.0}]
    md = sweep_markdown(rows, cfg)
    assert "| dcrnn | fedavg | none | 3.000 | 4.000 | 5.000 | 3.500 | 100 |" in md
    assert "| gwnet **(best)** | fedadam | fedper | 2.500 | 3.500 | 4.500 | 3.000 | 250 |" in md
    assert "| persistence (last value) | | | 4.000 | 5.000 | 6.000 | 4.500 | |" in md
