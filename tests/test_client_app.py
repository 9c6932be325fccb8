"""The ClientApp called directly with Flower messages (no runtime): what a territory sends."""

import json
import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from clients.client_app import app
from fedldt.config import compose_config, resolve_config
from fedldt.federation import client as territory
from fedldt.metrics import SUM_KEYS
from fedldt.models import build_model


def _msg(content, mtype):
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=3600.0, message_type=mtype)
    return Message(content, metadata=md)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import write_los_loop_like

    folder = write_los_loop_like(tmp_path_factory.mktemp("syn") / "syn", num_nodes=10, num_steps=300)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", "partition.num_territories=2",
                                         "model.hidden=8"]))
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
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
    allowed = {"num-examples", "territory"} | {f"{p}.{k}" for p in ("model", "persistence", "historical_average") for k in SUM_KEYS}
    assert set(metrics) == allowed
    for k in allowed - {"num-examples", "territory"}:
        assert len(metrics[k]) == cfg["task"]["horizon"]  # one sum per horizon step, never per node
    assert metrics["model.num_valid"][0] == info["num-test"] * info["num-nodes"]


def test_missing_territory_in_node_config_is_named():
    with pytest.raises(KeyError, match="--node-config 'territory=<index>'"):
        territory.territory_index({})
