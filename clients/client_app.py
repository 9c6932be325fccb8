"""fedldt ClientApp: one territory. Unpacks Flower messages, calls :mod:`fedldt.federation.client`,
packs the reply. The territory comes from the node config (``territory`` in deployment,
``partition-id`` in simulation); the run config arrives as JSON in the message."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedldt.federation import client as territory

app = ClientApp()
CONFIG_KEY = "fedldt-config"


def _cfg(msg: Message) -> dict:
    return json.loads(str(msg.content["config"][CONFIG_KEY]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = territory.describe(_cfg(msg), territory.territory_index(context.node_config))
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _cfg(msg)
    conf = msg.content["config"]
    state, metrics = territory.train(
        cfg, territory.territory_index(context.node_config), msg.content["arrays"].to_torch_state_dict(),
        server_round=int(conf["server-round"]), proximal_mu=float(conf.get("proximal-mu", 0.0)),
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    metrics = territory.evaluate(
        _cfg(msg), territory.territory_index(context.node_config), msg.content["arrays"].to_torch_state_dict(),
        split=str(conf["split"]),
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
