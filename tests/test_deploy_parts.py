"""The pieces of a deployment that run without Flower's runtime: certificates and keys, node
config (a territory's own data path), test-only mods and the test app that ships them, the egress audit mod, and
how the strategy records failed replies. The real processes are in tests/test_deploy.py."""

import json
import os
import stat
import time

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key, load_ssh_public_key
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from clients import territory
from clients.audit import EGRESS_LOG, ERRORS_LOG, egress_log_path
from clients.client_app import app, build_app
from fedldt.config import checkout_root, compose_config, load_territories, resolve_config
from fedldt.launch.certs import KeyFileError, main as certs_main, make_server_pki, make_territory_key
from fedldt.launch.loopback import node_config_arg
from fedldt.metrics import SUM_KEYS
from server.rounds import discover_territories, min_train_territories
from server.strategy import FedLDTAvg, FederationError
from tests.apps import write_test_app
from tests.conftest import write_los_loop_like, write_territory_packages
from tests.inprocess import InProcessGrid
from tests.mods import InjectedFailure, fail_in_round_mod


def _md(mtype, msg_id="m1", src=0, dst=1, reply_to=""):
    return Metadata(run_id=7, message_id=msg_id, src_node_id=src, dst_node_id=dst, reply_to_message_id=reply_to,
                    group_id="", created_at=time.time(), ttl=3600.0, message_type=mtype)


# -- certificates and keys ------------------------------------------------------------------
def test_server_certificate_is_signed_by_the_ca_and_names_loopback(tmp_path):
    pki = make_server_pki(tmp_path / "pki", san=["127.0.0.1", "superlink.example"])
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes, padding.PKCS1v15(), srv.signature_hash_algorithm)
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(pki.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == srv.public_key().public_numbers()
    for secret in (pki.ca_key, pki.server_key):
        assert secret.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="san"):
        make_server_pki(tmp_path / "x", san=[])


def test_territory_key_is_an_openssh_nist_p384_pair(tmp_path):
    priv, pub = make_territory_key(tmp_path / "keys" / "territory-2")
    assert pub == tmp_path / "keys" / "territory-2.pub"
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    text = pub.read_text()
    assert text.startswith("ecdsa-sha2-nistp384 ") and text.rstrip().endswith("territory-2")
    assert load_ssh_public_key(text.encode()).public_numbers() == key.public_key().public_numbers()
    assert priv.stat().st_mode & 0o777 == 0o600
    other, _ = make_territory_key(tmp_path / "keys" / "territory-3")
    assert other.read_bytes() != priv.read_bytes()


@pytest.mark.parametrize("old_mode", [0o644, 0o666])
def test_rewritten_private_keys_are_0600_whatever_the_old_mode_and_umask(tmp_path, old_mode):
    """Over an existing world-readable key, --force writes a new 0600 file (the old mode is not kept)."""
    pki = make_server_pki(tmp_path / "pki")
    priv, pub = make_territory_key(tmp_path / "keys" / "territory-0")
    old = {p: p.read_bytes() for p in (pki.ca_key, pki.server_key, priv)}
    for p in old:
        os.chmod(p, old_mode)
    umask = os.umask(0)  # the most permissive umask: modes must still be exact
    try:
        pki2 = make_server_pki(tmp_path / "pki", overwrite=True)
        priv2, pub2 = make_territory_key(tmp_path / "keys" / "territory-0", overwrite=True)
    finally:
        os.umask(umask)
    for p in (pki2.ca_key, pki2.server_key, priv2):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert p.read_bytes() != old[p]  # a new key was written
    for p in (pki2.ca_cert, pki2.server_cert, pub2):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert load_ssh_private_key(priv2.read_bytes(), None).public_key().public_numbers() == \
        load_ssh_public_key(pub2.read_bytes()).public_numbers()
    assert sorted(x.name for x in (tmp_path / "pki").iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]


def test_key_writers_never_replace_what_fedldt_did_not_make(tmp_path):
    pki = make_server_pki(tmp_path / "pki")
    before = {p: p.read_bytes() for p in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key)}
    # Without overwrite, an existing file (even fedldt's own) is refused and nothing is written.
    with pytest.raises(KeyFileError, match=r"ca\.crt already exists.*--force"):
        make_server_pki(tmp_path / "pki")
    assert {p: p.read_bytes() for p in before} == before
    # With overwrite, a file that is not a key/certificate fedldt writes is refused too.
    mine = tmp_path / "mine"
    (mine / "keys").mkdir(parents=True)
    (mine / "keys" / "territory-0").write_text("my notes, not a key\n")
    with pytest.raises(KeyFileError, match="not what fedldt writes there .an unencrypted OpenSSH private key"):
        make_territory_key(mine / "keys" / "territory-0", overwrite=True)
    assert (mine / "keys" / "territory-0").read_text() == "my notes, not a key\n"
    assert not (mine / "keys" / "territory-0.pub").exists()
    # A certificate from another CA (here: a self-signed one) is not fedldt's either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "server.pem").write_bytes(_self_signed_pem())
    with pytest.raises(KeyFileError, match="server.pem exists and is not what fedldt writes there .a certificate issued by"):
        make_server_pki(other, overwrite=True)
    assert sorted(x.name for x in other.iterdir()) == ["server.pem"]  # all-or-nothing: no CA written
    # The command line says so and exits 1.
    with pytest.raises(SystemExit) as exc:
        certs_main(["territory-key", "--out", str(mine / "keys" / "territory-0"), "--force"])
    assert exc.value.code == 1


def test_fedldt_certs_is_the_certificate_command(tmp_path, capsys):
    """``fedldt certs`` (the CLI subcommand) writes keys as ``python -m fedldt.launch.certs`` does
    and refuses what fedldt did not write with exit status 1."""
    from fedldt.cli import main as fedldt_main

    key = tmp_path / "keys" / "territory-0"
    assert fedldt_main(["certs", "territory-key", "--out", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.with_suffix(".pub").exists()
    assert capsys.readouterr().out.split() == [str(key), str(key.with_suffix(".pub"))]
    assert fedldt_main(["certs", "ca", "--out", str(tmp_path / "pki")]) == 0
    assert sorted(p.name for p in (tmp_path / "pki").iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    (tmp_path / "notes").write_text("mine\n")
    assert fedldt_main(["certs", "territory-key", "--out", str(tmp_path / "notes"), "--force"]) == 1
    assert "fedldt certs territory-key: error:" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "mine\n"


def test_key_writers_refuse_symbolic_links(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("do not touch\n")
    os.chmod(target, 0o644)
    link = tmp_path / "keys" / "territory-0"
    link.parent.mkdir()
    link.symlink_to(target)
    for overwrite in (False, True):
        with pytest.raises(KeyFileError, match="symbolic link"):
            make_territory_key(link, overwrite=overwrite)
    assert target.read_text() == "do not touch\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.key").symlink_to(target)
    with pytest.raises(KeyFileError, match="symbolic link"):
        make_server_pki(tmp_path / "pki", overwrite=True)
    assert target.read_text() == "do not touch\n"


def _self_signed_pem() -> bytes:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "someone else")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_node_config_arg_quotes_strings_and_refuses_spaces():
    assert node_config_arg({"territory": 2, "data-root": "/srv/data", "fail-in-round": 1, "x": 0.5}) == \
        'territory=2 data-root="/srv/data" fail-in-round=1 x=0.5'
    with pytest.raises(ValueError, match="spaces"):
        node_config_arg({"data-root": "/my data"})


def test_local_federation_takes_one_data_path_per_territory_and_no_data_root(tmp_path):
    from fedldt.launch.loopback import LocalFederation

    fed = LocalFederation(tmp_path / "fed", 2, data_paths=[tmp_path / "a", tmp_path / "b"])  # starts nothing yet
    assert fed.data_paths == [tmp_path.resolve() / "a", tmp_path.resolve() / "b"] and fed.data_root is None
    with pytest.raises(ValueError, match=r"one folder per territory \(3, got 2\)"):
        LocalFederation(tmp_path / "fed", 3, data_paths=[tmp_path / "a", tmp_path / "b"])
    with pytest.raises(ValueError, match="no data_root"):
        LocalFederation(tmp_path / "fed", 2, data_root=tmp_path, data_paths=[tmp_path / "a", tmp_path / "b"])


# -- a territory's own data ----------------------------------------------------------------
@pytest.fixture(scope="module")
def own_data(tmp_path_factory):
    """A territory's data folder (9 nodes) and a config whose server path does not exist."""
    root = tmp_path_factory.mktemp("territory") / "data"
    write_los_loop_like(root / "los_loop", num_nodes=9, num_steps=300, seed=1)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", "paths.data_root=/nonexistent/server/data",
                                         "partition.num_territories=2", "model.hidden=8"]), require_data=False)
    assert cfg["dataset"]["path"] == "/nonexistent/server/data/los_loop"
    return root, cfg


def test_node_config_data_root_replaces_the_server_path(own_data):
    root, cfg = own_data
    assert territory.territory_config(cfg, {"territory": 0})["dataset"]["path"] == cfg["dataset"]["path"]
    mine = territory.territory_config(cfg, {"territory": 0, "data-root": str(root)})
    assert mine["dataset"]["path"] == str(root / "los_loop") and cfg["dataset"]["path"].startswith("/nonexistent")
    exact = territory.territory_config(cfg, {"data-path": str(root / "los_loop"), "data-root": "/ignored"})
    assert exact["dataset"]["path"] == str(root / "los_loop")  # data-path wins over data-root
    with pytest.raises(FileNotFoundError, match="node config data-root"):
        territory.territory_config(cfg, {"data-root": str(root / "missing")})
    with pytest.raises(ValueError, match="absolute"):
        territory.territory_config(cfg, {"data-path": "relative/los_loop"})


def test_clientapp_uses_its_own_data_and_logs_what_it_sends(own_data, tmp_path):
    root, cfg = own_data
    out = tmp_path / "out"
    ctx = Context(run_id=7, node_id=11, node_config={"territory": 1, "data-root": str(root), "out-dir": str(out)},
                  state=RecordDict(), run_config={})
    reply = app(Message(RecordDict({"config": ConfigRecord({"fedldt-config": json.dumps(cfg)})}), metadata=_md(MessageType.QUERY)), ctx)
    assert not reply.has_error()
    info = dict(reply.content["info"])
    sizes = [t.num_nodes for t in load_territories(territory.territory_config(cfg, ctx.node_config))]
    assert sum(sizes) == 9 and info["num-nodes"] == sizes[1]  # the territory's 9-node network, not the server's
    assert egress_log_path(ctx.node_config) == out / EGRESS_LOG
    (entry,) = [json.loads(line) for line in (out / EGRESS_LOG).read_text().splitlines()]
    assert entry["message_type"] == "query" and entry["run_id"] == 7 and entry["node_id"] == 11 and entry["territory"] == 1
    assert entry["error"] is None
    (rec,) = entry["records"]
    assert rec["name"] == "info" and rec["kind"] == "config" and set(rec["config"]) == set(info)


# -- a territory whose data is its own territory data package (issue 12 item 6) ----------------
@pytest.fixture(scope="module")
def own_packages(tmp_path_factory):
    """Three territories' packages, each alone in a folder of its own, and the coordinator's config
    (``dataset=packages``) whose path does not exist: the coordinator has no data."""
    base = tmp_path_factory.mktemp("own-packages")
    folders = write_territory_packages(base / "territories", seed=3)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", "dataset=packages", "dataset.path=/nonexistent/server/packages",
                                         "model.hidden=8"]), require_data=False)
    return base, folders, cfg


def test_a_package_data_path_is_the_territorys_whole_data(own_packages, tmp_path):
    base, folders, cfg = own_packages
    assert cfg["partition"] == {"_target_": "fedldt.data.partition.as_given", "num_territories": 3}  # the pilot's count
    assert sorted(p.name for p in (base / "territories").iterdir()) == ["territory-0", "territory-1", "territory-2"]
    assert [[p.name for p in f.parent.iterdir()] for f in folders] == [["t0"], ["t1"], ["t2"]]
    # the same 12-node network split by the built-in path (load_los_loop, k-means): what each package must hold
    network = write_los_loop_like(base / "network" / "los_loop", num_nodes=12, num_steps=300, seed=3)
    builtin = load_territories(resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={network}"])))
    for i, folder in enumerate(folders):
        mine = territory.territory_config(cfg, {"territory": i, "data-path": str(folder)})
        assert mine["dataset"] == {"own_package": str(folder), "name": "packages"}
        ds, ref = territory.own_territory(mine, i), builtin[i]
        assert ds.name == ref.name == f"t{i}" and list(ds.node_ids) == list(ref.node_ids)
        np.testing.assert_array_equal(np.asarray(ds.mask), np.asarray(ref.mask))
        np.testing.assert_array_equal(np.asarray(ds.values), np.asarray(ref.values))
        assert ds.extra["valid_range"]["speed"]["max"] == 120  # the package's own valid range (the server sends none)
    assert sorted(s for t in builtin for s in t.node_ids) == [str(700000 + j) for j in range(12)]
    # the package is the data, whatever the index: the index only places the territory in the federation
    assert territory.own_territory(territory.territory_config(cfg, {"territory": 2, "data-path": str(folders[0])}), 2).name == "t0"
    # the coordinator learns names and sizes from the territories' query replies (real ClientApp, no Flower runtime)
    grid = InProcessGrid(app, {10 + i: {"territory": i, "data-path": str(f), "out-dir": str(tmp_path / f"out-{i}")}
                               for i, f in enumerate(folders)})
    infos = discover_territories(grid, cfg, timeout=30)
    assert [infos[i]["territory-id"] for i in range(3)] == ["t0", "t1", "t2"]
    assert [infos[i]["num-nodes"] for i in range(3)] == [t.num_nodes for t in builtin] and sum(
        t.num_nodes for t in builtin) == 12
    twice = InProcessGrid(app, {10 + i: {"territory": i, "data-path": str(folders[j]), "out-dir": str(tmp_path / f"o-{i}")}
                                for i, j in enumerate((0, 0, 2))})  # territories 0 and 1 hold the same package
    with pytest.raises(FederationError, match="territories 0 and 1 are both named 't0'"):
        discover_territories(twice, cfg, timeout=30)


def test_a_data_path_that_holds_no_data_is_refused_naming_the_node_config_key(own_packages, tmp_path):
    _, folders, cfg = own_packages
    with pytest.raises(NotADirectoryError, match=r"from node config data-path='.*territory.yaml'\) is a file, not a folder"):
        territory.territory_config(cfg, {"data-path": str(folders[0] / "territory.yaml")})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"from node config data-path='.*empty'\) is an empty folder; fix the "
                                                r"SuperNode's --node-config data-path"):
        territory.territory_config(cfg, {"data-path": str(empty)})
    stray = tmp_path / "stray"
    (stray / "old").mkdir(parents=True)
    (stray / "speeds.csv").write_text("a\n1\n")
    with pytest.raises(FileNotFoundError, match=r"data-path=.*is neither a territory data package \(no territory.yaml\) "
                                                r"nor a folder of packages"):
        territory.territory_config(cfg, {"data-path": str(stray)})
    # a folder of package sub-folders is the dataset folder of dataset=packages (the territory takes the one at its index)
    shared = territory.territory_config(cfg, {"territory": 0, "data-path": str(folders[1].parent)})
    assert shared["dataset"]["path"] == str(folders[1].parent) and "own_package" not in shared["dataset"]
    # only the territory's node config names its package: one named by the server is ignored
    sent = {**cfg, "dataset": {**cfg["dataset"], "own_package": str(folders[0])}}
    assert "own_package" not in territory.territory_config(sent, {"territory": 0})["dataset"]
    # through the ClientApp: the reply carries the exception type only, the path stays in errors.log
    ctx = Context(run_id=7, node_id=11, node_config={"territory": 0, "data-path": str(empty), "out-dir": str(tmp_path / "out")},
                  state=RecordDict(), run_config={})
    reply = app(Message(RecordDict({"config": ConfigRecord({"fedldt-config": json.dumps(cfg)})}), metadata=_md(MessageType.QUERY)), ctx)
    assert reply.error.reason == "FileNotFoundError [fedldt-100]"
    assert "node config data-path" in (tmp_path / "out" / ERRORS_LOG).read_text()


def _train_msg(cfg, server_round):
    content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(2)}),
                          "config": ConfigRecord({"fedldt-config": json.dumps(cfg), "server-round": server_round})})
    return Message(content, metadata=_md(MessageType.TRAIN))


def test_fail_in_round_mod_hits_one_round_behind_the_egress_mod(own_data, tmp_path):
    """The test-only failure is a mod the test adds (tests/mods.py), not part of the production app."""
    root, cfg = own_data
    out = tmp_path / "out"
    failing = build_app([fail_in_round_mod])
    ctx = Context(run_id=7, node_id=11, node_config={"territory": 0, "data-root": str(root), "out-dir": str(out),
                                                     "fail-in-round": 1}, state=RecordDict(), run_config={})
    reply = failing(_train_msg(cfg, 1), ctx)  # the egress mod: a coded error reply
    assert reply.has_error() and reply.error.reason == "InjectedFailure [fedldt-100]"
    (entry,) = [json.loads(line) for line in (out / EGRESS_LOG).read_text().splitlines()]
    assert entry["records"] == [] and entry["error"] == "InjectedFailure [fedldt-100]" and entry["server_round"] == 1
    assert "test-only failure injected by node config fail-in-round=1" in (out / "errors.log").read_text()
    # other rounds reach the train handler (which refuses these 2-value arrays: not the model's)
    other = failing(_train_msg(cfg, 2), ctx)
    assert other.error.reason == "ValueError [fedldt-100]"
    # the production app ignores the key: round 1 reaches its train handler too
    prod = app(_train_msg(cfg, 1), ctx)
    assert prod.error.reason == "ValueError [fedldt-100]"
    assert (out / "errors.log").read_text().count("fail-in-round=1") == 1
    with pytest.raises(InjectedFailure, match="round 3"):  # the mod alone, around a handler
        fail_in_round_mod(_train_msg(cfg, 3), Context(run_id=1, node_id=1, node_config={"fail-in-round": 3},
                                                      state=RecordDict(), run_config={}), lambda m, c: m)


def test_production_code_has_no_test_hook():
    """No test-only branch in what territories run: clients/ and fedldt/ never mention fail-in-round."""
    for folder in ("clients", "server", "fedldt"):
        for f in (checkout_root() / folder).rglob("*.py"):
            assert "fail-in-round" not in f.read_text() and "InjectedFailure" not in f.read_text(), f


def test_test_app_ships_the_production_app_with_the_listed_mods(tmp_path):
    """tests/apps.py writes a FAB folder: the production clients/ and server/, the mods, and a
    ClientApp component that adds them; Flower's own FAB builder accepts it and includes them."""
    from flwr.cli.build import build_fab_from_disk

    app_dir = write_test_app(tmp_path / "app", ["fail_in_round_mod"])
    text = (app_dir / "pyproject.toml").read_text()
    assert 'clientapp = "fedldt_test_app:app"' in text and 'serverapp = "server.server_app:app"' in text
    assert (app_dir / "clients" / "client_app.py").read_text() == (checkout_root() / "clients" / "client_app.py").read_text()
    assert """build_app(resolve_mods(json.loads('["fail_in_round_mod"]')))""" in (app_dir / "fedldt_test_app.py").read_text()
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))).namelist()
    assert {"fedldt_test_app.py", "fedldt_test_mods.py", "clients/client_app.py", "server/server_app.py",
            "pyproject.toml"} <= set(names), names
    with pytest.raises(ValueError, match="unknown test mods"):
        write_test_app(tmp_path / "bad", ["no_such_mod"])
    assert not (tmp_path / "bad").exists()


# -- failures in the strategy ----------------------------------------------------------------
def test_min_train_territories_defaults_to_all_and_is_checked(own_data):
    _, cfg = own_data
    assert min_train_territories(cfg) == 2
    assert min_train_territories({**cfg, "federation": {**cfg["federation"], "min_train_territories": 1}}) == 1
    for bad in (0, 3, 1.5, True):
        with pytest.raises(ValueError, match="federation.min_train_territories"):
            min_train_territories({**cfg, "federation": {**cfg["federation"], "min_train_territories": bad}})


def _train_reply(sent, idx, loss):
    metrics = MetricRecord({"num-examples": 10, "train_loss": loss, "territory": idx})
    return Message(RecordDict({"arrays": ArrayRecord({"w": torch.full((2,), float(idx))}), "metrics": metrics}), reply_to=sent)


def _eval_reply(sent, idx):
    h = 12
    sums = {f"model.{k}": [1.0] * h for k in SUM_KEYS}
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 5, "territory": idx, **sums})}), reply_to=sent)


def test_strategy_names_the_territory_of_every_failed_reply():
    nodes = {101: 0, 102: 1, 103: 2}
    strategy = FedLDTAvg(territory_ids={0: "t0", 1: "t1", 2: "t2"}, report_steps=[3, 12], num_rounds=1,
                         node_territories=nodes, min_train_territories=1)
    # What configure_train returned (Flower fills in message ids when it sends them).
    sent = [Message(RecordDict(), metadata=_md(MessageType.TRAIN, msg_id=f"m{n}", src=0, dst=n)) for n in nodes]
    strategy._sent["train"] = sent
    replies = [
        _train_reply(sent[0], 0, 0.5),
        Message(error=Error(code=0, reason="InjectedFailure: boom"), reply_to=sent[1]),  # the ClientApp raised
        # The SuperLink's own "node unavailable" reply carries node id 0, only the message it answers.
        Message(error=Error(code=5, reason="Node Unavailable"), metadata=_md(MessageType.TRAIN, msg_id="x", src=0, dst=0,
                                                                                reply_to="m103")),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_array_equal(arrays["w"].numpy(), [0.0, 0.0])  # only t0's parameters
    assert [(f["territory"], f["node_id"], f["reason"]) for f in strategy.failures] == [
        ("t1", 102, "InjectedFailure: boom"), ("t2", 103, "Node Unavailable")]
    ev = [Message(RecordDict(), metadata=_md(MessageType.EVALUATE, msg_id=f"e{n}", src=0, dst=n)) for n in nodes]
    strategy._sent["evaluate"] = ev
    strategy.aggregate_evaluate(1, [_eval_reply(ev[0], 0), _eval_reply(ev[1], 1)])  # t2 never answers
    rows = {r["territory"]: r for r in strategy.history}
    assert (rows["t0"]["train_status"], rows["t0"]["eval_status"], rows["t0"]["error"]) == ("ok", "ok", "")
    assert (rows["t1"]["train_status"], rows["t1"]["eval_status"]) == ("failed", "ok")
    assert rows["t1"]["error"] == "train: InjectedFailure: boom" and rows["t1"]["train_loss"] is None
    assert (rows["t2"]["train_status"], rows["t2"]["eval_status"]) == ("failed", "failed")
    assert rows["t2"]["error"] == "train: Node Unavailable; evaluate: no reply within federation.timeout_s"
    assert strategy.failures[-1] == {"round": 1, "phase": "evaluate", "territory": "t2", "node_id": 103,
                                     "reason": "no reply within federation.timeout_s"}


def test_strategy_stops_the_run_below_the_minimum():
    strategy = FedLDTAvg(territory_ids={0: "t0", 1: "t1"}, report_steps=[3], num_rounds=1,
                         node_territories={101: 0, 102: 1})  # default minimum: every territory
    sent = [Message(RecordDict(), metadata=_md(MessageType.TRAIN, msg_id=f"m{n}", src=0, dst=n)) for n in (101, 102)]
    strategy._sent["train"] = sent
    with pytest.raises(FederationError, match=r"round 3: only 1 of 2 territories trained.*min_train_territories=2.*'t1'"):
        strategy.aggregate_train(3, [_train_reply(sent[0], 0, 0.5), Message(error=Error(code=0, reason="x"), reply_to=sent[1])])


def test_egress_log_default_is_under_the_checkout_outputs():
    assert egress_log_path({"partition-id": 4}) == checkout_root() / "outputs" / "territories" / "territory-4" / EGRESS_LOG
    with pytest.raises(ValueError, match="absolute"):
        egress_log_path({"out-dir": "rel/dir"})
    assert os.path.isabs(egress_log_path({"out-dir": "/tmp/x"}))


# -- the Fleet-only gateway, in process (the real SuperLink behind it: tests/test_deploy.py) -----
def test_gateway_refuses_everything_but_fleet_calls_without_contacting_the_superlink(tmp_path):
    from starlette.testclient import TestClient

    from fedldt.launch.gateway import ALLOWED, FLEET_CALLS, create_app, parse_address

    pki = make_server_pki(tmp_path / "pki")
    port = 9  # discard port: nothing listens, so a forwarded call can only fail with 502
    with TestClient(create_app(f"127.0.0.1:{port}", pki.ca_cert, max_body_bytes=1000)) as c:
        for method, path in [("POST", "/v1/control/start-run"), ("POST", "/v1/control/list-runs"),
                             ("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/acquire-task"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/"), ("GET", "/v1/fleet/pull-messages"),
                             ("POST", "/v1/fleet/pull-messages/"), ("POST", "/v1/fleet/../control/list-runs"),
                             ("POST", "/v1/fleet/pull-messages?node=1"), ("DELETE", "/health"), ("PROPFIND", "/health")]:
            r = c.request(method, path, content=b"x")
            assert (r.status_code, r.content) == (403, b""), (method, path)
        r = c.post("/v1/fleet/register-node", content=b"")
        assert r.status_code == 412 and r.json() == {
            "code": 2001, "detail": "SuperNode authentication is enabled. All SuperNodes must be registered via the CLI."}
        assert c.post("/v1/fleet/push-object", content=b"\0" * 1001).status_code == 413
        assert c.post("/v1/fleet/push-object", content=b"\0" * 10, headers={"content-length": "99999"}).status_code == 413
        assert c.post("/v1/fleet/push-object", content=b"\0" * 1000).status_code == 502  # allowed: forwarded, no SuperLink
        assert c.get("/health").status_code == 502
    assert len(FLEET_CALLS) == 10 and ("POST", "/v1/fleet/register-node") not in ALLOWED
    assert parse_address("[::1]:9092", "--listen") == ("::1", 9092)
    for bad in ("127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":9092", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_address(bad, "--listen")
    with pytest.raises(FileNotFoundError, match="--ca"):
        create_app("127.0.0.1:9091", tmp_path / "missing.crt")


def test_interruptible_turns_a_failed_run_into_exit_1_with_its_reason(capsys):
    from fedldt.launch.simulation import RunFailed, interruptible

    with pytest.raises(SystemExit) as exit_info:
        with interruptible():
            raise RunFailed("the run ended as finished:failed; see logs/server.log")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "fedldt: run failed: the run ended as finished:failed; see logs/server.log\n"
