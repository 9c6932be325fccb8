"""Real deployments on loopback: a TLS SuperLink with SuperNode authentication and one
``flower-supernode`` process per territory, talking over the network stack (no simulation).

Two federations, each reused by several tests (the deployment round trip costs ~10 s per phase):

* ``deployed``: ``scripts/federation_local.py pilot=los_loop_3 train.rounds=2`` end to end
  (the real Los-loop data), compared with the simulation engine's run of the same config;
* ``federation``: a :class:`LocalFederation` on small synthetic territories, each holding only
  its own territory data package in a folder of its own (node config ``data-path``), whose server
  (``dataset=packages``) has no data at all, territory 1 failing in round 1 (test-only node config), used for refusals
  (of SuperNodes, and of the Control/runtime APIs at the Fleet-only gateway), failures, a killed
  and restarted SuperNode, the minimum-territories error, and a killed SuperLink whose run is resumed.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pandas as pd
import psutil
import pytest
import torch
import yaml
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from clients.audit import EGRESS_LOG, ERRORS_LOG
from clients.client_app import app
from clients.territory import SCALAR_METRICS
from fedldt.checkpoint import CHECKPOINT
from fedldt.config import checkout_root, compose_config, load_territories, resolve_config
from fedldt.launch.certs import make_territory_key
from fedldt.launch.loopback import LocalFederation
from fedldt.launch.simulation import RunFailed, flwr_env, free_port, processes_with_home
from fedldt.metrics import SUM_KEYS
from fedldt.results import REFERENCES
from tests.apps import write_test_app
from server.rounds import run_federated
from tests.conftest import write_los_loop_like, write_territory_packages
from tests.inprocess import InProcessGrid

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
    assert sorted(by_name) == ["gateway", "superlink", "supernode-0", "supernode-1", "supernode-2"]
    link = by_name["superlink"]["args"]
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation"):
        assert flag in link
    assert "--insecure" not in link and link[link.index("--host") + 1] == "127.0.0.1"
    link_port = link[link.index("--port") + 1]
    gw = by_name["gateway"]["args"]  # territories dial the Fleet-only gateway, which forwards to the SuperLink
    assert gw[1:3] == ["-m", "fedldt.launch.gateway"] and gw[gw.index("--superlink") + 1] == f"127.0.0.1:{link_port}"
    gw_addr = gw[gw.index("--listen") + 1]
    assert gw_addr != f"127.0.0.1:{link_port}"
    ports = set()
    for i in range(3):
        args = by_name[f"supernode-{i}"]["args"]
        assert "--insecure" not in args and "--root-certificates" in args and "--auth-supernode-private-key" in args
        assert args[args.index("--superlink") + 1] == gw_addr
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
        return p.status() != psutil.STATUS_ZOMBIE and any(
            w in " ".join(p.cmdline()) for w in ("flower-", "flwr", "fedldt.launch.gateway"))
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
    assert len(pids) >= 5 + 3  # SuperLink, gateway, 3 SuperNodes and at least their flower-superexec helpers
    assert not [pid for pid in pids if _alive_flower(pid)]
    assert not Path(rec["work_dir"]).exists()  # keys, certificates and Flower homes deleted
    assert _processes_pointing_into(rec["work_dir"]) == []


def _start_script(script: str, tmp_path: Path, sigint_default: bool = False) -> tuple[subprocess.Popen, list[str], Path]:
    """Start ``scripts/<script>`` on a tiny synthetic pilot (2 territories, 1 round), reading its output."""
    write_los_loop_like(tmp_path / "data" / "los_loop", num_nodes=8, num_steps=300)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, str(checkout_root() / "scripts" / script), "pilot=los_loop_3",
         f"paths.data_root={tmp_path / 'data'}", "partition.num_territories=2", "model.hidden=8", "train.rounds=1",
         f"hydra.run.dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # as from an interactive terminal: a test runner started in the background (`cmd &`)
        # passes SIGINT on as ignored, and Python then never raises KeyboardInterrupt
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint_default else None,
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 600
    while not any("submitted" in x for x in lines) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert any("submitted" in x for x in lines), "".join(lines)[-3000:]
    time.sleep(5)  # the ServerApp is up and talking to the territories
    return proc, lines, out


def _wait_gone(pids, flwr_homes, seconds=30.0) -> list[str]:
    """Processes still alive after ``seconds``: any of ``pids``, or any with one of ``flwr_homes``."""
    deadline = time.monotonic() + seconds
    while True:
        alive = [_describe(pid) for pid in pids if _alive(pid)]
        alive += [_describe(p.pid) for h in flwr_homes for p in processes_with_home(h)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(1.0)


def _describe(pid: int) -> str:
    try:
        return f"{pid} {' '.join(psutil.Process(pid).cmdline())}"
    except psutil.Error:
        return f"{pid} (gone while listed)"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_mid_run_stops_every_process(tmp_path, sig):
    """SIGINT (Ctrl-C) or SIGTERM (timeout, Slurm, Kubernetes, systemd) while a run is in flight:
    federation_local.py stops the SuperLink, the gateway, the SuperNodes, the ServerApp and every
    ClientApp it started, and exits 130 / 143."""
    proc, lines, out = _start_script("federation_local.py", tmp_path, sigint_default=True)
    started = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(sig)
    assert proc.wait(timeout=180) == 128 + sig, "".join(lines)[-3000:]
    time.sleep(1)
    how = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
    assert f"interrupted by {how}; every process started was stopped" in "".join(lines)
    rec = json.loads((out / "logs" / "processes.json").read_text())
    assert rec["left_over"] == [] and sorted(s["name"] for s in rec["started"]) == [
        "gateway", "superlink", "supernode-0", "supernode-1"]
    assert len(started) >= 4 + 2  # the four above and at least the SuperNodes' flower-superexec helpers
    assert not [pid for s in rec["started"] for pid in [s["pid"], *s["descendants"]] if _alive_flower(pid)]
    assert _wait_gone(started, []) == []
    assert _processes_pointing_into(rec["work_dir"]) == []


def test_sigterm_stops_a_simulation_and_every_process_it_started(tmp_path):
    """`timeout 120 python scripts/simulate.py ...` must not leave flower-superlink, flower-superexec,
    the ServerApp or Ray behind: SIGTERM goes through the same path as Ctrl-C
    (fedldt.launch.simulation.interruptible, shared by simulate, compare, sweep and federation_local)."""
    proc, lines, out = _start_script("simulate.py", tmp_path)
    started = psutil.Process(proc.pid).children(recursive=True)
    links = [p for p in started if "flower-superlink" in " ".join(p.cmdline())]
    assert len(links) == 1, [p.cmdline() for p in started]
    home = Path(links[0].environ()["FLWR_HOME"])
    assert len(processes_with_home(home)) >= 3  # SuperLink, its flower-superexec, the ServerApp / simulation
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 143, "".join(lines)[-3000:]
    time.sleep(1)
    assert "fedldt: interrupted by SIGTERM; every process started was stopped" in "".join(lines)
    assert _wait_gone([p.pid for p in started], [home]) == []
    assert not home.exists()
    assert not (out / "summary.json").exists()


# -- a federation of synthetic territories: refusals, failures, restarts ---------------------------
@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    base = tmp_path_factory.mktemp("federation")
    # Every territory's own data: its package alone in a folder of its own (territory-<i>/t<i>), named by its
    # node config data-path; the server's dataset.path does not exist.
    packages = write_territory_packages(base / "territory-data", num_territories=3, num_nodes=12, seed=2)
    # fail-in-round is read by the test app's fail_in_round_mod (tests/mods.py), not by the production app.
    fed = LocalFederation(base / "fed", 3, data_paths=packages, node_config={1: {"fail-in-round": 1}})
    with fed:
        yield fed


@pytest.fixture(scope="module")
def failing_app(tmp_path_factory):
    """The production app plus the test-only fail_in_round_mod, as a FAB folder (tests/apps.py)."""
    return write_test_app(tmp_path_factory.mktemp("apps") / "failing", ["fail_in_round_mod"])


def _overrides(**extra):
    ov = {"pilot": "los_loop_3", "dataset": "packages", "dataset.path": "/nonexistent/fedldt-server-has-no-data/packages",
          "paths.data_root": "/nonexistent/fedldt-server-has-no-data", "train.rounds": 2,
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
    # TLS but no key: such a SuperNode asks to register itself (Fleet register-node), which the
    # gateway does not forward: it answers as the SuperLink does under --enable-supernode-auth.
    rc, log = _refused(federation, tmp_path, "nokey", key=None)
    assert rc != 0 and "Exit Code: 305" in log and "must be registered" in log, log[-2000:]
    assert "refused POST '/v1/fleet/register-node'" in (federation.logs / "gateway.log").read_text()


def _flwr_at(address: str, ca: Path, home: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """``flwr ARGS CONN`` with a connection to ``address``: plain, then ``--format json`` (parsed)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "gw"\n\n[superlink.gw]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca}"\n')
    env = flwr_env(home)
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, "gw"]
    plain = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=300)
    as_json = subprocess.run([*cmd, "--format", "json"], env=env, cwd=home, capture_output=True, text=True, timeout=300)
    return plain, json.loads(as_json.stdout)


def test_a_territory_with_the_ca_and_its_key_cannot_register_list_or_submit(federation, tmp_path):
    """Closed federation: the public (gateway) port serves the Fleet API only. Someone holding
    ca.crt and a registered territory's private key can neither register a SuperNode key, nor
    list runs or nodes, nor submit a run, with the flwr CLI or with Flower's own HTTP clients
    signed by that key; the SuperLink's node and run lists are unchanged (checked by the
    operator on the internal port)."""
    from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest  # Flower's own clients, as an intruder's
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.control.control_http_client import ControlHttpClient
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    fed = federation
    gw = f"127.0.0.1:{fed.gateway_port}"
    ca = fed.pki.ca_cert
    nodes_before, runs_before = fed.supernodes(), fed.runs()
    assert [nodes_before[t.node_id] for t in fed.territories] == ["online"] * 3
    _, new_pub = make_territory_key(tmp_path / "intruder")

    # 1. the flwr CLI, pointed at the public address (the only one a territory can reach)
    for args, call in ((["supernode", "register", str(new_pub)], "register-node"), (["ls"], "list-runs"),
                       (["supernode", "ls"], "list-nodes"), (["run", str(checkout_root())], "start-run")):
        plain, out = _flwr_at(gw, ca, tmp_path / "intruder-home", *args)
        refused = f"Client error '403 Forbidden' for url 'https://{gw}/v1/control/{call}'"
        assert plain.returncode == 1, (args, plain.stdout, plain.stderr)
        assert "403 Forbidden" in plain.stderr and f"/v1/control/{call}" in plain.stderr, plain.stderr
        # (with --format json, flwr 1.42 exits 0 and reports success false)
        assert out["success"] is False and refused in out["error-message"], out

    # 2. Flower's own clients, every request signed with territory 0's registered key
    t0 = fed.territories[0]
    key = load_ssh_private_key(t0.key.read_bytes(), None)
    signer = NodeAuthHttpInterceptor(key, key.public_key())
    control = ControlHttpClient.from_server_address(gw, False, str(ca), [signer])
    with pytest.raises(httpx.HTTPStatusError) as exc:
        control.ListRuns(ListRunsRequest())
    assert exc.value.response.status_code == 403 and exc.value.response.content == b""
    with pytest.raises(httpx.HTTPStatusError) as exc:
        control.RegisterNode(RegisterNodeRequest(public_key=public_key_to_bytes(key.public_key())))
    assert exc.value.response.status_code == 403
    fleet = FleetHttpClient.from_server_address(gw, False, str(ca), [signer])
    reply = fleet.PullMessages(PullMessagesRequest(node=Node(node_id=int(t0.node_id))))
    assert isinstance(reply, PullMessagesResponse) and len(reply.messages_list) == 0  # Fleet works; no run now

    # 3. raw HTTPS: only Fleet calls and /health are forwarded
    with httpx.Client(base_url=f"https://{gw}", verify=str(ca)) as c:
        for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/control/start-run",
                     "/v1/runtime/acquire-task", "/v1/runtime/push-task-output",
                     "/v1/fleet/%2e%2e/control/list-runs", "/v1/fleet//pull-messages",
                     "/docs", "/openapi.json", "/v1/fleet/pull-messages?x=1"):
            r = c.post(path, content=b"", headers={"content-type": "application/protobuf"})
            assert (r.status_code, r.content) == (403, b""), path
        for method in ("GET", "PUT", "DELETE", "OPTIONS", "PATCH"):
            assert c.request(method, "/v1/fleet/pull-messages").status_code == 403, method
        assert c.get("/docs").status_code == 403 and c.get("/health").status_code == 200
        for path, code in (("/v1/fleet/register-node", 2001), ("/v1/fleet/unregister-node", 2002)):  # never forwarded
            r = c.post(path, content=b"", headers={"content-type": "application/protobuf"})
            assert r.status_code == 412 and r.json()["code"] == code and "via the CLI" in r.json()["detail"], path
        # unsigned Fleet call: forwarded, and the SuperLink itself refuses it
        r = c.post("/v1/fleet/pull-messages", content=b"", headers={"content-type": "application/protobuf"})
        assert r.status_code == 401 and r.json() == {"detail": "Invalid SuperNode authentication"}
        # a body over the gateway's cap (64 MiB) is cut off with 413, streamed without content-length
        big = (b"\0" * (1 << 20) for _ in range(65))
        r = c.post("/v1/fleet/push-object", content=big, headers={"content-type": "application/protobuf"})
        assert r.status_code == 413

    # 4. nothing changed on the SuperLink (the operator's view, internal port)
    assert fed.supernodes() == nodes_before and fed.runs() == runs_before
    gateway_log = (fed.logs / "gateway.log").read_text()
    assert "refused POST '/v1/control/register-node'" in gateway_log and "refused POST '/v1/control/start-run'" in gateway_log


def test_failed_and_restarted_territories_rejoin_later_rounds(federation, failing_app):
    """Territory 1 raises in round 1 (node config fail-in-round=1, read by the test app's
    fail_in_round_mod); territory 2's SuperNode is
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
                             timeout_s=1500, app_dir=failing_app)
    watcher.join(timeout=60)
    assert events == ["killed", "restarted"] and federation.territories[2].proc.pid != first_pid
    assert summary["dataset"] == {"name": "packages", "path": "/nonexistent/fedldt-server-has-no-data/packages"}  # no data
    assert sum(t["num_nodes"] for t in summary["territories"]) == 12  # the territories' own 12-node network
    assert [t["id"] for t in summary["territories"]] == ["t0", "t1", "t2"]  # the names in their packages' territory.yaml
    for t in federation.territories:  # each SuperNode was given its own package, and its folder holds nothing else
        package = Path(t.node_config["data-path"])
        assert "data-root" not in t.node_config and (package / "territory.yaml").is_file()
        assert package.name == f"t{t.index}" and [p.name for p in package.parent.iterdir()] == [package.name]
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


def test_too_few_territories_stop_the_run_with_a_clear_error(federation, failing_app):
    run_dir = federation.run_dir / "run-min3"
    with pytest.raises(RunFailed, match="finished:failed"):
        federation.run(_overrides(**{"federation.min_train_territories": 3, "train.rounds": 1}), run_dir, timeout_s=900,
                       app_dir=failing_app)
    log = (federation.logs / "server.log").read_text()
    assert re.search(r"round 1: only 2 of 3 territories trained, fewer than federation.min_train_territories=3", log)
    assert not (run_dir / "summary.json").exists()


def test_hard_kill_is_sigkill_and_takes_the_helpers_and_the_node_comes_back(federation):
    """kill_territory(hard=True) kills the SuperNode with SIGKILL, as a crash would (returncode
    -9), and its helper processes (found by its FLWR_HOME) with it; the territory is then admitted
    again once the SuperLink lets its heartbeat expire."""
    t = federation.territories[0]
    assert t.proc is not None and t.proc.poll() is None
    helpers = processes_with_home(t.home)
    assert any(p.pid != t.proc.pid for p in helpers), [p.cmdline() for p in helpers]  # e.g. flower-superexec
    federation.kill_territory(0, hard=True)
    assert t.proc.returncode == -signal.SIGKILL
    time.sleep(0.5)
    assert processes_with_home(t.home) == [] and not any(_alive_flower(p.pid) for p in helpers)
    federation.start_territory(0, wait=True, timeout=300)
    assert federation.supernodes()[t.node_id] == "online"


@pytest.fixture
def fresh_federation(tmp_path_factory):
    """A federation of its own (the same 3 synthetic territories as :func:`federation`): the tests before
    kill and restart territories of the shared one, and the SuperLink kill needs nodes that are all up."""
    base = tmp_path_factory.mktemp("federation-resume")
    packages = write_territory_packages(base / "territory-data", num_territories=3, num_nodes=12, seed=2)
    fed = LocalFederation(base / "fed", 3, data_paths=packages)
    with fed:
        yield fed


def test_a_killed_superlink_is_resumed_from_its_checkpoint(fresh_federation, tmp_path):
    """The SuperLink (and the ServerApp with it) is killed with SIGKILL once round 1's checkpoint
    is written; started again, ``resume=<run folder>`` finishes the 3 rounds. The territories
    reload their own local entries (from their folders), and the result equals, bit for bit, a
    straight 3-round run of the same config (fedldt's server and ClientApp on an in-process grid)."""
    fed = fresh_federation
    run_dir = fed.run_dir / "run-resume"
    killed: list[int] = []

    def kill_after_round_1():
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and not killed:
            try:
                rnd = json.loads(torch.load(run_dir / CHECKPOINT, weights_only=True)["meta"])["round"]
            except Exception:  # not written yet
                rnd = 0
            if rnd >= 1:
                fed.kill_superlink()
                killed.append(rnd)
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_after_round_1, daemon=True)
    watcher.start()
    with pytest.raises(RunFailed):
        fed.run(_overrides(**{"train.rounds": 3}), run_dir, timeout_s=900)
    watcher.join(timeout=60)
    assert killed and killed[0] in (1, 2) and not (run_dir / "summary.json").exists()
    fed.restart_superlink()
    summary = fed.run(_overrides(**{"train.rounds": 3, "resume": run_dir}), run_dir, timeout_s=900)
    assert summary["resumed_after_round"] == killed[0] and [r["round"] for r in summary["history"]] == [1, 2, 3]
    hist = pd.read_csv(run_dir / "history.csv")
    assert list(hist["round"]) == [r for r in (1, 2, 3) for _ in range(3)]  # once each per territory

    cfg = resolve_config(compose_config(_overrides(**{"train.rounds": 3})), require_data=False)
    nodes = {10 + t.index: {"territory": t.index, "data-path": t.node_config["data-path"],
                            "out-dir": str(tmp_path / f"t{t.index}")} for t in fed.territories}
    straight = run_federated(InProcessGrid(app, nodes), cfg, tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert summary["test"] == straight["test"] and summary["history"] == straight["history"]


def test_federation_stops_every_process(federation):
    pids = [p.pid for _, p in federation._procs]
    work = str(federation.work)
    record = federation.stop()
    assert record["left_over"] == []
    assert not [pid for pid in pids + [d for s in record["started"] for d in s["descendants"]] if _alive_flower(pid)]
    assert _processes_pointing_into(work) == []
    assert (federation.logs / "processes.json").is_file()
