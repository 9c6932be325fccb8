"""The ClientApp called directly with Flower messages (no runtime): what a territory sends."""

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from clients import territory
from clients.client_app import app
from fedldt.metrics import SUM_KEYS
from fedldt.models import build_model
from fedldt.results import REFERENCES


def _msg(content, mtype):
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=3600.0, message_type=mtype)
    return Message(content, metadata=md)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import small_config, write_los_loop_like

    folder = write_los_loop_like(tmp_path_factory.mktemp("syn") / "syn", num_nodes=10, num_steps=300)
    cfg = small_config(folder)
    out = tmp_path_factory.mktemp("territory-1")  # its egress log, away from the checkout's outputs/
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2, "out-dir": str(out)},
                  state=RecordDict(), run_config={})
    info = territory.describe(cfg, 1)
    model = build_model({**cfg["model"], "in_channels": info["in-channels"], "out_channels": info["out-channels"],
                         "horizon": info["horizon"]})
    return cfg, ctx, model, info


def _config(cfg, **extra):
    return ConfigRecord({"fedldt-config": json.dumps(cfg), **extra})


def test_query_reports_sizes_only(setup):
    cfg, ctx, _, info = setup
    reply = app(_msg(RecordDict({"config": _config(cfg)}), MessageType.QUERY), ctx)
    assert not reply.has_error()
    got = dict(reply.content["info"])
    assert got["territory"] == 1 and got["num-nodes"] == info["num-nodes"] == 5
    assert got["num-train"] == 300 * 0.7 - 24 + 1
    assert all(isinstance(v, (int, str)) for v in got.values())


def test_train_reply_holds_only_model_parameters_and_allowed_scalars(setup):
    cfg, ctx, model, info = setup
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": _config(cfg, **{"server-round": 1})})
    reply = app(_msg(content, MessageType.TRAIN), ctx)
    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"]
    expected = model.state_dict()
    assert list(arrays.keys()) == list(expected.keys())
    for k, arr in arrays.items():
        assert tuple(arr.shape) == tuple(expected[k].shape) and arr.dtype == "float32"
    sent = arrays.to_torch_state_dict()
    assert any(not torch.equal(sent[k], expected[k]) for k in expected)  # it did train
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {"num-examples", "train_loss", "territory"}
    assert metrics["num-examples"] == info["num-train"] and np.isfinite(metrics["train_loss"])


def test_evaluate_reply_holds_error_sums_only(setup):
    cfg, ctx, model, info = setup
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": _config(cfg, split="test", **{"server-round": 1})})
    reply = app(_msg(content, MessageType.EVALUATE), ctx)
    assert not reply.has_error(), reply.error
    metrics = dict(reply.content["metrics"])
    allowed = {"num-examples", "territory"} | {f"{p}.{k}" for p in ("model", *REFERENCES) for k in SUM_KEYS}
    assert {"seasonal_naive_day.num_valid", "seasonal_naive_week.abs_err_sum"} <= allowed
    assert set(metrics) == allowed
    for k in allowed - {"num-examples", "territory"}:
        assert len(metrics[k]) == cfg["task"]["horizon"]  # one sum per horizon step, never per node
    assert metrics["model.num_valid"][0] == info["num-test"] * info["num-nodes"]


def test_missing_territory_in_node_config_is_named():
    with pytest.raises(KeyError, match="--node-config 'territory=<index>'"):
        territory.territory_index({})


# -- egress enforcement: what the territory refuses to send ----------------------------------
from flwr.app import Array, Error, MetricRecord  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from clients.audit import EGRESS_LOG, ERRORS_LOG, egress_audit_mod  # noqa: E402
from fedldt.egress import EVALUATE_METRICS, QUERY_INFO, TRAIN_METRICS, Code  # noqa: E402

HORIZON = 3
GLOBAL = {"w": np.arange(6, dtype=np.float32).reshape(3, 2), "b": np.zeros(2, dtype=np.float32)}


def _ok_train_reply(msg):
    arrays = ArrayRecord({k: Array(v + 1) for k, v in GLOBAL.items()})
    return RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10, "train_loss": 0.5, "territory": 0})})


def _ok_eval_metrics():
    return {k: ([0 if s.kind is int else 0.0] * HORIZON if s.per_step else 0) for k, s in EVALUATE_METRICS.items()}


def _ok_info():
    return {k: ("t0" if s.kind is str else 1) for k, s in QUERY_INFO.items()}


def _app_replying(make_content):
    """A ClientApp with the installed egress mod whose handlers reply ``make_content(msg)`` (a
    RecordDict) or raise what it raises: stands for a ClientApp that tries to send more."""
    test_app = ClientApp(mods=[egress_audit_mod])

    def handler(msg, context):
        return Message(make_content(msg), reply_to=msg)

    test_app.train()(handler)
    test_app.evaluate()(handler)
    test_app.query()(handler)
    return test_app


def _request(mtype, arrays=None):
    content = RecordDict({"config": _config({"task": {"horizon": HORIZON}}, **{"server-round": 4, "split": "val"})})
    if mtype == MessageType.TRAIN:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in (arrays or GLOBAL).items()})
    return _msg(content, mtype)


def _run(tmp_path, make_content, mtype=MessageType.TRAIN, arrays=None):
    ctx = Context(run_id=1, node_id=1, node_config={"territory": 0, "out-dir": str(tmp_path)}, state=RecordDict(),
                  run_config={})
    reply = _app_replying(make_content)(_request(mtype, arrays), ctx)
    entries = [json.loads(x) for x in (tmp_path / EGRESS_LOG).read_text().splitlines()]
    return reply, entries[-1]


def _with(content, **changes):
    for name, rec in changes.items():
        content[name] = rec
    return content


def _train_arrays(**arrays):
    def make(msg):
        content = _ok_train_reply(msg)
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        return content
    return make


def _train_metrics(**metrics):
    def make(msg):
        content = _ok_train_reply(msg)
        content["metrics"] = MetricRecord({"num-examples": 10, "train_loss": 0.5, "territory": 0, **metrics})
        return content
    return make


def _trailing_bytes(msg):
    content = _ok_train_reply(msg)
    arr = content["arrays"]["w"]
    content["arrays"]["w"] = Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=arr.data + b"12.3")
    return content


_W, _B = GLOBAL["w"], GLOBAL["b"]
REFUSED = {
    "extra array key": (MessageType.TRAIN, _train_arrays(w=_W, b=_B, node_emb=np.zeros((5, 4), np.float32)), Code.ARRAY_KEYS),
    "missing array key": (MessageType.TRAIN, _train_arrays(w=_W), Code.ARRAY_KEYS),
    "float64 array": (MessageType.TRAIN, _train_arrays(w=_W.astype(np.float64), b=_B), Code.ARRAY_DTYPE),
    "wrong shape": (MessageType.TRAIN, _train_arrays(w=_W.reshape(2, 3), b=_B), Code.ARRAY_SHAPE),
    "NaN in an array": (MessageType.TRAIN, _train_arrays(w=np.full((3, 2), np.nan, np.float32), b=_B), Code.ARRAY_VALUE),
    "bytes after an array's values": (MessageType.TRAIN, _trailing_bytes, Code.ARRAY_VALUE),
    "extra metric key": (MessageType.TRAIN, _train_metrics(raw_values=[12.3, 40.1]), Code.METRIC_KEY),
    "NaN metric": (MessageType.TRAIN, _train_metrics(train_loss=float("nan")), Code.METRIC_VALUE),
    "negative count": (MessageType.TRAIN, _train_metrics(**{"num-examples": -1}), Code.METRIC_VALUE),
    "extra config record": (MessageType.TRAIN, lambda m: _with(_ok_train_reply(m), extra=ConfigRecord({"cell": "12.3"})),
                            Code.RECORDS),
    "second array record": (MessageType.TRAIN, lambda m: _with(_ok_train_reply(m), more=ArrayRecord({"x": Array(_B)})),
                            Code.RECORDS),
    "train reply without metrics": (MessageType.TRAIN, lambda m: RecordDict({"arrays": _ok_train_reply(m)["arrays"]}),
                                    Code.RECORDS),
    "evaluate list of the wrong length": (
        MessageType.EVALUATE, lambda m: RecordDict({"metrics": MetricRecord({**_ok_eval_metrics(),
                                                                            "model.abs_err_sum": [1.0] * (HORIZON + 1)})}),
        Code.METRIC_LENGTH),
    "evaluate per-node values": (
        MessageType.EVALUATE, lambda m: RecordDict({"metrics": MetricRecord({**_ok_eval_metrics(),
                                                                            "model.node_values": [1.0] * HORIZON})}),
        Code.METRIC_KEY),
    "evaluate metrics as a config record": (MessageType.EVALUATE, lambda m: RecordDict({"metrics": ConfigRecord(_ok_info())}),
                                            Code.RECORDS),
    "query info extra key": (MessageType.QUERY, lambda m: RecordDict({"info": ConfigRecord({**_ok_info(), "lat": "34.1"})}),
                             Code.METRIC_KEY),
    "query id with free text": (MessageType.QUERY,
                                lambda m: RecordDict({"info": ConfigRecord({**_ok_info(), "territory-id": "t0 cell 12.3"})}),
                                Code.METRIC_VALUE),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_egress_refuses_a_reply_beyond_the_allow_list(case, tmp_path):
    mtype, make, code = REFUSED[case]
    reply, entry = _run(tmp_path, make, mtype)
    assert reply.has_error() and reply.error.code == int(code) == entry["refused"]["code"]
    assert reply.error.reason == f"EgressRefused [fedldt-{int(code)}]" == entry["error"]
    assert entry["records"] == []  # nothing left
    assert entry["refused"]["records"]  # what the handler tried to send, by name and shape
    assert "12.3" not in reply.error.reason
    assert f"[fedldt-{int(code)}]" in (tmp_path / ERRORS_LOG).read_text()


@pytest.mark.parametrize("mtype,make", [
    (MessageType.TRAIN, _ok_train_reply),
    (MessageType.EVALUATE, lambda m: RecordDict({"metrics": MetricRecord(_ok_eval_metrics())})),
    (MessageType.QUERY, lambda m: RecordDict({"info": ConfigRecord(_ok_info())})),
])
def test_egress_lets_an_allowed_reply_go(mtype, make, tmp_path):
    reply, entry = _run(tmp_path, make, mtype)
    assert not reply.has_error(), reply.error
    assert entry["error"] is None and entry["refused"] is None and entry["server_round"] == 4
    names = {r["name"] for r in entry["records"]}
    assert names == {"train": {"arrays", "metrics"}, "evaluate": {"metrics"}, "query": {"info"}}[mtype]
    assert not (tmp_path / ERRORS_LOG).exists()


def test_egress_refuses_float64_even_when_the_server_sent_float64(tmp_path):
    as64 = {k: v.astype(np.float64) for k, v in GLOBAL.items()}
    reply, entry = _run(tmp_path, _train_arrays(**as64), arrays=as64)
    assert reply.error.reason == f"EgressRefused [fedldt-{int(Code.ARRAY_DTYPE)}]" and entry["refused"]["code"] == 113


def test_handler_exception_text_stays_in_the_territory_log(tmp_path):
    def raise_with_data(msg):
        raise ValueError("cell 12.3 at 2012-03-01")

    reply, entry = _run(tmp_path, raise_with_data)
    assert reply.has_error() and reply.error.code == int(Code.HANDLER_RAISED) == 100
    assert reply.error.reason == "ValueError [fedldt-100]"
    assert "12.3" not in reply.error.reason and "2012" not in reply.error.reason
    assert entry["error"] == "ValueError [fedldt-100]" and entry["refused"] is None and entry["records"] == []
    log = (tmp_path / ERRORS_LOG).read_text()
    assert "ValueError: cell 12.3 at 2012-03-01" in log and "Traceback" in log and "train round 4" in log


def test_handler_error_reply_text_is_not_passed_on(tmp_path):
    test_app = ClientApp(mods=[egress_audit_mod])

    @test_app.train()
    def train_(msg, context):
        return Message(error=Error(code=2, reason="ValueError: cell 12.3"), reply_to=msg)

    ctx = Context(run_id=1, node_id=1, node_config={"territory": 0, "out-dir": str(tmp_path)}, state=RecordDict(),
                  run_config={})
    reply = test_app(_request(MessageType.TRAIN), ctx)
    assert reply.error.reason == "EgressRefused [fedldt-101]" and reply.error.code == 101
    assert "cell 12.3" in (tmp_path / ERRORS_LOG).read_text()


def test_a_reply_that_cannot_be_logged_is_not_sent(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    ctx = Context(run_id=1, node_id=1, node_config={"territory": 0, "out-dir": str(blocker / "out")}, state=RecordDict(),
                  run_config={})
    reply = _app_replying(_ok_train_reply)(_request(MessageType.TRAIN), ctx)
    assert reply.has_error() and reply.error.code == int(Code.AUDIT_FAILED)
    assert reply.error.reason in ("NotADirectoryError [fedldt-102]", "FileExistsError [fedldt-102]")
    assert str(tmp_path) not in reply.error.reason


@pytest.mark.parametrize("mtype", [MessageType.QUERY, MessageType.TRAIN, MessageType.EVALUATE])
def test_production_clientapp_sends_type_and_code_only(setup, mtype, tmp_path):
    """The shipped ClientApp's every handler goes through the egress mod: a territory whose
    data folder is missing answers with the exception type, not with its path."""
    cfg, _, model, _ = setup
    secret = tmp_path / "cell-12.3-2012-03-01"
    ctx = Context(run_id=1, node_id=1, node_config={"territory": 1, "data-path": str(secret), "out-dir": str(tmp_path)},
                  state=RecordDict(), run_config={})
    content = RecordDict({"config": _config(cfg, split="val", **{"server-round": 2})})
    if mtype != MessageType.QUERY:
        content["arrays"] = ArrayRecord(model.state_dict())
    reply = app(_msg(content, mtype), ctx)
    assert reply.error.reason == "FileNotFoundError [fedldt-100]"
    assert str(secret) in (tmp_path / ERRORS_LOG).read_text()


def test_train_metric_allow_list_is_what_the_territory_computes():
    assert set(TRAIN_METRICS) == set(territory.SCALAR_METRICS)
    assert {k.split(".", 1)[1] for k, s in EVALUATE_METRICS.items() if s.per_step} == set(SUM_KEYS)
    assert all(s.why for s in (*TRAIN_METRICS.values(), *EVALUATE_METRICS.values(), *QUERY_INFO.values()))


# -- the app a territory receives does not carry the fedldt library --------------------------
def test_fab_ships_no_fedldt_and_its_clientapp_imports_the_installed_library(tmp_path):
    import io
    import subprocess
    import sys
    import zipfile

    import fedldt
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.install import install_from_fab

    from fedldt.config import checkout_root

    fab = build_fab_from_disk(checkout_root())
    names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
    assert not [n for n in names if n.startswith("fedldt/")]
    assert {"clients/client_app.py", "server/server_app.py", "pyproject.toml"} <= set(names)
    assert not [n for n in names if n.startswith(("tests/", "conf/", "docs/", "scripts/"))]
    # Flower's loader puts the unpacked FAB first on sys.path (supercore/object_ref.py): the
    # ClientApp then comes from the FAB, the fedldt it imports from this installation.
    project = install_from_fab(fab, install_dir=tmp_path / "app", skip_prompt=True)
    code = ("import json, sys; from flwr.supercore.object_ref import load_app; "
            "load_app('clients.client_app:app', ValueError, sys.argv[1]); "
            "import clients.client_app as c, fedldt, fedldt.egress as e; "
            "print(json.dumps([c.__file__, fedldt.__file__, e.__file__]))")
    out = subprocess.run([sys.executable, "-c", code, str(project)], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    client_file, fedldt_file, egress_file = json.loads(out.stdout.strip().splitlines()[-1])
    assert client_file.startswith(str(project))
    assert fedldt_file == fedldt.__file__ and not fedldt_file.startswith(str(project))
    assert not egress_file.startswith(str(project))


def test_docs_list_every_value_that_leaves_and_every_code():
    from fedldt.config import checkout_root

    doc = (checkout_root() / "docs" / "egress.md").read_text()
    for key in (*QUERY_INFO, *TRAIN_METRICS, *(f"<f>.{k}" for k in SUM_KEYS)):
        assert f"`{key}`" in doc, key
    for code in Code:
        assert f"| {int(code)} | `{code.name}` |" in doc, code
