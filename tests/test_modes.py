"""Centralized and local reference modes, the comparison artifacts, the CHARGED loader."""

import json

import numpy as np
import pandas as pd
import pytest

from fedldt.baselines import build_tasks, run_centralized, run_local
from fedldt.compare import comparison_json, comparison_markdown
from fedldt.config import compose_config, resolve_config
from fedldt.data import load_charged_city
from fedldt.results import REFERENCES


#: What these tests add to the shared small config (conftest.small_config).
MODES_RUN = ("train.rounds=2", "seed=5")


def test_modes_use_identical_splits_and_test_windows(synthetic_dir, small_cfg, tmp_path):
    cfg = small_cfg(synthetic_dir, *MODES_RUN)
    cent = run_centralized({**cfg, "mode": "centralized"}, tmp_path / "c")
    loc = run_local({**cfg, "mode": "local"}, tmp_path / "l")
    assert cent["mode"] == "centralized" and loc["mode"] == "local"
    assert cent["territories"] == loc["territories"]
    assert [t["num_test_windows"] for t in cent["territories"]] == [300 - 240 - 24 + 1] * 2
    # the federated clients build their tasks with the same function; check first/last test targets
    tasks = build_tasks(cfg)
    for t in tasks:
        info = t.split_info("test")
        assert pd.Timestamp(info["first_target"]) == pd.Timestamp("2012-03-01") + pd.Timedelta(minutes=5 * (240 + 12))
        assert pd.Timestamp(info["last_target"]) == pd.Timestamp("2012-03-01") + pd.Timedelta(minutes=5 * 299)
    assert cent["persistence"] == loc["persistence"] and cent["historical_average"] == loc["historical_average"]
    assert cent["test"] != loc["test"]  # different models, different numbers
    hist = pd.read_csv(tmp_path / "l" / "history.csv")
    assert len(hist) == 2 * 2 and list(hist["round"]) == [1, 1, 2, 2]
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["test"] == cent["test"]


def test_centralized_on_one_territory_equals_local(synthetic_dir, small_cfg, tmp_path):
    cfg = small_cfg(synthetic_dir, *MODES_RUN, "partition.num_territories=1")
    cent = run_centralized({**cfg, "mode": "centralized"}, tmp_path / "c")
    loc = run_local({**cfg, "mode": "local"}, tmp_path / "l")
    assert cent["test"] == loc["test"]
    assert cent["history"] == loc["history"]


def test_comparison_json_and_markdown(synthetic_dir, small_cfg, tmp_path):
    cfg = small_cfg(synthetic_dir, *MODES_RUN, "train.rounds=1")
    s = {"centralized": run_centralized({**cfg, "mode": "centralized"}, tmp_path / "c"),
         "local": run_local({**cfg, "mode": "local"}, tmp_path / "l")}
    s["federated"] = {**s["centralized"], "mode": "federated"}  # stand-in: same schema, same windows
    cmp = comparison_json({5: s})
    assert set(cmp) == {"seeds", "federated", "centralized", "local", *REFERENCES, "gains", "best_reference", "useful"}
    assert set(cmp["persistence"]) == {"test", "test_per_territory", "test_std", "test_per_territory_std"}
    assert cmp["seeds"] == [5] and cmp["local"]["test"] == s["local"]["test"]  # one seed: the run's own values
    assert cmp["local"]["test_std"]["mae"]["all"] is None
    md = comparison_markdown(cmp, {5: s}, "syn")
    assert "| persistence |" in md and "does each territory gain" in md.lower()
    bad = {**s, "local": {**s["local"], "persistence": {"mae": {}}}}
    with pytest.raises(ValueError, match="other test windows"):
        comparison_json({5: bad})


def test_charged_columns_resorted_numerically_and_zero_sites_masked(data_root):
    city = load_charged_city(data_root / "charged_ev", "JHB", graph={"method": "knn", "k": 4})
    raw = pd.read_csv(data_root / "charged_ev" / "JHB" / "volume.csv", index_col=0)
    assert list(raw.columns[:4]) == ["0", "1", "10", "11"]  # string order in the file
    assert city.node_ids[10] == "10"
    np.testing.assert_allclose(city.values[:, 10, 0], raw["10"].to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(city.values[:, 2, 0], raw["2"].to_numpy(), rtol=1e-6)
    zero = [int(c) for c in raw.columns if raw[c].sum() == 0]
    assert len(zero) == 12 and city.extra["all_zero_sites"] == sorted(zero)
    assert city.mask[:, zero].max() == 0.0 and city.mask[:, 0].min() == 1.0
    stations = pd.read_csv(data_root / "charged_ev" / "JHB" / "stations.csv")
    assert city.coords[10].tolist() == pytest.approx(stations.loc[10, ["latitude", "longitude"]].tolist())
    assert city.values.shape == (4392, 47, 1) and city.timestamps[0] == pd.Timestamp("2023-04-01 00:00")
    assert city.extra["covariates"].shape == (4392, 6)


def test_charged_pilot_scales_all_zero_sites_without_nan(data_root):
    cfg = resolve_config(compose_config(["pilot=charged_ev_3cities"]))
    tasks = build_tasks(cfg)
    assert [t.dataset.name for t in tasks] == ["JHB", "MEL", "SPO"]
    assert [t.dataset.num_nodes for t in tasks] == [47, 63, 47]
    for t in tasks:
        assert np.isfinite(t.windows["train"].features.numpy()).all()
        assert np.isfinite(t.scaler.std).all() and (t.scaler.std > 0).all()
    s = tasks[0].persistence("test")
    assert int(s.num_valid[0]) == tasks[0].num_windows("test") * (47 - 12)  # all-zero sites excluded


def test_a_run_never_overwrites_result_files_fedldt_did_not_write(synthetic_dir, small_cfg, tmp_path):
    from fedldt.results import check_run_dir
    from fedldt.runner import run_mode

    cfg = small_cfg(synthetic_dir, *MODES_RUN, "train.rounds=1")
    run_dir = tmp_path / "run"
    run_mode(cfg, [], run_dir, mode="local")
    first = json.loads((run_dir / "summary.json").read_text())
    run_mode(cfg, [], run_dir, mode="local")  # fedldt's own results of an earlier run are replaced
    assert json.loads((run_dir / "summary.json").read_text())["test"] == first["test"]

    for name, foreign in [("summary.json", b'{"my": "notes"}\n'), ("history.csv", b"date,count\n"),
                          ("resolved_config.yaml", b"title: my paper\n"), ("model.pt", b"\x80\x04not a checkpoint")]:
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_bytes(foreign)
        with pytest.raises(FileExistsError, match=rf"{mine / name} exists and was not written by fedldt; refusing "
                                                   r"to overwrite it: choose another results folder"):
            run_mode(cfg, [], mine, mode="local")
        assert (mine / name).read_bytes() == foreign and sorted(p.name for p in mine.iterdir()) == [name]
    link_dir = tmp_path / "linked"
    link_dir.mkdir()
    (link_dir / "summary.json").symlink_to(run_dir / "summary.json")  # fedldt's file, but behind a link
    with pytest.raises(FileExistsError):
        check_run_dir(link_dir)


def test_publishing_replaces_only_what_fedldt_published(tmp_path):
    from fedldt.results import PUBLISHED, check_publish_dir, publish

    out, pub = tmp_path / "out", tmp_path / "pub"
    out.mkdir()
    (out / "comparison.md").write_text("v1\n")
    publish([out / "comparison.md"], pub)
    assert (pub / "comparison.md").read_text() == "v1\n"
    import hashlib

    assert json.loads((pub / PUBLISHED).read_text()) == {"comparison.md": hashlib.sha256(b"v1\n").hexdigest()}
    (out / "comparison.md").write_text("v2\n")
    publish([out / "comparison.md"], pub)  # unchanged since fedldt published it: replaced
    assert (pub / "comparison.md").read_text() == "v2\n"

    (pub / "comparison.md").write_text("my edits\n")  # changed by a person since: kept
    with pytest.raises(FileExistsError, match=r"comparison.md exists and is not a file fedldt published there \(or it "
                                              r"changed since\); refusing to overwrite it"):
        publish([out / "comparison.md"], pub)
    assert (pub / "comparison.md").read_text() == "my edits\n"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "comparison.md").write_text("notes\n")  # a folder fedldt never published to
    with pytest.raises(FileExistsError):
        check_publish_dir(tmp_path / "mine", ["comparison.md", "comparison.json"])
    assert (tmp_path / "mine" / "comparison.md").read_text() == "notes\n"
    check_publish_dir(tmp_path / "mine", ["comparison.json"])  # absent files are fine
