"""Egress audit: a client-side Flower mod that logs what every reply of a territory carries.

Attached to the ClientApp (``clients/client_app.py``), :func:`egress_audit_mod` wraps every
handler (query, train, evaluate). For each reply it appends one JSON line to the territory's
own log, ``<out-dir>/egress.jsonl`` (node config ``out-dir``; without it
``<checkout>/outputs/territories/territory-<index>/egress.jsonl``). A line holds names and
shapes only, never values::

    {"time": 1764430000.1, "run_id": 123, "node_id": 456, "territory": 0,
     "message_type": "train", "server_round": 1,
     "records": [{"name": "arrays", "kind": "array",
                  "arrays": {"encoder.0.weight": {"shape": [64, 66], "dtype": "float32"}, ...}},
                 {"name": "metrics", "kind": "metric",
                  "metrics": {"num-examples": "scalar", "model.abs_err_sum": [12], ...}}],
     "error": null}

``records[].kind`` is ``array``, ``metric`` or ``config``; a metric is ``"scalar"`` or the
length of its list; a config entry is the Python type name of its value. ``error`` is set when
the handler raised (the reply is then an error message carrying no records).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from fedldt.config import checkout_root

EGRESS_LOG = "egress.jsonl"


def territory_out_dir(node_config: Mapping[str, Any]) -> Path:
    """A territory's own output folder: node config ``out-dir`` (absolute), else
    ``<checkout>/outputs/territories/territory-<index>`` (index from ``territory`` or
    ``partition-id``, ``unknown`` if neither is set).

    Raises:
        ValueError: ``out-dir`` is not an absolute path.
    """
    if "out-dir" in node_config:
        path = Path(str(node_config["out-dir"])).expanduser()
        if not path.is_absolute():
            raise ValueError(f"node config out-dir={node_config['out-dir']!r} must be an absolute path")
        return path
    index = node_config.get("territory", node_config.get("partition-id", "unknown"))
    return checkout_root() / "outputs" / "territories" / f"territory-{index}"


def egress_log_path(node_config: Mapping[str, Any]) -> Path:
    """Where :func:`egress_audit_mod` appends its JSON lines."""
    return territory_out_dir(node_config) / EGRESS_LOG


def describe_content(msg: Message) -> list[dict[str, Any]]:
    """Names, kinds, shapes and dtypes of every record in ``msg`` (no values)."""
    out: list[dict[str, Any]] = []
    content = msg.content
    for name, rec in content.array_records.items():
        out.append({"name": name, "kind": "array",
                    "arrays": {k: {"shape": [int(d) for d in a.shape], "dtype": str(a.dtype)} for k, a in rec.items()}})
    for name, rec in content.metric_records.items():
        out.append({"name": name, "kind": "metric",
                    "metrics": {k: (len(v) if isinstance(v, list) else "scalar") for k, v in rec.items()}})
    for name, rec in content.config_records.items():
        out.append({"name": name, "kind": "config",
                    "config": {k: (f"list[{len(v)}]" if isinstance(v, list) else type(v).__name__) for k, v in rec.items()}})
    return out


def _server_round(msg: Message) -> int | None:
    try:
        conf = msg.content.config_records.get("config")
        return int(conf["server-round"]) if conf is not None and "server-round" in conf else None
    except (KeyError, TypeError, ValueError):
        return None


def egress_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler, then log the reply's records (see the module docstring).

    An exception from the handler is logged (``error``) and re-raised, so Flower still turns it
    into an error reply. A failure to write the log fails the reply too: a territory must not
    send what it cannot account for.
    """
    error: str | None = None
    reply: Message | None = None
    try:
        reply = call_next(msg, context)
    except Exception as e:  # logged, then re-raised unchanged
        error = f"{type(e).__name__}: {e}"
        raise
    finally:
        entry = {
            "time": round(time.time(), 3),
            "run_id": int(msg.metadata.run_id),
            "node_id": int(context.node_id),
            "territory": context.node_config.get("territory", context.node_config.get("partition-id")),
            "message_type": str(msg.metadata.message_type),
            "server_round": _server_round(msg),
            "records": describe_content(reply) if reply is not None and not reply.has_error() else [],
            "error": error if error is not None else (str(reply.error.reason) if reply is not None and reply.has_error() else None),
        }
        path = egress_log_path(context.node_config)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:  # one short line per reply; appends from concurrent processes stay whole
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
    return reply
