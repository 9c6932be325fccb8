"""A territory never trains on unusable data (issue 12 item 4, the ClientApp part): the checks of
``fedldt validate`` run when its data loads, and its error reply names the problem codes only."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from clients.client_app import app
from fedldt.data import load_los_loop
from fedldt.data.checks import PROBLEM_CODES, UnusableData, require_usable
from fedldt.data.package_writer import partition_pilot
from fedldt.data.packages import load_packages
from fedldt.egress import Code, error_code, error_reason
from tests.conftest import small_config, write_los_loop_like


def test_unusable_data_reason_holds_known_codes_only():
    e = UnusableData("sensor 0717804 at 12.3 mph", ["too_little_history", "no_valid_data", "no_valid_data",
                                                     "speed_61mph_at_0717804"])
    assert e.codes == ("no_valid_data", "other", "too_little_history")
    assert error_code(e) == Code.UNUSABLE_DATA == 104
    assert error_reason(e) == "UnusableData [fedldt-104] no_valid_data,other,too_little_history"
    assert set(e.codes) - {"other"} <= set(PROBLEM_CODES)
    assert error_reason(ValueError("x")) == "ValueError [fedldt-100]"  # other errors unchanged


def test_require_usable_known_answers(tmp_path):
    ds = load_los_loop(write_los_loop_like(tmp_path / "syn", num_nodes=4, num_steps=100))
    require_usable(ds, window=6, horizon=6, split=(0.6, 0.2, 0.2))  # 60/20/20 steps: each part holds 12
    with pytest.raises(UnusableData) as e:
        require_usable(ds, window=12, horizon=12)  # the 10 % validation part: 10 steps < 24
    assert e.value.codes == ("too_little_history",)
    ds.mask[:] = 0
    with pytest.raises(UnusableData) as e:
        require_usable(ds, window=2, horizon=2)
    assert e.value.codes == ("no_valid_data",)


def _query(cfg: dict, node_config: dict) -> Message:
    md = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="",
                  created_at=time.time(), ttl=3600.0, message_type=MessageType.QUERY)
    msg = Message(RecordDict({"config": ConfigRecord({"fedldt-config": json.dumps(cfg)})}), metadata=md)
    return app(msg, Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}))


def test_clientapp_refuses_unusable_data_and_sends_codes_only(tmp_path):
    """The server checked the config on good data; territory 1's own copy holds no valid speed."""
    good = write_los_loop_like(tmp_path / "syn", num_nodes=10, num_steps=300)
    cfg = small_config(good)
    dead = tmp_path / "dead-0717804"
    shutil.copytree(good, dead)
    speed = pd.read_csv(dead / "los_speed.csv")
    speed.iloc[:, :] = np.nan
    speed.to_csv(dead / "los_speed.csv", index=False)
    out = tmp_path / "out"
    reply = _query(cfg, {"territory": 1, "data-path": str(dead), "out-dir": str(out)})
    assert reply.has_error() and reply.error.code == 104
    assert reply.error.reason == "UnusableData [fedldt-104] no_valid_data"
    log = (out / "errors.log").read_text()
    assert "territory t1: data not usable for training: no_valid_data" in log
    ok = _query(cfg, {"territory": 1, "out-dir": str(tmp_path / "out-ok")})  # its good data: sizes, no error
    assert not ok.has_error()


def test_packages_refuse_an_unusable_package(tmp_path):
    data = write_los_loop_like(tmp_path / "net", num_nodes=8)
    out = tmp_path / "packages"
    partition_pilot("los_loop_3", out, overrides=[f"dataset.path={data}", "partition.num_territories=2"])
    obs = out / "t1" / "observations.parquet"
    frame = pd.read_parquet(obs)
    frame["speed"] = np.float32("nan")
    frame.to_parquet(obs, index=False)
    with pytest.raises(UnusableData, match=r"t1: not usable \(no_valid_data\)") as e:
        load_packages(str(out))
    assert e.value.codes == ("no_valid_data",)


def test_codes_of_the_newer_checks_travel_as_themselves_and_others_as_other():
    from fedldt.data.checks import UnusableData

    assert UnusableData("m", ["low_coverage", "weights_above_one"]).codes == ("low_coverage", "weights_above_one")
    assert UnusableData("m", ["sensor 0717804 is dead"]).codes == ("other",)
