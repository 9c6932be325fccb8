"""fedldt ClientApp: one territory. Unpacks Flower messages, calls :mod:`clients.territory`,
packs the reply. The same app serves simulation and deployment; everything territory-specific
comes from the SuperNode's node config (see ``docs/deploy.md``):

* ``territory`` (deployment) or ``partition-id`` (simulation): the territory index;
* ``data-path`` / ``data-root``: the territory's own data: its territory data package (which then
  replaces the server's dataset), or its dataset folder (replaces the server's path);
* ``out-dir``: the territory's output folder (its egress log, ``egress.jsonl``).

The run config arrives as JSON in every message. Every reply passes the egress mod of the
territory's installed fedldt (:func:`clients.audit.egress_audit_mod`): it is checked
against the allow-lists of :mod:`fedldt.egress` (refused if it carries anything else),
logged, and an exception becomes an error reply with its type and a code only (the text stays in
the territory's ``errors.log``). See ``docs/egress.md``.
The territory's local entries (node embeddings, integer buffers, personalized layers) stay in
``context.state`` between rounds and are never put in a reply. When the server names its run
(config ``run-key``, :data:`server.rounds.RUN_KEY`), they are also checkpointed after every
training round in the territory's own folder (``<out-dir>/checkpoints/<run key>/``,
:func:`fedldt.checkpoint.save_local_state`), so that a resumed run (a new Flower run, a fresh
``context``) reloads them from there (:func:`clients.territory.local_state`).

:func:`build_app` builds this ClientApp with extra mods inside the egress mod (their replies and
exceptions pass the egress check too); tests use it to ship an app that injects failures
(``tests/mods.py``, ``tests/apps.py``). The production ``app`` has the egress mod only.
"""

from __future__ import annotations

import json
from typing import Callable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import territory
from clients.audit import egress_audit_mod, territory_out_dir
from fedldt.checkpoint import load_personal_model, save_local_state, save_personal_model
from fedldt.egress import CONFIG_KEY, FINETUNE_MESSAGE
from fedldt.personal import HISTORY, PERSONAL_PREFIX, USE_MODEL

LOCAL_KEY = "fedldt-local"  # context.state array record of this territory's local entries
LOCAL_TAG = "fedldt-local-tag"  # context.state config record: the run key and round of those entries


def _local(msg: Message, context: Context, local_round: int):
    """This territory's local entries after its training of ``local_round`` (``None``: none yet)."""
    rec, tag = context.state.array_records.get(LOCAL_KEY), context.state.config_records.get(LOCAL_TAG)
    kept = None if rec is None else rec.to_torch_state_dict()
    run_key = msg.content["config"].get("run-key")
    if run_key is None:  # a server that does not checkpoint: the entries of this Flower run
        return kept
    kept_as = None if tag is None else (str(tag["run-key"]), int(tag["round"]))
    return territory.local_state(territory_out_dir(context.node_config), str(run_key), local_round, kept, kept_as)


def _cfg(msg: Message, context: Context) -> dict:
    return territory.territory_config(json.loads(str(msg.content["config"][CONFIG_KEY])), context.node_config)


def query(msg: Message, context: Context) -> Message:
    info = territory.describe(_cfg(msg, context), territory.territory_index(context.node_config))
    return Message(RecordDict({"info": ConfigRecord(info)}), reply_to=msg)


def train(msg: Message, context: Context) -> Message:
    cfg = _cfg(msg, context)
    conf = msg.content["config"]
    server_round = int(conf["server-round"])
    index = territory.territory_index(context.node_config)
    shared, local, metrics = territory.train(
        cfg, index, msg.content["arrays"].to_torch_state_dict(),
        server_round=server_round, proximal_mu=float(conf.get("proximal-mu", 0.0)),
        local_state=_local(msg, context, server_round - 1),
    )
    context.state.array_records[LOCAL_KEY] = ArrayRecord(local)
    if "run-key" in conf:
        folder = territory_out_dir(context.node_config)
        save_local_state(folder, str(conf["run-key"]), server_round, local)
        context.state.config_records[LOCAL_TAG] = ConfigRecord({"run-key": str(conf["run-key"]), "round": server_round})
        personal = {k[len(PERSONAL_PREFIX):]: v for k, v in local.items() if k.startswith(PERSONAL_PREFIX)}
        if personal:  # Ditto's personal model of this round, where `fedldt export --territory-dir` finds it
            save_personal_model(folder, str(conf["run-key"]), personal,
                                {"personalization": "ditto", "round": server_round, "kept": "personal",
                                 "territory_id": territory.get_task(cfg, index).dataset.name})
    return Message(RecordDict({"arrays": ArrayRecord(shared), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _run_key(msg: Message, what: str) -> str:
    conf = msg.content["config"]
    if "run-key" not in conf:
        raise ValueError(f"a {what} message needs the server's run key (config 'run-key') to name this territory's folder")
    return str(conf["run-key"])


def evaluate(msg: Message, context: Context) -> Message:
    conf = msg.content["config"]
    use = str(conf.get(USE_MODEL, "auto"))
    kept = None
    if use == "kept":  # the fine-tuned-or-global model this territory kept (train.finetune)
        _, kept = load_personal_model(territory_out_dir(context.node_config), _run_key(msg, "kept-model evaluate"))
    metrics = territory.evaluate(
        _cfg(msg, context), territory.territory_index(context.node_config), msg.content["arrays"].to_torch_state_dict(),
        split=str(conf["split"]), local_state=_local(msg, context, int(conf.get("local-round", conf["server-round"]))),
        use="personal" if use == "kept" else use, personal_state=kept,
        history=str(conf[HISTORY]) if HISTORY in conf else None,
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def finetune(msg: Message, context: Context) -> Message:
    """``train.finetune``: fine-tune the final global model, keep the better of it and the
    fine-tuned one in this territory's folder (``<out-dir>/checkpoints/<run key>/personal.pt``),
    reply with metrics only (no arrays: :data:`fedldt.egress.FINETUNE_METRICS`)."""
    conf = msg.content["config"]
    run_key = _run_key(msg, "finetune")
    history = str(conf[HISTORY]) if HISTORY in conf else None
    index = territory.territory_index(context.node_config)
    cfg = _cfg(msg, context)
    state, metrics = territory.finetune(
        cfg, index, msg.content["arrays"].to_torch_state_dict(),
        local_state=_local(msg, context, int(conf.get("local-round", 0))), history=history,
    )
    save_personal_model(territory_out_dir(context.node_config), run_key, state,
                        {"personalization": "finetune", "kept": ("global", "finetuned")[int(metrics["kept"])],
                         "history": history, "territory": index,
                         "territory_id": territory.get_task(cfg, index).dataset.name})
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def build_app(extra_mods: Sequence[Callable[..., Message]] = ()) -> ClientApp:
    """The territory's ClientApp: the query/train/evaluate handlers behind the egress mod, then
    ``extra_mods`` (Flower mods ``mod(msg, context, call_next) -> Message``, applied in order
    inside the egress mod, so whatever they return or raise is checked and coded like a handler's).
    """
    client_app = ClientApp(mods=[egress_audit_mod, *extra_mods])
    client_app.query()(query)
    client_app.train()(train)
    client_app.train(FINETUNE_MESSAGE.split(".", 1)[1])(finetune)
    client_app.evaluate()(evaluate)
    return client_app


app = build_app()
