"""Configs outside the checkout and the provenance of every run (issue 12, item 7): a user's own
config folder (``--config-dir``, ``hydra.searchpath``) is searched after ``conf/`` by the scripts
and by :func:`fedldt.config.compose_config` (the ServerApp); every ``summary.json`` and log names
the fedldt version, checkout, git commit and config folders; a script of one checkout run with the
fedldt of another is refused, naming both."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

import fedldt
from fedldt.config import (CONF_DIR, checkout_root, composable_overrides, compose_config, resolve_config,
                           searched_config_dirs, searchpath_override)
from fedldt.launch.provenance import CheckoutMismatch, check_checkout, git_state, run_provenance
from tests.conftest import SMALL

SCRIPT = checkout_root() / "scripts" / "simulate.py"


def user_config_folder(root: Path, data: Path | None = None) -> Path:
    """A user's own config folder, outside the checkout: a dataset config ``my_loop`` (Los-loop
    layout at ``data``) and a pilot ``tiny_city`` using it, 1 round."""
    (root / "pilot").mkdir(parents=True)
    (root / "dataset").mkdir()
    dataset = (CONF_DIR / "dataset" / "los_loop.yaml").read_text().replace("name: los_loop", "name: my_loop")
    if data is not None:
        dataset = dataset.replace("path: ${paths.data_root}/los_loop", f"path: {data}")
    (root / "dataset" / "my_loop.yaml").write_text(dataset)
    pilot = (CONF_DIR / "pilot" / "los_loop_3.yaml").read_text()
    pilot = (pilot.replace("override /dataset: los_loop", "override /dataset: my_loop")
             .replace("name: los_loop_3", "name: tiny_city").replace("rounds: 10", "rounds: 1"))
    (root / "pilot" / "tiny_city.yaml").write_text(pilot)
    return root


def test_a_pilot_and_dataset_of_a_user_folder_compose_and_the_folders_are_recorded(tmp_path):
    with pytest.raises(ValueError, match="quotes or backslashes"):
        searchpath_override([tmp_path / "it's"])
    mine = user_config_folder(tmp_path / "my configs")  # a space travels too (Flower's run config keeps it)
    ov = searchpath_override([mine])
    assert ov == f'hydra.searchpath=["file://{mine.resolve()}"]'
    cfg = compose_config(["pilot=tiny_city", ov, "hydra.run.dir=/elsewhere"])
    assert (cfg.name, cfg.dataset.name, cfg.train.rounds, cfg.partition.num_territories) == ("tiny_city", "my_loop", 1, 3)
    assert "hydra" not in cfg
    assert searched_config_dirs() == [str(CONF_DIR), str(mine.resolve())]
    compose_config(["pilot=los_loop_3"])  # the record follows the config composed last
    assert searched_config_dirs() == [str(CONF_DIR)]


def test_only_the_search_path_travels_among_hydra_overrides():
    ov = ["pilot=x", "hydra.run.dir=/r", 'hydra.searchpath=["file:///d"]', "hydra.job.chdir=true", "seed=2"]
    assert composable_overrides(ov) == ["pilot=x", 'hydra.searchpath=["file:///d"]', "seed=2"]


def test_an_unknown_pilot_names_every_folder_searched_and_the_checkout(tmp_path):
    mine = user_config_folder(tmp_path / "myconf")
    with pytest.raises(MissingConfigException) as e:
        compose_config(["pilot=tiny_cty", searchpath_override([mine])])
    text = str(e.value)
    assert "Could not find 'pilot/tiny_cty'" in text and "tiny_city" in text  # the options, the user's too
    assert f"file://{CONF_DIR}" in text and f"file://{mine.resolve()}" in text
    assert f"checkout {checkout_root()}" in text and "--config-dir" in text


def test_git_state_of_a_work_tree(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "a.txt").write_text("1\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one")
    head = git("rev-parse", "HEAD").strip()
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": False}
    (tmp_path / "a.txt").write_text("2\n")
    assert git_state(tmp_path) == {"git_commit": head, "git_dirty": True}
    (tmp_path / "sub").mkdir()
    assert git_state(tmp_path / "sub") == {"git_commit": None, "git_dirty": None}  # not the top of a work tree
    assert git_state(tmp_path.parent / "no-such-folder") == {"git_commit": None, "git_dirty": None}


def test_a_run_with_a_user_config_folder_records_its_provenance(tmp_path, synthetic_dir):
    """scripts/simulate.py --config-dir DIR (centralized, 1 round, synthetic data): the pilot comes
    from DIR, and summary.json and simulate.log name the code and both config folders."""
    mine = user_config_folder(tmp_path / "myconf", data=synthetic_dir)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config-dir", str(mine), "pilot=tiny_city", "mode=centralized",
                           *SMALL, f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["pilot"], summary["dataset"]["name"], summary["rounds"]) == ("tiny_city", "my_loop", 1)
    prov = summary["provenance"]
    assert prov["config_dirs"] == [str(CONF_DIR), str(mine.resolve())]
    assert prov["fedldt_version"] == fedldt.__version__ == summary["fedldt_version"]
    assert prov["checkout"] == str(checkout_root())
    assert prov["fedldt_package"] == str(Path(fedldt.__file__).resolve().parent)
    assert {k: prov[k] for k in ("git_commit", "git_dirty")} == git_state(checkout_root())
    log = (run / "simulate.log").read_text()
    assert f"fedldt {fedldt.__version__}, checkout {checkout_root()}" in log
    assert f"config folders {CONF_DIR}, {mine.resolve()}" in log


def test_provenance_of_an_in_process_run(finished_run):
    """The delivery tests' centralized run (no script): the same block, conf/ only."""
    prov = json.loads((finished_run / "summary.json").read_text())["provenance"]
    assert prov["config_dirs"] == [str(CONF_DIR)]
    assert set(prov) == set(run_provenance())


def test_a_script_of_another_checkout_is_refused_naming_both(tmp_path):
    clone = tmp_path / "clone"
    (clone / "fedldt").mkdir(parents=True)
    (clone / "fedldt" / "__init__.py").write_text('__version__ = "0.1.0"\n')
    (clone / "scripts").mkdir()
    script = shutil.copy(SCRIPT, clone / "scripts" / "simulate.py")
    with pytest.raises(CheckoutMismatch) as e:
        check_checkout(script)
    assert f"checkout {clone.resolve()}" in str(e.value) and f"from {checkout_root()}" in str(e.value)
    assert f"pip install -e {clone.resolve()}" in str(e.value)
    check_checkout(SCRIPT)  # this checkout's own script
    loose = tmp_path / "elsewhere" / "scripts" / "run.py"  # not in a fedldt checkout: not checked
    loose.parent.mkdir(parents=True)
    check_checkout(loose)
    # the newcomer's case end to end: the clone's script exits 2 before composing any config
    proc = subprocess.run([sys.executable, str(script), "pilot=los_loop_3"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fedldt: ") and str(clone.resolve()) in proc.stderr and str(checkout_root()) in proc.stderr
    assert "Could not find" not in proc.stderr


def test_a_user_file_named_like_a_built_in_one_or_a_missing_folder_is_refused(tmp_path):
    """Hydra takes conf/'s file first: a user's pilot/los_loop_3.yaml would silently never be used."""
    mine = user_config_folder(tmp_path / "myconf")
    shutil.copy(mine / "pilot" / "tiny_city.yaml", mine / "pilot" / "los_loop_3.yaml")
    with pytest.raises(ValueError) as e:
        compose_config(["pilot=tiny_city", searchpath_override([mine])])
    assert str(e.value).startswith(f"{mine.resolve() / 'pilot' / 'los_loop_3.yaml'} has the name of fedldt's built-in "
                                   f"{CONF_DIR / 'pilot' / 'los_loop_3.yaml'}")
    with pytest.raises(ValueError, match=f"config folder {tmp_path / 'nope'} .* does not exist"):
        compose_config(["pilot=los_loop_3", searchpath_override([tmp_path / "nope"])])
