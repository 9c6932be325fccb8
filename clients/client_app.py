"""fedldt ClientApp: one territory. Unpacks Flower messages, calls :mod:`fedldt.federation.client`,
packs the reply. The same app serves simulation and deployment; everything territory-specific
comes from the SuperNode's node config (see ``docs/deploy.md``):

* ``territory`` (deployment) or ``partition-id`` (simulation): the territory index;
* ``data-root`` / ``data-path``: the territory's own data location (replaces the server's path);
* ``out-dir``: the territory's output folder (its egress log, ``egress.jsonl``);
* ``fail-in-round``: TEST ONLY, makes training raise in that round.

The run config arrives as JSON in every message. Every reply is logged by the egress audit mod.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedldt.federation import client as territory
from fedldt.federation.audit import egress_audit_mod

app = ClientApp(mods=[egress_audit_mod])
CONFIG_KEY = "fedldt-config"


def _cfg(msg: Message, context: Context) -> dict:
    return territory.territory_config(json.loads(str(msg.content["config"][CONFIG_KEY])), context.node_config)


@app.query()
def query(msg: Message, context: Context) -> Message:
    info = territory.describe(_cfg(msg, context), territory.territory_index(context.node_config))
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = _cfg(msg, context)
    conf = msg.content["config"]
    territory.check_injected_failure(context.node_config, int(conf["server-round"]))
    state, metrics = territory.train(
        cfg, territory.territory_index(context.node_config), msg.content["arrays"].to_torch_state_dict(),
        server_round=int(conf["server-round"]), proximal_mu=float(conf.get("proximal-mu", 0.0)),
    )
    return Message(RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    metrics = territory.evaluate(
        _cfg(msg, context), territory.territory_index(context.node_config), msg.content["arrays"].to_torch_state_dict(),
        split=str(conf["split"]),
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
