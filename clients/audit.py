"""Egress audit and enforcement: the client-side Flower mod every territory reply passes through.

Attached to the ClientApp (``clients/client_app.py``), :func:`egress_audit_mod` wraps every
handler (query, train, evaluate). The mod only converts Flower messages to plain data
(:func:`plain_request`, :func:`plain_reply`); the allow-lists and their check come from the
territory's installed fedldt (:mod:`fedldt.egress`: the coordinator's app does not ship
``fedldt/``, see ``docs/egress.md``). For each request it

1. runs the handler, catching every exception;
2. checks the reply against the allow-lists (:func:`fedldt.egress.check_reply`): a
   reply that carries anything else is refused, not sent;
3. appends one JSON line to the territory's own log, ``<out-dir>/egress.jsonl`` (node config
   ``out-dir``; without it ``<checkout>/outputs/territories/territory-<index>/egress.jsonl``),
   and only then lets the reply go. A failure to write the log sends an error instead: a
   territory must not send what it cannot account for.

When the handler raised or the reply was refused, the reply becomes an error reply that says
only the exception type and a code (``"ValueError [fedldt-100]"``, see
:class:`fedldt.egress.Code`); the exception text and traceback go to
``<out-dir>/errors.log`` and the SuperNode log gets a line naming that file.

A line of ``egress.jsonl`` holds names and shapes only, never values::

    {"time": 1764430000.1, "run_id": 123, "node_id": 456, "territory": 0,
     "message_type": "train", "server_round": 1,
     "records": [{"name": "arrays", "kind": "array",
                  "arrays": {"encoder.0.weight": {"shape": [64, 66], "dtype": "float32"}, ...}},
                 {"name": "metrics", "kind": "metric",
                  "metrics": {"num-examples": "scalar", "model.abs_err_sum": [12], ...}}],
     "error": null, "refused": null}

``records[].kind`` is ``array``, ``metric`` or ``config``; a metric is ``"scalar"`` or the
length of its list; a config entry is the Python type name of its value. ``records`` is what
left (``[]`` for an error reply). ``error`` is the error reply's reason as sent (type and code).
``refused`` is set when the check refused the reply: ``{"code", "detail", "records"}`` with
what the handler tried to send (names and shapes).
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from fedldt.config import checkout_root
from fedldt.egress import (CONFIG_KEY, ArrayBytes, Code, EgressRefused, Reply, Request, check_reply, error_code,
                           error_reason, message_category)

EGRESS_LOG = "egress.jsonl"
ERRORS_LOG = "errors.log"
_log = logging.getLogger("flwr")  # Flower's logger: the SuperNode's (ClientApp process's) log


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


def plain_request(msg: Message) -> Request:
    """The server's message as :class:`fedldt.egress.Request`: its category, the ``arrays``
    record's keys, shapes and dtypes, and the run config JSON."""
    content = msg.content
    rec = content.array_records.get("arrays")
    arrays = None if rec is None else {k: (tuple(int(d) for d in a.shape), str(a.dtype)) for k, a in rec.items()}
    conf = content.config_records.get("config")
    run_config = str(conf[CONFIG_KEY]) if conf is not None and CONFIG_KEY in conf else None
    return Request(message_category(str(msg.metadata.message_type)), arrays, run_config)


def plain_reply(msg: Message) -> Reply:
    """A handler's reply as :class:`fedldt.egress.Reply`: every record's kind, the arrays as
    sent (:class:`fedldt.egress.ArrayBytes`) and the metric/config values."""
    content = msg.content
    records: dict[str, str] = {}
    for name, rec in content.items():
        records[name] = ("array" if name in content.array_records else "metric" if name in content.metric_records
                         else "config" if name in content.config_records else type(rec).__name__)
    arrays = {name: {k: ArrayBytes(tuple(int(d) for d in a.shape), str(a.dtype), str(a.stype), bytes(a.data))
                     for k, a in rec.items()} for name, rec in content.array_records.items()}
    values = {name: dict(rec.items()) for name, rec in (*content.metric_records.items(), *content.config_records.items())}
    return Reply(records, arrays, values)


def error_reply(request: Message, error: BaseException, code: Code | None = None) -> Message:
    """The error reply to ``request``: ``Error(code, reason=error_reason(error, code))``, no text
    (:func:`fedldt.egress.error_reason`). ``code`` defaults to :func:`fedldt.egress.error_code`."""
    code = error_code(error) if code is None else Code(code)
    return Message(error=Error(code=int(code), reason=error_reason(error, code)), reply_to=request)


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


def errors_log_path(node_config: Mapping[str, Any]) -> Path:
    """Where :func:`egress_audit_mod` writes the text and traceback of every failed or refused
    reply (``<out-dir>/errors.log``); only the type and code leave the territory."""
    return territory_out_dir(node_config) / ERRORS_LOG


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # short appends from concurrent processes stay whole
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def egress_audit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: run the handler, enforce the allow-lists, log, reply (see the module docstring).

    Never raises: every exception of the handler, of the check or of the logging becomes an
    error reply carrying ``"<ExceptionType> [fedldt-<code>]"`` only
    (:func:`error_reply`), so Flower never puts an exception's text
    (which may hold data) in the reply.

    Returns:
        The handler's reply when it passes :func:`fedldt.egress.check_reply` and the
        log is written; else an error reply to ``msg``.
    """
    reply: Message | None = None
    failure: BaseException | None = None
    refused: dict[str, Any] | None = None
    try:
        reply = call_next(msg, context)
        if reply.has_error():
            raise EgressRefused(Code.HANDLER_ERROR_REPLY, f"the handler returned an error reply of its own "
                                                          f"(code {reply.error.code}, reason {reply.error.reason!r})")
        check_reply(plain_request(msg), plain_reply(reply))
    except Exception as e:  # noqa: BLE001 - every failure becomes a coded error reply
        failure = e
        if isinstance(e, EgressRefused):
            tried = describe_content(reply) if reply is not None and not reply.has_error() else []
            refused = {"code": int(e.code), "detail": e.detail, "records": tried}
    out = reply if failure is None else error_reply(msg, failure)
    try:
        entry = {
            "time": round(time.time(), 3),
            "run_id": int(msg.metadata.run_id),
            "node_id": int(context.node_id),
            "territory": context.node_config.get("territory", context.node_config.get("partition-id")),
            "message_type": str(msg.metadata.message_type),
            "server_round": _server_round(msg),
            "records": describe_content(out) if not out.has_error() else [],
            "error": str(out.error.reason) if out.has_error() else None,
            "refused": refused,
        }
        if failure is not None:
            path = errors_log_path(context.node_config)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            _append(path, f"=== {stamp} run {entry['run_id']} territory {entry['territory']} {entry['message_type']} "
                          f"round {entry['server_round']}: sent {entry['error']}\n"
                          + "".join(traceback.format_exception(failure)) + "\n")
            _log.error("fedldt: the %s reply became the error %s; its text and traceback are in %s",
                       entry["message_type"], entry["error"], path)
        _append(egress_log_path(context.node_config), json.dumps(entry, allow_nan=False) + "\n")
    except Exception as e:  # noqa: BLE001 - the log cannot be written: send nothing but a coded error
        _log.error("fedldt: cannot write this territory's egress/error log, so the %s reply is withheld: %s",
                   msg.metadata.message_type, "".join(traceback.format_exception(e)))
        return error_reply(msg, e, Code.AUDIT_FAILED)
    return out
