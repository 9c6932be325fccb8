"""Model packages are complete and tamper-evident, export runs no code from a run folder and never
deletes what fedldt did not create (issue 10). Fast: a small package written here, fake run folders.

The same tamper cases run on the real exported package in tests/test_export.py (slow).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from fedldt.cli import main
from fedldt.config import DATASET_LOADERS, PARTITIONS, compose_config, resolve_config
from fedldt.delivery import signing
from fedldt.delivery.export import ExportError, check_output, check_run_config, export_package
from fedldt.delivery.package import (
    MANIFEST, PACKAGE_FORMAT, SIGNATURE, PackageError, check_package, manifest_digest, seal_manifest, sign_package,
    write_manifest,
)

# ----------------------------------------------------------------------------- a small package


def write_small_package(root: Path) -> Path:
    """The files of a (one-sensor, meaningless) package and its manifest, as export writes them."""
    (root / "weights").mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, root / "weights" / "global.pt")
    (root / "scaler.json").write_text(json.dumps({"per_node": True, "mean": [[[50.0]]], "std": [[[10.0]]]}))
    (root / "nodes.csv").write_text("index,sensor_id\n0,773869\n")
    (root / "edges.csv").write_text("source,target,weight\n0,0,1.0\n")
    (root / "model.onnx").write_bytes(b"onnx bytes")
    (root / "model_card.json").write_text("{}\n")
    (root / "MODEL_CARD.md").write_text("# card\n")
    write_manifest(root, {
        "format": PACKAGE_FORMAT, "created": "2026-01-01T00:00:00+00:00", "fedldt_version": "0.1.0",
        "pilot": "los_loop_3", "territory": "t1", "model_config": {"name": "dcrnn", "hidden": 4},
        "weights": {"global": "weights/global.pt", "local": None},
        "task": {"window": 12, "horizon": 12, "interval_s": 300, "timezone": "America/Los_Angeles",
                 "time_of_day": True, "day_of_week": False, "channels": ["speed"], "units": ["mph"]},
        "graph_hash": "sha256:" + "0" * 64, "onnx": {"file": "model.onnx", "opset": 17},
    })
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    a, a_pub = signing.generate_keypair(d / "exporter")
    b, b_pub = signing.generate_keypair(d / "other")
    return {"key": a, "pub": a_pub, "other": b, "other_pub": b_pub}


@pytest.fixture(scope="module")
def small_package(tmp_path_factory, keys) -> Path:
    root = write_small_package(tmp_path_factory.mktemp("small") / "pkg")
    sign_package(root, signing.load_private_key(keys["key"]))
    return root


# ----------------------------------------------------------------------------- tampering

def edit_manifest(root: Path, change: Callable[[dict], None], reseal: bool = False) -> None:
    m = json.loads((root / MANIFEST).read_text())
    change(m)
    if reseal:  # an attacker who also recomputes field_sha256 and digest
        m = seal_manifest(m)
    (root / MANIFEST).write_text(json.dumps(m, indent=2))


def unlist_then_change(root: Path) -> None:
    edit_manifest(root, lambda m: m["files"].pop("scaler.json"))
    (root / "scaler.json").write_text(json.dumps({"per_node": True, "mean": [[[0.0]]], "std": [[[1.0]]]}))


def unlist_then_change_resealed(root: Path) -> None:
    edit_manifest(root, lambda m: m["files"].pop("scaler.json"), reseal=True)
    (root / "scaler.json").write_text(json.dumps({"per_node": True, "mean": [[[0.0]]], "std": [[[1.0]]]}))


def add_unlisted(root: Path) -> None:
    (root / "weights" / "extra.pt").write_bytes(b"x")


def name_dotdot(root: Path) -> None:
    edit_manifest(root, lambda m: m["files"].__setitem__("../x", "0" * 64))


def name_absolute(root: Path) -> None:
    edit_manifest(root, lambda m: m["files"].__setitem__("/etc/passwd", "0" * 64), reseal=True)


def units_kmh(root: Path) -> None:
    edit_manifest(root, lambda m: m["task"].__setitem__("units", ["km/h"]))


def window_6(root: Path) -> None:
    edit_manifest(root, lambda m: m["task"].__setitem__("window", 6))


def timezone_utc(root: Path) -> None:
    edit_manifest(root, lambda m: m["task"].__setitem__("timezone", "UTC"))


def interval_600(root: Path) -> None:
    edit_manifest(root, lambda m: m["task"].__setitem__("interval_s", 600))


def graph_hash_edit(root: Path) -> None:
    edit_manifest(root, lambda m: m.__setitem__("graph_hash", "sha256:" + "1" * 64))


def units_and_field_hash(root: Path) -> None:  # the field's own hash updated, the digest not
    def change(m):
        m["task"]["units"] = ["km/h"]
        m["field_sha256"]["task.units"] = seal_manifest(m)["field_sha256"]["task.units"]
    edit_manifest(root, change)


def symlinked_file(root: Path) -> None:
    outside = root.parent / "nodes_outside.csv"
    shutil.copy(root / "nodes.csv", outside)
    (root / "nodes.csv").unlink()
    (root / "nodes.csv").symlink_to(outside)


def symlinked_folder(root: Path) -> None:
    outside = root.parent / "weights_outside"
    shutil.move(root / "weights", outside)
    (root / "weights").symlink_to(outside, target_is_directory=True)


def extra_folder(root: Path) -> None:
    (root / "src").mkdir()


def edited_sensor_ids(root: Path) -> None:  # nodes.csv changed, its hash not
    (root / "nodes.csv").write_text("index,sensor_id\n0,999999\n")


#: (name, tamper, regex of the refusal) — checked without a key; each names the field or file
TAMPERS = [
    ("unlisted_then_changed", unlist_then_change, r"field 'files.scaler.json' was removed after export"),
    ("unlisted_then_changed_resealed", unlist_then_change_resealed, r"\['scaler.json'\] are not listed in package.json"),
    ("unlisted_file", add_unlisted, r"\['weights/extra.pt'\] are not listed in package.json"),
    ("name_dotdot", name_dotdot, r"file name '../x' in 'files' is not a plain relative path"),
    ("name_absolute", name_absolute, r"file name '/etc/passwd' in 'files' is not a plain relative path"),
    ("units_mph_to_kmh", units_kmh, r"field 'task.units' was edited after export"),
    ("window", window_6, r"field 'task.window' was edited after export"),
    ("timezone", timezone_utc, r"field 'task.timezone' was edited after export"),
    ("interval", interval_600, r"field 'task.interval_s' was edited after export"),
    ("graph_hash", graph_hash_edit, r"field 'graph_hash' was edited after export"),
    ("field_hash_too", units_and_field_hash, r"'digest' does not match the manifest's content"),
    ("symlinked_file", symlinked_file, r"nodes.csv: a symbolic link"),
    ("symlinked_folder", symlinked_folder, r"weights: a symbolic link"),
    ("extra_folder", extra_folder, r"folder\(s\) \['src'\] are not part of the package"),
    ("sensor_ids", edited_sensor_ids, r"nodes.csv: sha256 differs from package.json"),
]


@pytest.fixture
def copy(small_package, tmp_path) -> Path:
    dst = tmp_path / "pkg"
    shutil.copytree(small_package, dst, symlinks=True)
    return dst


def test_untouched_package_passes_with_and_without_its_key(small_package, keys):
    m = check_package(small_package)
    assert m["task"]["units"] == ["mph"] and m["digest"] == manifest_digest(m)
    assert check_package(small_package, verify_key=keys["pub"]) == m
    # every file but the manifest and the signature is listed, with its sha256
    on_disk = {p.relative_to(small_package).as_posix() for p in small_package.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {MANIFEST, SIGNATURE}
    # every manifest field has its hash, e.g. the task fields that change forecasts or their labels
    assert {"task.window", "task.horizon", "task.interval_s", "task.timezone", "task.units", "graph_hash",
            "files.nodes.csv"} <= set(m["field_sha256"])


@pytest.mark.parametrize("name,tamper,message", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_a_tampered_package_is_refused_naming_the_field_or_file(name, tamper, message, copy):
    check_package(copy)  # the copy is fine before
    tamper(copy)
    with pytest.raises(PackageError, match=message):
        check_package(copy)


def test_a_fully_resealed_edit_is_caught_only_by_the_signature(copy, keys):
    # an attacker who edits the units and recomputes field_sha256 and digest (they are not secret)
    edit_manifest(copy, lambda m: m["task"].__setitem__("units", ["km/h"]), reseal=True)
    # is caught by package.sig, which signs the original digest
    with pytest.raises(PackageError, match=r"package.sig: signs manifest digest sha256:\w+, but package.json's "
                                           r"digest is sha256:\w+: the package was altered after signing"):
        check_package(copy, verify_key=keys["pub"])
    with pytest.raises(PackageError, match="package.sig: signs another manifest digest"):  # also without a key
        check_package(copy)
    # if the attacker also deletes package.sig, only --verify-key catches it: the digest alone
    # detects edits, not an attacker who can write the whole folder (docs/deploy_model.md says so)
    (copy / SIGNATURE).unlink()
    assert check_package(copy)["task"]["units"] == ["km/h"]
    with pytest.raises(PackageError, match="the package is not signed"):
        check_package(copy, verify_key=keys["pub"])


def test_signature_checks(copy, keys, tmp_path):
    # an unsigned package with --verify-key
    unsigned = write_small_package(tmp_path / "unsigned")
    with pytest.raises(PackageError, match=r"the package is not signed \(package.sig not found\) but --verify-key"):
        check_package(unsigned, verify_key=keys["pub"])
    # the wrong public key
    with pytest.raises(PackageError, match=r"package.sig: signed by key sha256:[0-9a-f]{16}, not by --verify-key "
                                           r".*other.pub \(sha256:[0-9a-f]{16}\)"):
        check_package(copy, verify_key=keys["other_pub"])
    # a signature swapped in from another package (another territory, same key)
    other = tmp_path / "other_pkg"
    shutil.copytree(copy, other)
    edit_manifest(other, lambda m: m.__setitem__("territory", "t2"), reseal=True)
    sign_package(other, signing.load_private_key(keys["key"]))
    check_package(other, verify_key=keys["pub"])
    shutil.copy(other / SIGNATURE, copy / SIGNATURE)
    with pytest.raises(PackageError, match="signs manifest digest .* the package was altered after signing"):
        check_package(copy, verify_key=keys["pub"])
    # ... with its digest field edited to this package's digest: the Ed25519 check fails
    sig = json.loads((copy / SIGNATURE).read_text())
    sig["digest"] = json.loads((copy / MANIFEST).read_text())["digest"]
    (copy / SIGNATURE).write_text(json.dumps(sig))
    with pytest.raises(PackageError, match="the Ed25519 signature does not verify"):
        check_package(copy, verify_key=keys["pub"])
    # a verify key that is not a key
    with pytest.raises(PackageError, match=r"--verify-key: .*not a PEM public key"):
        check_package(other, verify_key=_write(tmp_path / "junk.pub", b"junk"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_old_format_and_bad_json_are_refused(copy):
    edit_manifest(copy, lambda m: m.__setitem__("format", "fedldt-model-package/1"))
    with pytest.raises(PackageError, match=r"format 'fedldt-model-package/1'; this fedldt reads 'fedldt-model-package/2'"):
        check_package(copy)
    (copy / MANIFEST).write_text('{"format": NaN}')
    with pytest.raises(PackageError, match="package.json: not valid JSON"):
        check_package(copy)


# ----------------------------------------------------------------------------- keys

def test_keygen_makes_a_0600_key_and_never_overwrites(tmp_path, capsys):
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    pub = signing.load_public_key(tmp_path / "k.pub")
    assert signing.load_private_key(tmp_path / "k").public_key().public_bytes_raw() == pub.public_bytes_raw()
    assert signing.fingerprint(pub) in capsys.readouterr().out
    before = (tmp_path / "k").read_bytes()
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 1
    assert "exists; fedldt keygen never overwrites" in capsys.readouterr().err
    assert (tmp_path / "k").read_bytes() == before
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(signing.SignatureError, match=r"readable by others \(mode 0644\); run `chmod 600"):
        signing.load_private_key(tmp_path / "k")


# ----------------------------------------------------------------------------- --force / output paths

def test_force_refuses_a_folder_fedldt_did_not_write(tmp_path, small_package):
    run = tmp_path / "run"
    run.mkdir()
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    files = {"src/main.py": b"print('hello')\n", "notes.txt": b"my notes\n", "package.json": b'{"name": "project"}\n'}
    for rel, data in files.items():
        (project / rel).write_bytes(data)
    with pytest.raises(ExportError, match=r"project exists and is not a valid fedldt model package .* --force replaces "
                                          r"only a package fedldt wrote"):
        check_output(project, run, overwrite=True)
    # a real package with a project file added is not a package either
    mixed = tmp_path / "mixed"
    shutil.copytree(small_package, mixed)
    (mixed / "notes.txt").write_bytes(b"mine\n")
    with pytest.raises(ExportError, match=r"\['notes.txt'\] are not listed"):
        check_output(mixed, run, overwrite=True)
    assert {rel: (project / rel).read_bytes() for rel in files} == files
    assert (mixed / "notes.txt").read_bytes() == b"mine\n"
    # a package fedldt wrote may be replaced, with --force only
    check_output(small_package, run, overwrite=True)
    with pytest.raises(ExportError, match="exists; choose another --out or pass --force"):
        check_output(small_package, run, overwrite=False)


def test_output_paths_that_are_refused(tmp_path, small_package):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    data = tmp_path / "data"
    data.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(small_package, target_is_directory=True)
    cases = [
        (a_file, "exists and is not a folder"),
        (link, "is a symbolic link"),
        (run, "is, contains or lies inside the run folder"),
        (run / "pkg", "is, contains or lies inside the run folder"),
        (run / "logs", "is, contains or lies inside the run folder"),
        (tmp_path, "is, contains or lies inside the run folder"),
        (data / "pkg", "is, contains or lies inside the dataset"),
    ]
    for out, message in cases:
        with pytest.raises(ExportError, match=message):
            check_output(out, run, overwrite=True, protected=(data,))
    assert a_file.read_text() == "x" and check_package(small_package)


# ----------------------------------------------------------------------------- no code from a run folder

class Payload:
    """A pickle that, when unpickled with weights_only=False, creates the folder ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def fake_run(root: Path, dataset: dict, **extra) -> Path:
    """A run folder with the three files export reads; ``dataset`` is its config's dataset group."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.json").write_text(json.dumps({"pilot": "x", "territories": [{"id": "t0", "num_nodes": 1}]}))
    torch.save({"model_config": {"name": "dcrnn"}, "state_dict": {}}, root / "model.pt")
    cfg = {"dataset": dataset, "partition": {"_target_": "fedldt.data.partition_kmeans", "num_territories": 3},
           "task": {"window": 12}, "train": {"rounds": 1}, **extra}
    (root / "resolved_config.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_registered_loaders_pass_and_are_the_only_ones(tmp_path):
    cfg = resolve_config(compose_config(["pilot=los_loop_3"]), require_data=False)
    check_run_config(cfg, tmp_path / "resolved_config.yaml")  # fedldt's own config is accepted
    assert cfg["dataset"]["_target_"] in DATASET_LOADERS and cfg["partition"]["_target_"] in PARTITIONS
    assert "fedldt.data.load_los_loop" in DATASET_LOADERS and "builtins.exec" not in DATASET_LOADERS


def test_export_runs_no_code_named_by_the_run_config(tmp_path, capsys):
    marker = tmp_path / "pwned"
    code = f"import os; os.mkdir({str(marker)!r})"
    run = fake_run(tmp_path / "run1", {"_target_": "builtins.exec", "_args_": [code]})
    with pytest.raises(ExportError, match=r"run1/resolved_config.yaml: dataset._target_='builtins.exec' is not a "
                                          r"loader fedldt ships"):
        export_package(run, "t0", tmp_path / "out")
    assert main(["export", str(run), "--territory", "t0", "--out", str(tmp_path / "out")]) == 1
    assert "resolved_config.yaml: dataset._target_='builtins.exec'" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_loads_no_planted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    run = tmp_path / "run2"
    run.mkdir()
    torch.save(Payload(marker), run / "evil.pkl")  # a torch checkpoint whose pickle calls os.mkdir
    fake_run(run, {"_target_": "torch.load", "f": str(run / "evil.pkl"), "weights_only": False})
    with pytest.raises(ExportError, match=r"dataset._target_='torch.load' is not a loader fedldt ships"):
        export_package(run, "t0", tmp_path / "out")
    # a fedldt loader, but an argument that is itself instantiated
    fake_run(run, {"_target_": "fedldt.data.load_los_loop",
                   "path": {"_target_": "torch.load", "f": str(run / "evil.pkl"), "weights_only": False}})
    with pytest.raises(ExportError, match=r"key dataset.path._target_ is not allowed in a run config"):
        export_package(run, "t0", tmp_path / "out")
    fake_run(run, {"_target_": "fedldt.data.load_los_loop", "path": "/data"},
             model={"_target_": "builtins.exec", "source": "1"})
    with pytest.raises(ExportError, match=r"model._target_='builtins.exec' is not registered in fedldt"):
        export_package(run, "t0", tmp_path / "out")
    fake_run(run, {"_target_": "fedldt.data.load_los_loop", "path": "${oc.env:HOME}"})
    with pytest.raises(ExportError, match=r"dataset.path='\$\{oc.env:HOME\}' holds an interpolation"):
        export_package(run, "t0", tmp_path / "out")
    # the pickle as model.pt, with an allowed config: torch.load(weights_only=True) refuses it
    fake_run(run, {"_target_": "fedldt.data.load_los_loop", "path": "/data"})
    shutil.copy(run / "evil.pkl", run / "model.pt")
    with pytest.raises(ExportError, match=r"model.pt: cannot be loaded with weights_only=True"):
        export_package(run, "t0", tmp_path / "out")
    assert not marker.exists()
    # the payload is live: Hydra's instantiate of the first config runs it (the hostile trial's finding)
    from hydra.utils import instantiate
    instantiate({"_target_": "torch.load", "f": str(run / "evil.pkl"), "weights_only": False})
    assert marker.is_dir()
