"""`fedldt export`: the model package of one territory of a real los_loop_3 run, its card, its ONNX model.

Most tests export the fast centralized run (``conftest.finished_run``: real data, real training, no
Flower); ``test_export_of_a_real_federated_run`` exports from a real Flower run (slow)."""

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

import numpy as np
import onnx
import pandas as pd
import pytest
import torch

from fedldt.cli import main
from fedldt.data.windows import collate
from fedldt.delivery import ForecastPackage, InputError, PackageError
from fedldt.delivery import signing
from fedldt.delivery.export import ExportError, _test_batch, export_package
from fedldt.delivery.onnx_export import run_onnx
from fedldt.delivery.package import check_package, graph_hash
from fedldt.launch.simulation import free_port
from tests.conftest import LOS_LOOP_TZ, PACKAGED_TERRITORY
from tests.test_package_integrity import TAMPERS, edit_manifest



def test_package_holds_the_territorys_own_graph_scaler_and_weights(package_dir, in_run, finished_run):
    pkg = ForecastPackage.load(package_dir)
    ds, task = in_run.task.dataset, in_run.task
    assert pkg.territory == PACKAGED_TERRITORY and pkg.timezone == LOS_LOOP_TZ
    assert pkg.node_ids == ds.node_ids.tolist()  # the same sensors in the same order
    assert torch.equal(pkg.edge_index, ds.edge_index) and torch.equal(pkg.edge_weight, ds.edge_weight)
    assert pkg.manifest["graph_hash"] == graph_hash(ds.node_ids.tolist(), ds.edge_index, ds.edge_weight)
    assert np.array_equal(pkg.scaler.mean, task.scaler.mean) and np.array_equal(pkg.scaler.std, task.scaler.std)
    run_state = torch.load(finished_run / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, run_state[k]) for k, v in pkg.model.state_dict().items())
    assert pkg.manifest["weights"] == {"global": "weights/global.pt", "local": None}
    assert (pkg.window, pkg.horizon, pkg.interval.total_seconds()) == (12, 12, 300)
    assert pkg.coords[pkg.node_ids[0]] == pytest.approx(tuple(ds.coords[0]))
    # a different graph (one edge weight changed) has a different hash
    w = ds.edge_weight.clone(); w[0] += 0.5
    assert graph_hash(ds.node_ids.tolist(), ds.edge_index, w) != pkg.manifest["graph_hash"]


def test_model_card_carries_provenance_training_and_metrics(package_dir, finished_run):
    card = json.loads((package_dir / "model_card.json").read_text())
    summary = json.loads((finished_run / "summary.json").read_text())
    assert card["pilot"] == "los_loop_3" and card["territory"]["id"] == PACKAGED_TERRITORY
    tr = card["training"]
    assert tr["mode"] == summary["mode"] == "centralized"  # the fast run (conftest.finished_run)
    assert tr["strategy"] is None  # no federated strategy trained a centralized model
    assert "A global centralized model (over 3 territories)" in " ".join(card["limitations"])
    assert "- Pilot `los_loop_3`, centralized, " in (package_dir / "MODEL_CARD.md").read_text()
    assert tr["rounds"] == summary["rounds"] and tr["seed"] == summary["seed"] == 0
    assert [t["id"] for t in tr["territories"]] == ["t0", "t1", "t2"]
    ev = card["evaluation"]
    assert ev["this_territory"]["model"] == summary["test_per_territory"][PACKAGED_TERRITORY]
    assert ev["this_territory"]["persistence"] == summary["persistence_per_territory"][PACKAGED_TERRITORY]
    assert ev["all_territories"]["model"] == summary["test"]
    rep = ev["reproduced_at_export"]
    assert rep["mae_all"] == pytest.approx(rep["reported_mae_all"], abs=1e-4)
    prov = card["data"]["provenance"]
    assert prov["recorded"] and "T-GCN" in prov["measures"]
    assert [s["check"] for s in prov["sources"]] == ["matches"] * 3  # the local files are the README's blobs
    assert card["fedldt_version"] and card["created"] and card["intended_use"] and card["limitations"]
    assert any("no missing value" in x for x in card["limitations"])  # Los-loop is interpolated upstream
    md = (package_dir / "MODEL_CARD.md").read_text()
    mae_h3 = summary["test_per_territory"][PACKAGED_TERRITORY]["mae"]["h3"]
    assert f"| MAE model | {mae_h3:.4f}" in md and "lehaifeng/T-GCN" in md and "## Limitations" in md


def test_onnx_matches_pytorch_within_1e4_on_other_batch_sizes(package_dir, in_run):
    pkg = ForecastPackage.load(package_dir)
    assert pkg.manifest["onnx"]["parity_max_abs_err"] <= 1e-4
    graph = onnx.load(str(package_dir / "model.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 12, len(pkg.node_ids), 1]  # fixed graph, dynamic batch
    for count in (1, 7, 100):
        batch, values, mask, calendar = _test_batch(in_run.task, count)
        reference = in_run.task.predict(in_run.model, batch).numpy()  # the in-run prediction
        out = run_onnx(package_dir / "model.onnx", values, mask, calendar)
        assert out.shape == reference.shape == (count, 12, len(pkg.node_ids), 1)
        assert np.abs(out - reference).max() <= 1e-4


def test_package_holds_the_global_model_only_and_without_timezone_needs_naive_times(finished_run, in_run, tmp_path):
    """Personalized weights are not exported (no producer yet): the manifest says ``local: null``,
    the card ``weights: global``, and ``weights/`` holds ``global.pt`` only."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("logs", ".hydra"))
    local = export_package(run, PACKAGED_TERRITORY, tmp_path / "pkg", onnx=False)
    assert local.manifest["weights"] == {"global": "weights/global.pt", "local": None} and local.manifest["onnx"] is None
    assert local.card()["model"]["weights"] == "global" and "local_parameters" not in local.card()["model"]
    assert sorted(p.name for p in (tmp_path / "pkg" / "weights").iterdir()) == ["global.pt"]
    # exported without --timezone: timestamps must be naive local times
    assert local.timezone is None and any("time zone was not recorded" in x for x in local.card()["limitations"])
    ds = in_run.task.dataset
    utc = pd.DataFrame(ds.values[600:612, :, 0], columns=ds.node_ids.tolist(),
                       index=[t.isoformat() + "Z" for t in ds.timestamps[600:612]])
    with pytest.raises(InputError, match="carry a UTC offset, but this model package has no time zone"):
        local.forecast(utc)


def test_export_errors_name_the_problem(finished_run, package_dir, tmp_path):
    with pytest.raises(ExportError, match=r"territory 't9' is not in run .*\['t0', 't1', 't2'\]"):
        export_package(finished_run, "t9", tmp_path / "x")
    with pytest.raises(ExportError, match="exists; choose another --out or pass --force"):
        export_package(finished_run, PACKAGED_TERRITORY, package_dir)
    with pytest.raises(ExportError, match="does not exist here; pass --dataset-path"):
        export_package(finished_run, PACKAGED_TERRITORY, tmp_path / "y", dataset_path=tmp_path / "nowhere")
    with pytest.raises(ExportError, match="not an IANA time zone"):
        export_package(finished_run, PACKAGED_TERRITORY, tmp_path / "z", timezone="Mars/Olympus")
    with pytest.raises(ExportError, match="summary.json not found"):
        export_package(tmp_path, PACKAGED_TERRITORY, tmp_path / "w")
    assert main(["export", str(finished_run), "--territory", "t9", "--out", str(tmp_path / "v")]) == 1


def test_an_altered_package_is_refused(package_dir, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(package_dir, copy)
    scaler = json.loads((copy / "scaler.json").read_text())
    scaler["mean"][0][0][0] += 1.0
    (copy / "scaler.json").write_text(json.dumps(scaler))
    with pytest.raises(PackageError, match=r"scaler.json: sha256 differs"):
        ForecastPackage.load(copy)
    shutil.copy(package_dir / "scaler.json", copy / "scaler.json")
    (copy / "weights" / "global.pt").unlink()
    with pytest.raises(PackageError, match=r"global.pt: missing from the package"):
        ForecastPackage.load(copy)
    with pytest.raises(PackageError, match="not a fedldt model package"):
        ForecastPackage.load(tmp_path)


def test_run_whose_territories_kept_parameters_is_refused(finished_run, tmp_path):
    # a FedPer run: model.pt holds the shared weights; the readout stayed on the territories
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns("logs", ".hydra"))
    ckpt = torch.load(run / "model.pt", weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("readout.")}
    ckpt.update(personalization="fedper", local_keys=["readout.weight", "readout.bias"])
    torch.save(ckpt, run / "model.pt")
    with pytest.raises(ExportError, match=r"each territory kept \['readout.weight', 'readout.bias'\] at home "
                                          r"\(personalization=fedper"):
        export_package(run, PACKAGED_TERRITORY, tmp_path / "pkg", onnx=False)


# ----------------------------------------------------------------------------- issue 10: packages, --force

@pytest.fixture(scope="module")
def signed(finished_run, tmp_path_factory) -> dict[str, Path]:
    """A package of the session's run signed with a fresh key (``fedldt keygen`` + ``export --sign-key``),
    and another key's public half."""
    d = tmp_path_factory.mktemp("signed")
    assert main(["keygen", "--out", str(d / "exporter")]) == 0
    signing.generate_keypair(d / "other")
    assert main(["export", str(finished_run), "--territory", PACKAGED_TERRITORY, "--out", str(d / "pkg"),
                 "--timezone", LOS_LOOP_TZ, "--no-onnx", "--sign-key", str(d / "exporter")]) == 0
    return {"pkg": d / "pkg", "pub": d / "exporter.pub", "other_pub": d / "other.pub"}


def observations_json(in_run, path: Path) -> Path:
    ds = in_run.task.dataset
    end = int(ds.timestamps.get_loc(pd.Timestamp("2012-03-07 08:00")))
    path.write_text(json.dumps({"timestamps": [t.isoformat() for t in ds.timestamps[end - 12:end]],
                                "sensors": {s: ds.values[end - 12:end, j, 0].astype(float).tolist()
                                            for j, s in enumerate(ds.node_ids)}}))
    return path


def test_export_lists_every_file_and_seals_the_manifest(package_dir):
    m = check_package(package_dir)
    on_disk = {p.relative_to(package_dir).as_posix() for p in package_dir.rglob("*") if p.is_file()}
    assert set(m["files"]) == on_disk - {"package.json"}  # unsigned: no package.sig
    assert m["format"] == "fedldt-model-package/2" and m["digest"].startswith("sha256:")
    assert {"task.units", "task.window", "task.timezone", "task.interval_s", "graph_hash"} <= set(m["field_sha256"])


@pytest.mark.parametrize("name,tamper,message", TAMPERS, ids=[t[0] for t in TAMPERS])
def test_a_tampered_real_package_is_refused(name, tamper, message, package_dir, tmp_path):
    copy = tmp_path / "pkg"
    shutil.copytree(package_dir, copy)
    tamper(copy)
    with pytest.raises(PackageError, match=message):
        ForecastPackage.load(copy)


def test_signed_package_loads_and_predicts_only_with_its_key(signed, package_dir, in_run, tmp_path, capsys):
    obs = observations_json(in_run, tmp_path / "obs.json")
    pkg, pub = str(signed["pkg"]), str(signed["pub"])
    assert main(["predict", pkg, "--input", str(obs), "--output", str(tmp_path / "a.json"), "--verify-key", pub]) == 0
    assert main(["predict", str(package_dir), "--input", str(obs), "--output", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["forecasts"] == b["forecasts"] and a["unit"] == "mph"  # same model, same numbers
    capsys.readouterr()
    refusals = [
        ([pkg, "--verify-key", str(signed["other_pub"])], r"package.sig: signed by key sha256:\w+, not by --verify-key"),
        ([str(package_dir), "--verify-key", pub], r"the package is not signed \(package.sig not found\)"),
    ]
    resealed = tmp_path / "resealed"
    shutil.copytree(signed["pkg"], resealed)
    edit_manifest(resealed, lambda m: m["task"].__setitem__("units", ["km/h"]), reseal=True)
    refusals.append(([str(resealed), "--verify-key", pub], r"package.sig: signs manifest digest .* altered after signing"))
    for args, message in refusals:
        assert main(["predict", args[0], "--input", str(obs), "--output", str(tmp_path / "x.json"), *args[1:]]) == 1
        assert re.search(message, capsys.readouterr().err)
        assert main(["serve", *args]) == 1  # refused before the service starts
        assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()


def test_serve_with_verify_key_under_uvicorn(signed, tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "fedldt"), "serve", str(signed["pkg"]), "--port",
                             str(port), "--verify-key", str(signed["pub"])], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                if health.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "fedldt serve did not answer within 180 s"
            time.sleep(0.5)
        assert health.json()["territory"] == PACKAGED_TERRITORY
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_force_replaces_a_package_and_nothing_else(finished_run, package_dir, tmp_path, capsys):
    def export(out: Path, *extra: str) -> int:
        return main(["export", str(finished_run), "--territory", PACKAGED_TERRITORY, "--out", str(out), "--no-onnx",
                     "--force", *extra])

    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    files = {"src/main.py": b"print('hello')\n", "notes.txt": b"my notes\n", "package.json": b'{"name": "project"}\n'}
    for rel, data in files.items():
        (project / rel).write_bytes(data)
    capsys.readouterr()
    assert export(project) == 1
    assert "is not a valid fedldt model package" in capsys.readouterr().err
    assert {p.relative_to(project).as_posix() for p in project.rglob("*")} == {"src", *files}
    assert {rel: (project / rel).read_bytes() for rel in files} == files
    # a real package with one file added is refused too, untouched
    mixed = tmp_path / "mixed"
    shutil.copytree(package_dir, mixed)
    (mixed / "notes.txt").write_text("mine\n")
    assert export(mixed) == 1
    assert "['notes.txt'] are not listed" in capsys.readouterr().err and (mixed / "notes.txt").is_file()
    # inside the run folder, or the run folder itself
    for out in (finished_run / "pkg", finished_run):
        assert export(out) == 1
        assert "lies inside the run folder" in capsys.readouterr().err
    assert not (finished_run / "pkg").exists() and (finished_run / "model.pt").is_file()
    # an earlier real package is replaced (here by one without ONNX), leaving nothing aside
    earlier = tmp_path / "earlier"
    shutil.copytree(package_dir, earlier)
    assert (earlier / "model.onnx").is_file()
    assert export(earlier) == 0
    assert ForecastPackage.load(earlier).manifest["onnx"] is None and not (earlier / "model.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier", "mixed", "project"]


@pytest.mark.slow
def test_export_of_a_real_federated_run(federated_run, tmp_path):
    """The Flower path to delivery end to end: the package of a real federated run (Flower's simulation
    engine, 2 rounds of FedAvg) holds the run's weights, and export re-computes the reported test MAE."""
    summary = json.loads((federated_run / "summary.json").read_text())
    out = tmp_path / PACKAGED_TERRITORY
    export_package(federated_run, PACKAGED_TERRITORY, out, timezone=LOS_LOOP_TZ)
    check_package(out)
    card = json.loads((out / "model_card.json").read_text())
    tr = card["training"]
    assert summary["mode"] == tr["mode"] == "federated" and tr["strategy"] == "fedavg" and tr["rounds"] == 2
    rep = card["evaluation"]["reproduced_at_export"]
    assert rep["reported_mae_all"] == summary["test_per_territory"][PACKAGED_TERRITORY]["mae"]["all"]
    assert rep["mae_all"] == pytest.approx(rep["reported_mae_all"], abs=1e-4)
    run_state = torch.load(federated_run / "model.pt", weights_only=True)["state_dict"]
    pkg = ForecastPackage.load(out)
    assert all(torch.equal(v, run_state[k]) for k, v in pkg.model.state_dict().items() if k in run_state)
    assert pkg.manifest["onnx"]["parity_max_abs_err"] <= 1e-4
