"""Real deployments on loopback: a TLS SuperLink with SuperNode authentication and one
``flower-supernode`` process per territory, talking over the network stack (no simulation).

Two federations, each reused by several tests (the deployment round trip costs ~10 s per phase):

* ``deployed``: ``scripts/federation_local.py pilot=los_loop_3 train.rounds=2`` end to end
  (the real Los-loop data), compared with the simulation engine's run of the same config;
* ``federation``: a :class:`LocalFederation` on small synthetic territories whose server has
  no data at all, territory 1 failing in round 1 (test-only node config), used for refusals,
  failures, a killed and restarted SuperNode, and the minimum-territories error.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from fedldt.config import checkout_root, load_territories
from fedldt.federation.audit import EGRESS_LOG, ERRORS_LOG
from fedldt.federation.certs import make_territory_key
from fedldt.federation.client import SCALAR_METRICS
from fedldt.federation.deploy import LocalFederation
from fedldt.federation.launch import RunFailed, free_port
from fedldt.metrics import SUM_KEYS
from fedldt.results import REFERENCES
from tests.conftest import write_los_loop_like

pytestmark = pytest.mark.slow

TOL = 1e-5


# -- the los_loop_3 pilot, deployed by scripts/federation_local.py ---------------------------------
@pytest.fixture(scope="module")
def deployed(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("deployed") / "run"
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(checkout_root() / "scripts" / "federation_local.py"), "pilot=los_loop_3", "train.rounds=2",
         f"hydra.run.dir={out}"],
        capture_output=True, text=True, timeout=1800,
    )
    wall = time.monotonic() - t0
    print(f"\n[test_deploy] federation_local.py los_loop_3, 2 rounds: {wall:.1f} s wall")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc, wall


def _close(a, b, path="summary"):
    """Assert two JSON-like trees are equal, floats to TOL (relative or absolute)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, rel=TOL, abs=TOL), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_deployment_gives_the_simulation_numbers(deployed, los_loop_3_simulation):
    out, proc, _ = deployed
    sim_out, sim_proc = los_loop_3_simulation
    assert sim_proc.returncode == 0, sim_proc.stderr[-3000:]
    assert "MAE model" in proc.stdout and f"results: {out}" in proc.stdout
    dep, sim = (json.loads((d / "summary.json").read_text()) for d in (out, sim_out))
    assert set(dep) == set(sim)  # the same summary.json schema
    assert dep["rounds"] == 2 and dep["seed"] == 0 and dep["failures"] == []
    for key in ("pilot", "mode", "dataset", "territories", "model", "test", "test_per_territory", "persistence",
                "persistence_per_territory", "history"):
        _close(sim[key], dep[key], key)
    hd, hs = (pd.read_csv(d / "history.csv") for d in (out, sim_out))
    assert list(hd.columns) == list(hs.columns) and len(hd) == 6
    pd.testing.assert_frame_equal(hd, hs, rtol=TOL, atol=TOL)
    assert (hd["train_status"] == "ok").all() and (hd["eval_status"] == "ok").all()
    md, ms = (torch.load(d / "model.pt", weights_only=False)["state_dict"] for d in (out, sim_out))
    assert list(md) == list(ms)
    for k in md:
        torch.testing.assert_close(md[k], ms[k], rtol=TOL, atol=TOL)


def test_deployment_used_tls_authentication_and_own_node_config(deployed):
    out, _, _ = deployed
    rec = json.loads((out / "logs" / "processes.json").read_text())
    by_name = {p["name"]: p for p in rec["started"]}
    assert sorted(by_name) == ["superlink", "supernode-0", "supernode-1", "supernode-2"]
    link = by_name["superlink"]["args"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in link
    assert "--insecure" not in link and link[link.index("--host") + 1] == "127.0.0.1"
    link_port = link[link.index("--port") + 1]
    ports = set()
    for i in range(3):
        args = by_name[f"supernode-{i}"]["args"]
        assert "--insecure" not in args and "--root-certificates" in args and "--auth-supernode-private-key" in args
        assert args[args.index("--superlink") + 1] == f"127.0.0.1:{link_port}"
        ports.add(args[args.index("--port") + 1])
        nc = args[args.index("--node-config") + 1]
        assert nc.startswith(f"territory={i} ") and f'out-dir="{out}/territories/territory-{i}"' in nc
        assert 'data-root="' in nc
        log = (out / "logs" / f"supernode-{i}.log").read_text()
        assert log.count("Sent successfully") == 6  # query, 2 x (train, evaluate), final test
    assert len(ports) == 3
    server_log = (out / "logs" / "server.log").read_text()
    assert "[fedldt] round 2/2" in server_log and "results written to" in server_log


def test_every_reply_carried_only_model_parameters_and_allowed_metrics(deployed):
    """Data never leaves: what each territory's SuperNode logged for every reply it sent."""
    out, _, _ = deployed
    ckpt = torch.load(out / "model.pt", weights_only=False)
    params = {k: [*v.shape] for k, v in ckpt["state_dict"].items()}
    horizon = ckpt["model_config"]["horizon"]
    cfg = yaml.safe_load((out / "resolved_config.yaml").read_text())
    territories = load_territories(cfg)
    allowed_metrics = set(SCALAR_METRICS) | {f"{p}.{k}" for p in ("model", *REFERENCES) for k in SUM_KEYS}
    allowed_info = {"territory", "territory-id", "num-nodes", "num-train", "num-val", "num-test", "in-channels",
                    "out-channels", "horizon"}
    for i, terr in enumerate(territories):
        n = terr.num_nodes
        data_shapes = {tuple(terr.values.shape), tuple(terr.mask.shape), (n,), (n, n), (n, 2),
                       tuple(terr.edge_index.shape), tuple(terr.edge_weight.shape)}
        entries = [json.loads(x) for x in (out / "territories" / f"territory-{i}" / EGRESS_LOG).read_text().splitlines()]
        assert [(e["message_type"], e["server_round"]) for e in entries] == [
            ("query", None), ("train", 1), ("evaluate", 1), ("train", 2), ("evaluate", 2), ("evaluate", 3)]
        assert all(e["territory"] == i and e["error"] is None for e in entries)
        for e in entries:
            kinds = {r["kind"] for r in e["records"]}
            if e["message_type"] == "query":
                (r,) = e["records"]
                assert r["kind"] == "config" and set(r["config"]) == allowed_info
                assert all(t in ("int", "str") for t in r["config"].values())
                continue
            assert kinds == ({"array", "metric"} if e["message_type"] == "train" else {"metric"})
            for r in e["records"]:
                if r["kind"] == "array":
                    assert r["name"] == "arrays"
                    got = {k: a["shape"] for k, a in r["arrays"].items()}
                    assert got == params  # exactly the model's parameters, names and shapes
                    assert {a["dtype"] for a in r["arrays"].values()} == {"float32"}
                    assert not {tuple(s) for s in got.values()} & data_shapes, f"territory {i}: data-shaped array"
                else:
                    assert set(r["metrics"]) <= allowed_metrics, set(r["metrics"]) - allowed_metrics
                    for k, kind in r["metrics"].items():
                        assert kind == ("scalar" if k in SCALAR_METRICS else horizon), (k, kind)


def _alive_flower(pid: int) -> bool:
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and any(w in " ".join(p.cmdline()) for w in ("flower-", "flwr"))
    except psutil.Error:
        return False


def _processes_pointing_into(folder: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if any(folder in v for v in p.environ().values()) or any(folder in a for a in p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            continue
    return found


def test_deployment_left_no_process(deployed):
    out, _, _ = deployed
    rec = json.loads((out / "logs" / "processes.json").read_text())
    assert rec["left_over"] == []
    pids = [p["pid"] for p in rec["started"]] + [d for p in rec["started"] for d in p["descendants"]]
    assert len(pids) >= 4 + 3  # SuperLink, 3 SuperNodes and at least their flower-superexec helpers
    assert not [pid for pid in pids if _alive_flower(pid)]
    assert not Path(rec["work_dir"]).exists()  # keys, certificates and Flower homes deleted
    assert _processes_pointing_into(rec["work_dir"]) == []


def test_ctrl_c_mid_run_stops_every_process(tmp_path):
    """SIGINT (Ctrl-C) while a run is in flight: the script stops the SuperLink, the SuperNodes,
    the ServerApp and every ClientApp it started, and exits 130."""
    write_los_loop_like(tmp_path / "data" / "los_loop", num_nodes=8, num_steps=300)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(checkout_root() / "scripts" / "federation_local.py"), "pilot=los_loop_3",
         f"paths.data_root={tmp_path / 'data'}", "partition.num_territories=2", "model.hidden=8", "train.rounds=1",
         f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # as from an interactive terminal: a test runner started in the background (`cmd &`)
        # passes SIGINT on as ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 600
    while not any("submitted" in x for x in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any("submitted" in x for x in lines), "".join(lines)[-3000:]
    time.sleep(5)  # the ServerApp is up and talking to the territories
    proc.send_signal(2)  # SIGINT, as Ctrl-C
    assert proc.wait(timeout=180) == 130, "".join(lines)[-3000:]
    reader.join(timeout=10)
    assert "interrupted; every process started was stopped" in "".join(lines)
    rec = json.loads((out / "logs" / "processes.json").read_text())
    assert rec["left_over"] == [] and len(rec["started"]) == 3
    assert not [pid for s in rec["started"] for pid in [s["pid"], *s["descendants"]] if _alive_flower(pid)]
    assert _processes_pointing_into(rec["work_dir"]) == []


# -- a federation of synthetic territories: refusals, failures, restarts ---------------------------
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.mktemp("federation")
    # The territories' own data; the server gets a data root that does not exist.
    write_los_loop_like(base / "territory-data" / "los_loop", num_nodes=12, num_steps=300, seed=2)
    fed = LocalFederation(base / "fed", 3, data_root=base / "territory-data", node_config={1: {"fail-in-round": 1}})
    with fed:
        yield fed


def _overrides(**extra):
    ov = {"pilot": "los_loop_3", "paths.data_root": "/nonexistent/fedldt-server-has-no-data", "train.rounds": 2,
          "model.hidden": 8, "seed": 5, "federation.timeout_s": 240, **extra}
    return [f"{k}={v}" for k, v in ov.items()]


def _refused(fed, tmp_path, name, **kw):
    proc = fed.start_supernode(port=free_port(), node_config={"territory": 0}, home=tmp_path / f"home-{name}",
                               log=tmp_path / f"{name}.log", name=name, **kw)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}: the SuperNode was not refused within 120 s; see {tmp_path / f'{name}.log'}")
    return rc, re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / f"{name}.log").read_text())


def test_supernode_with_an_unregistered_key_is_refused(federation, tmp_path):
    key, _ = make_territory_key(tmp_path / "stranger")  # a valid key the SuperLink never registered
    before = federation.supernodes()
    rc, log = _refused(federation, tmp_path, "unregistered", key=key)
    # Flower logs its exit code 305; the process itself exits with status 1.
    assert rc != 0 and "Exit Code: 305" in log and "Failed to activate SuperNode" in log, log[-2000:]
    assert federation.supernodes() == before  # nothing joined


def test_supernode_without_tls_is_refused(federation, tmp_path):
    key, pub = make_territory_key(tmp_path / "plain")
    node_id = federation.register(pub)  # even a registered territory may not join without TLS
    # The SuperLink speaks TLS only: a plain-HTTP SuperNode gets no answer and gives up.
    rc, log = _refused(federation, tmp_path, "insecure", key=None, tls=False, max_retries=2)
    assert rc != 0 and "Exit Code: 305" in log and "Failed to initialize the connection" in log, log[-2000:]
    # With its key, the SuperNode refuses plain HTTP itself, before connecting (Flower exit code 303).
    rc, log = _refused(federation, tmp_path, "insecure-with-key", key=key, tls=False)
    assert rc != 0 and "Exit Code: 303" in log and "TLS is not enabled" in log, log[-2000:]
    assert federation.supernodes()[node_id] == "registered"  # never online
    # TLS but no key: the SuperLink only admits registered SuperNodes.
    rc, log = _refused(federation, tmp_path, "nokey", key=None)
    assert rc != 0 and "Exit Code: 305" in log and "must be registered" in log, log[-2000:]


def test_failed_and_restarted_territories_rejoin_later_rounds(federation):
    """Territory 1 raises in round 1 (node config fail-in-round=1); territory 2's SuperNode is
    stopped (SIGTERM) once round 1 is aggregated, and restarted. Round 1 completes with the
    others (min_train_territories=2); territory 2 may miss round 2 while it is away (recorded as
    a failure, the round goes on with the other two) and trains again in round 3."""
    run_dir = federation.run_dir / "run-failures"
    server_log = federation.logs / "server.log"
    start = server_log.stat().st_size if server_log.exists() else 0
    first_pid = federation.territories[2].proc.pid
    events: list[str] = []

    def kill_and_restart():
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            text = server_log.read_text(errors="replace")[start:] if server_log.exists() else ""
            if "[fedldt] round 1/3" in text:
                federation.kill_territory(2)
                events.append("killed")
                federation.start_territory(2, wait=True)
                events.append("restarted")
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_and_restart, daemon=True)
    watcher.start()
    summary = federation.run(_overrides(**{"federation.min_train_territories": 2, "train.rounds": 3}), run_dir,
                             timeout_s=1500)
    watcher.join(timeout=60)
    assert events == ["killed", "restarted"] and federation.territories[2].proc.pid != first_pid
    assert summary["dataset"]["path"] == "/nonexistent/fedldt-server-has-no-data/los_loop"  # the server has no data
    assert sum(t["num_nodes"] for t in summary["territories"]) == 12  # the territories' own 12-node network
    fails = [(f["round"], f["phase"], f["territory"]) for f in summary["failures"]]
    assert fails[0] == (1, "train", "t1")
    t1_fail = [f for f in summary["failures"] if f["territory"] == "t1"]
    # Only the exception type and a code leave the territory; its text stays in its errors.log.
    assert len(t1_fail) == 1 and t1_fail[0]["reason"] == "InjectedFailure [fedldt-100]"
    t1_errors = (federation.run_dir / "territories" / "territory-1" / ERRORS_LOG).read_text()
    assert "fail-in-round=1" in t1_errors and "fail-in-round=1" not in (run_dir / "summary.json").read_text()
    assert "fail-in-round=1" not in server_log.read_text(errors="replace")[start:]  # nor in the server's log
    # Territory 2 may miss round 2 (Flower: "Node Unavailable" while it was away); nothing else fails.
    assert all(f[0] == 2 and f[2] == "t2" for f in fails[1:]), fails
    hist = pd.read_csv(run_dir / "history.csv", keep_default_na=False)
    by_round = {r: hist[hist["round"] == r].set_index("territory") for r in (1, 2, 3)}
    assert all(list(h.index) == ["t0", "t1", "t2"] for h in by_round.values())
    r1, r3 = by_round[1], by_round[3]
    assert r1.loc["t1", "train_status"] == "failed" and r1.loc["t1", "error"] == "train: InjectedFailure [fedldt-100]"
    assert r1.loc["t1", "train_loss"] == "" and r1.loc["t0", "train_status"] == r1.loc["t2", "train_status"] == "ok"
    assert by_round[2].loc["t0", "train_status"] == by_round[2].loc["t1", "train_status"] == "ok"
    assert (r3["train_status"] == "ok").all() and (r3["eval_status"] == "ok").all()  # both rejoined
    assert [r["round"] for r in summary["history"]] == [1, 2, 3]
    egress = [json.loads(x) for x in (federation.run_dir / "territories" / "territory-2" / EGRESS_LOG).read_text().splitlines()]
    assert ("train", 3) in [(e["message_type"], e["server_round"]) for e in egress if e["error"] is None]


def test_too_few_territories_stop_the_run_with_a_clear_error(federation):
    run_dir = federation.run_dir / "run-min3"
    with pytest.raises(RunFailed, match="finished:failed"):
        federation.run(_overrides(**{"federation.min_train_territories": 3, "train.rounds": 1}), run_dir, timeout_s=900)
    log = (federation.logs / "server.log").read_text()
    assert re.search(r"round 1: only 2 of 3 territories trained, fewer than federation.min_train_territories=3", log)
    assert not (run_dir / "summary.json").exists()


def test_federation_stops_every_process(federation):
    pids = [p.pid for _, p in federation._procs]
    work = str(federation.work)
    record = federation.stop()
    assert record["left_over"] == []
    assert not [pid for pid in pids + [d for s in record["started"] for d in s["descendants"]] if _alive_flower(pid)]
    assert _processes_pointing_into(work) == []
    assert (federation.logs / "processes.json").is_file()
