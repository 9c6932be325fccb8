"""What may leave a territory: the reply allow-lists, their check and the coded error replies.

This module belongs to the territory's **own installation** of fedldt. The coordinator's app
(the FAB) does not ship ``fedldt/`` (``fab-include`` of the Flower app table in ``pyproject.toml``), so
the ClientApp's egress mod (``clients/audit.py``) imports this file from the territory's
installed package, not from the coordinator. See ``docs/egress.md`` for every value that leaves
and why.

It imports nothing of Flower: it works on a plain form of the messages (:class:`Request`,
:class:`Reply`, :class:`ArrayBytes`) that the mod builds from Flower's ``Message``.
:func:`check_reply` compares a reply with the request it answers and raises
:class:`EgressRefused` (with a :class:`Code`) unless:

* the reply carries exactly the records of its message type (``query``: one config record
  ``info``; ``train``: one array record ``arrays`` and one metric record ``metrics``;
  ``evaluate``: one metric record ``metrics``), nothing else (no config record, no second array
  record);
* ``train`` arrays have exactly the keys, shapes and dtypes of the global model's shared
  parameters as the server sent them in the request's ``arrays`` record, are ``float32``
  (:data:`ARRAY_DTYPES`), are finite and hold no bytes beyond their values;
* metric and info keys are exactly those of :data:`TRAIN_METRICS`, :data:`EVALUATE_METRICS` and
  :data:`QUERY_INFO`, each of its documented type, non-negative and finite, and every per-step
  list has one value per horizon step (``task.horizon`` of the run config the server sent).

:func:`error_reason` is what the error reply a territory sends instead says (built by the mod as
``Error(code, reason)``): ``"<ExceptionType> [fedldt-<code>]"``, never the exception's text (which
may hold data, e.g. a cell's value and date); the text stays in the territory's own log
(``clients/audit.py``).
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Mapping

import numpy as np

from fedldt.metrics import SUM_KEYS
from fedldt.results import REFERENCES

#: Key of the request's ``config`` record that holds the run config as JSON (written by
#: ``server/rounds.py``, read by ``clients/client_app.py`` and :func:`request_horizon`).
CONFIG_KEY = "fedldt-config"
#: Serialisation type of an array a reply may carry (Flower's ``SType.NUMPY``: ``np.save``
#: bytes, read back with ``np.load(allow_pickle=False)``).
NUMPY_STYPE = "numpy.ndarray"
#: dtypes a shared parameter may leave in (the global model is float32; float64 would double
#: the bytes and never matches the global model).
ARRAY_DTYPES = ("float32",)
#: Message type of the server's fine-tuning request (``train`` with action ``finetune``); its reply
#: carries metrics only (:data:`FINETUNE_METRICS`).
FINETUNE_MESSAGE = "train.finetune"
#: Longest ``territory-id`` string a query reply may carry.
MAX_ID_LENGTH = 128


class Code(IntEnum):
    """Error codes of a territory's error replies (``Error.code``; Flower's own codes are 0-8).

    The reply's reason is ``"<ExceptionType> [fedldt-<code>]"``; the territory's
    ``<out-dir>/errors.log`` holds the text and traceback.
    """

    HANDLER_RAISED = 100  #: the handler (query/train/evaluate) raised; the exception type is named
    HANDLER_ERROR_REPLY = 101  #: the handler returned an error reply of its own (its text is not sent)
    AUDIT_FAILED = 102  #: the egress log could not be written, so nothing is sent
    REQUEST = 103  #: the request cannot be checked against (unknown message type, no arrays, no horizon)
    UNUSABLE_DATA = 104  #: the territory's data is not usable for training; the reason names the problem codes only
    RECORDS = 110  #: the reply's records are not exactly those of its message type
    ARRAY_KEYS = 111  #: reply array keys differ from the global model's shared keys
    ARRAY_SHAPE = 112  #: a reply array's shape differs from the global model's
    ARRAY_DTYPE = 113  #: a reply array's dtype differs from the global model's or is not float32
    ARRAY_VALUE = 114  #: a reply array is not finite, not numpy-serialised or carries extra bytes
    METRIC_KEY = 120  #: a metric/info key is not in the allow-list, or an allowed key is missing
    METRIC_VALUE = 121  #: a metric/info value has the wrong type, is negative or not finite
    METRIC_LENGTH = 122  #: a per-step metric list does not have one value per horizon step


class EgressRefused(Exception):
    """A reply does not fit the allow-lists; it is not sent.

    Attributes:
        code: what is wrong (:class:`Code`).
        detail: which record/key and why (names and shapes only, never values); written to the
            territory's own log, never sent.
    """

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(f"[fedldt-{int(code)}] {detail}")
        self.code = Code(code)
        self.detail = detail


@dataclass(frozen=True)
class Allowed:
    """One value a territory may send.

    Attributes:
        kind: ``int`` (a count or index, >= 0), ``float`` (finite, >= 0; an int is accepted) or
            ``str`` (an identifier of at most :data:`MAX_ID_LENGTH` printable characters).
        per_step: a list with one value per horizon step (else a scalar).
        why: why it leaves the territory (documented in ``docs/egress.md``).
        optional: the key may be absent (a value that cannot be computed, e.g. a validation MAE
            without valid target; a record holds no null).
    """

    kind: type
    per_step: bool
    why: str
    optional: bool = False


_SUM_WHY = {
    "abs_err_sum": "sum of |forecast - target| per horizon step: MAE = abs_err_sum / num_valid",
    "sq_err_sum": "sum of squared errors per step: RMSE = sqrt(sq_err_sum / num_valid)",
    "ape_sum": "sum of |error| / |target| per step (targets != 0): MAPE = ape_sum / num_valid_ape",
    "abs_target_sum": "sum of |target| per step: WAPE = abs_err_sum / abs_target_sum; reveals the territory's "
                      "total absolute target (e.g. summed speed) over the split, per step",
    "num_valid": "number of valid (mask = 1) targets per step: the MAE/RMSE denominator",
    "num_valid_ape": "number of valid non-zero targets per step: the MAPE denominator",
}
_FORECASTS = {"model": "the federated model", "persistence": "the last-observed-value reference",
              "historical_average": "the time-of-day/week average reference",
              "seasonal_naive_day": "the same-time-one-day-earlier reference",
              "seasonal_naive_week": "the same-time-one-week-earlier reference"}
_TERRITORY = Allowed(int, False, "the territory's index (the server knows it from discovery; names the reply)")

#: Train reply metrics (record ``metrics``).
TRAIN_METRICS: dict[str, Allowed] = {
    "num-examples": Allowed(int, False, "training windows: the FedAvg weight"),
    "train_loss": Allowed(float, False, "scaled training MAE of the last local epoch, a windows-weighted mean "
                                        "over its batches (progress report)"),
    "territory": _TERRITORY,
}
#: Evaluate reply metrics (record ``metrics``): counts plus, for the model and each reference
#: forecast, the error sums of :data:`fedldt.metrics.SUM_KEYS`, one per horizon step.
EVALUATE_METRICS: dict[str, Allowed] = {
    "num-examples": Allowed(int, False, "evaluated windows"),
    "territory": _TERRITORY,
    **{f"{p}.{k}": Allowed(int if k.startswith("num_") else float, True, f"{_SUM_WHY[k]} ({_FORECASTS[p]})")
       for p in ("model", *REFERENCES) for k in SUM_KEYS},
}
#: Reply metrics (record ``metrics``) of the ``train.finetune`` message: the territory fine-tuned
#: the global model (personalization=finetune, or the held-out territory's fine-tuning) and kept the
#: better one at home (:func:`fedldt.personal.finetune`). No arrays leave.
FINETUNE_METRICS: dict[str, Allowed] = {
    "territory": _TERRITORY,
    "kept": Allowed(int, False, "which model the territory keeps: 0 = the global model, 1 = its fine-tuned model "
                                "(fedldt.personal.KEPT)"),
    "val_mae_global": Allowed(float, False, "validation MAE of the global model on the territory (data units; "
                                            "absent without a valid validation target)", optional=True),
    "val_mae_finetuned": Allowed(float, False, "validation MAE of the best fine-tuning epoch (absent when no epoch "
                                               "gave a finite one)", optional=True),
    "epochs_run": Allowed(int, False, "fine-tuning epochs run before early stopping"),
}
#: Query reply (record ``info``): the sizes the server needs to build the global model.
QUERY_INFO: dict[str, Allowed] = {
    "territory": _TERRITORY,
    "territory-id": Allowed(str, False, "the territory's name from the run config (reports)"),
    "num-nodes": Allowed(int, False, "sensors of the territory (reports; the node count is not secret to the server, "
                                     "which sends the partition config)"),
    "num-train": Allowed(int, False, "training windows (min_train checks, reports)"),
    "num-val": Allowed(int, False, "validation windows (reports)"),
    "num-test": Allowed(int, False, "test windows (reports)"),
    "in-channels": Allowed(int, False, "model input channels (global model size)"),
    "out-channels": Allowed(int, False, "model output channels (global model size)"),
    "horizon": Allowed(int, False, "forecast steps (global model size)"),
}

#: Record name -> record kind (``array``, ``metric`` or ``config``) a reply carries, per message type.
#: A message type with an action (``train.finetune``) has its own entry; others use their category.
REPLY_RECORDS: dict[str, dict[str, str]] = {
    "query": {"info": "config"},
    "train": {"arrays": "array", "metrics": "metric"},
    "evaluate": {"metrics": "metric"},
    FINETUNE_MESSAGE: {"metrics": "metric"},
}
#: Allow-list of each record a reply carries.
ALLOW_LISTS: dict[tuple[str, str], dict[str, Allowed]] = {
    ("query", "info"): QUERY_INFO,
    ("train", "metrics"): TRAIN_METRICS,
    ("evaluate", "metrics"): EVALUATE_METRICS,
    (FINETUNE_MESSAGE, "metrics"): FINETUNE_METRICS,
}


@dataclass(frozen=True)
class ArrayBytes:
    """One array of a reply as it would be sent: declared ``shape`` and ``dtype``, serialisation
    type ``stype`` and the serialised bytes ``data`` (Flower's ``Array`` fields)."""

    shape: tuple[int, ...]
    dtype: str
    stype: str
    data: bytes


@dataclass(frozen=True)
class Request:
    """What the check needs of the server's message.

    Attributes:
        category: ``train``, ``evaluate`` or ``query`` (the message type before any ``.action``).
        arrays: the ``arrays`` record as shared key -> ``(shape, dtype)`` (the global model's
            shared parameters); ``None`` when the request has no such array record.
        run_config: the run config JSON (``config`` record, key :data:`CONFIG_KEY`); ``None`` if absent.
    """

    category: str
    arrays: dict[str, tuple[tuple[int, ...], str]] | None = None
    run_config: str | None = None


@dataclass(frozen=True)
class Reply:
    """A handler's reply in plain form.

    Attributes:
        records: record name -> kind (``array``, ``metric`` or ``config``), every record it carries.
        arrays: array record name -> {key: :class:`ArrayBytes`}.
        values: metric/config record name -> {key: value} (int, float, str or a list of them).
    """

    records: dict[str, str]
    arrays: dict[str, dict[str, ArrayBytes]] = field(default_factory=dict)
    values: dict[str, dict[str, Any]] = field(default_factory=dict)


def message_category(message_type: str) -> str:
    """The allow-list a reply to ``message_type`` is checked against: the whole type when it has
    its own (:data:`FINETUNE_MESSAGE`), else ``train``, ``evaluate`` or ``query`` (the part before
    any ``.action``)."""
    message_type = str(message_type)
    return message_type if message_type in REPLY_RECORDS else message_type.split(".", 1)[0]


def request_arrays_spec(request: Request) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shared key -> ``(shape, dtype)`` of the global model as the server sent it (the train
    request's ``arrays`` record).

    Raises:
        EgressRefused: ``REQUEST``, the request has no ``arrays`` array record.
    """
    if request.arrays is None:
        raise EgressRefused(Code.REQUEST, "the train request has no 'arrays' record to compare the reply with")
    return {k: (tuple(int(d) for d in shape), str(dtype)) for k, (shape, dtype) in request.arrays.items()}


def request_horizon(request: Request) -> int:
    """``task.horizon`` of the run config the request carries (``config`` record, JSON).

    Raises:
        EgressRefused: ``REQUEST``, no run config or no positive integer horizon in it.
    """
    try:
        horizon = json.loads(str(request.run_config) if request.run_config is not None else "")["task"]["horizon"]
    except (KeyError, TypeError, ValueError) as e:
        raise EgressRefused(Code.REQUEST, f"the request's run config has no task.horizon ({type(e).__name__})") from None
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise EgressRefused(Code.REQUEST, "the request's task.horizon is not a positive integer")
    return horizon


def check_reply(request: Request, reply: Reply) -> None:
    """Refuse a reply that carries anything beyond what its message type may carry.

    Args:
        request: the server's message (its ``arrays`` are the global model; its run config
            gives the horizon).
        reply: the handler's reply (not an error reply).

    Raises:
        EgressRefused: with the :class:`Code` of the first problem found; ``detail`` names the
            record, key, shape or dtype (never a value).
    """
    category = request.category
    expected = REPLY_RECORDS.get(category)
    if expected is None:
        raise EgressRefused(Code.REQUEST, f"message type '{category}' has no egress allow-list")
    records = dict(reply.records)
    if set(records) != set(expected):
        raise EgressRefused(Code.RECORDS, f"{category} reply has records {sorted(records)}; only {sorted(expected)} may "
                                          "leave")
    for name, kind in expected.items():
        if records[name] != kind:
            raise EgressRefused(Code.RECORDS, f"{category} reply record '{name}' is a {records[name]} record, "
                                              f"not a {kind} record")
    if category == "train":
        check_arrays(request_arrays_spec(request), reply.arrays["arrays"])
    horizon = request_horizon(request) if category == "evaluate" else None
    for (cat, name), allowed in ALLOW_LISTS.items():
        if cat == category:
            check_values(reply.values[name], allowed, horizon, f"{category} reply '{name}'")


def check_arrays(spec: Mapping[str, tuple[tuple[int, ...], str]], arrays: Mapping[str, ArrayBytes]) -> None:
    """The reply's arrays are exactly the global model's shared parameters.

    Args:
        spec: shared key -> ``(shape, dtype)`` (:func:`request_arrays_spec`).
        arrays: the reply's array record, key -> :class:`ArrayBytes`.

    Raises:
        EgressRefused: ``ARRAY_KEYS`` (a key missing or extra: local entries such as node
            embeddings stay home), ``ARRAY_SHAPE``, ``ARRAY_DTYPE`` (differs from the global
            model or not in :data:`ARRAY_DTYPES`) or ``ARRAY_VALUE`` (not finite, not a numpy
            array, or bytes beyond its values).
    """
    missing, extra = sorted(set(spec) - set(arrays.keys())), sorted(set(arrays.keys()) - set(spec))
    if missing or extra:
        raise EgressRefused(Code.ARRAY_KEYS, f"reply arrays differ from the global model's shared keys: missing {missing}, "
                                             f"not shared {extra}")
    for key, (shape, dtype) in spec.items():
        arr = arrays[key]
        if tuple(int(d) for d in arr.shape) != tuple(shape):
            raise EgressRefused(Code.ARRAY_SHAPE, f"array '{key}' has shape {list(arr.shape)}, the global model {list(shape)}")
        if str(arr.dtype) != dtype or dtype not in ARRAY_DTYPES:
            raise EgressRefused(Code.ARRAY_DTYPE, f"array '{key}' is {arr.dtype}, the global model {dtype}; only "
                                                  f"{list(ARRAY_DTYPES)} may leave")
        _check_array_bytes(key, arr, shape, dtype)


def _npy_bytes(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _check_array_bytes(key: str, arr: ArrayBytes, shape: tuple[int, ...], dtype: str) -> None:
    try:
        if arr.stype != NUMPY_STYPE:
            raise TypeError(f"serialisation type {arr.stype!r}")
        value = np.load(io.BytesIO(arr.data), allow_pickle=False)
        if not isinstance(value, np.ndarray):
            raise TypeError("not a single array")
    except Exception as e:  # noqa: BLE001 - any failure to read it back means it is not a plain array
        raise EgressRefused(Code.ARRAY_VALUE, f"array '{key}' is not a numpy array ({type(e).__name__})") from None
    if tuple(value.shape) != tuple(shape) or str(value.dtype) != dtype:
        raise EgressRefused(Code.ARRAY_VALUE, f"array '{key}' declares {list(arr.shape)} {arr.dtype} but holds "
                                              f"{list(value.shape)} {value.dtype}")
    if len(arr.data) != len(_npy_bytes(np.ascontiguousarray(value))):
        raise EgressRefused(Code.ARRAY_VALUE, f"array '{key}' carries {len(arr.data)} bytes, more than its values need")
    if not np.isfinite(value).all():
        raise EgressRefused(Code.ARRAY_VALUE, f"array '{key}' is not finite")


def check_values(record: Mapping[str, Any], allowed: Mapping[str, Allowed], horizon: int | None, where: str) -> None:
    """Keys exactly ``allowed``; each value of its kind, >= 0, finite; per-step lists of length ``horizon``.

    Raises:
        EgressRefused: ``METRIC_KEY``, ``METRIC_VALUE`` or ``METRIC_LENGTH``.
    """
    keys = set(record.keys())
    extra = sorted(keys - set(allowed))
    missing = sorted(k for k, spec in allowed.items() if k not in keys and not spec.optional)
    if extra or missing:
        raise EgressRefused(Code.METRIC_KEY, f"{where}: keys not in the allow-list {extra}, missing {missing}")
    for key, spec in allowed.items():
        if key not in record:
            continue
        value = record[key]
        if spec.per_step:
            if not isinstance(value, list):
                raise EgressRefused(Code.METRIC_VALUE, f"{where}: '{key}' must be a list (one value per horizon step)")
            if horizon is None or len(value) != horizon:
                raise EgressRefused(Code.METRIC_LENGTH, f"{where}: '{key}' has {len(value)} values, the horizon is "
                                                        f"{horizon}")
            for v in value:
                _check_value(v, spec.kind, where, key)
        else:
            _check_value(value, spec.kind, where, key)


_ID = re.compile(r"[\w.:@+-]+")


def _check_value(value: Any, kind: type, where: str, key: str) -> None:
    if kind is str:
        if not isinstance(value, str) or len(value) > MAX_ID_LENGTH or not _ID.fullmatch(value):
            raise EgressRefused(Code.METRIC_VALUE, f"{where}: '{key}' must be an identifier of at most {MAX_ID_LENGTH} "
                                                   "letters, digits and ._:@+-")
        return
    ok_types = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        raise EgressRefused(Code.METRIC_VALUE, f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}")
    try:
        finite = math.isfinite(value)  # an int beyond float's range raises OverflowError here
    except OverflowError:
        finite = False
    if not finite or value < 0:
        raise EgressRefused(Code.METRIC_VALUE, f"{where}: '{key}' must be finite and >= 0")


def error_reason(error: BaseException, code: Code | None = None) -> str:
    """``"<ExceptionType> [fedldt-<code>]"``: what an error reply says (type and code, no text).

    ``code`` defaults to :func:`error_code` of ``error``. A territory whose data is not usable
    (:class:`fedldt.data.checks.UnusableData`) adds its problem codes, words of the fixed list
    :data:`fedldt.data.checks.PROBLEM_CODES`: ``"UnusableData [fedldt-104] no_valid_data,too_little_history"``.
    """
    from fedldt.data.checks import PROBLEM_CODES, UnusableData

    code = error_code(error) if code is None else code
    reason = f"{_type_name(type(error))} [fedldt-{int(code)}]"
    if isinstance(error, UnusableData) and code == Code.UNUSABLE_DATA:
        reason += " " + ",".join(c if c in PROBLEM_CODES else "other" for c in error.codes)
    return reason


def _type_name(cls: type) -> str:
    """The name of the nearest class in ``cls``'s MRO that is defined in source: an attribute of
    its module under its qualified name, with a plain short name. A class made at run time
    (``type("Speed_61mph_at_...", (ValueError,), {})``) is named by its nearest such base, so a
    class name cannot carry data."""
    for base in cls.__mro__:
        obj: Any = sys.modules.get(base.__module__)
        for part in base.__qualname__.split("."):
            obj = getattr(obj, part, None)
        if obj is base and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", base.__name__):
            return base.__name__
    return "Exception"


def error_code(error: BaseException) -> Code:
    """The :class:`Code` of an exception: its own for :class:`EgressRefused`, ``UNUSABLE_DATA`` for
    :class:`fedldt.data.checks.UnusableData`, else ``HANDLER_RAISED``."""
    from fedldt.data.checks import UnusableData

    if isinstance(error, EgressRefused):
        return error.code
    return Code.UNUSABLE_DATA if isinstance(error, UnusableData) else Code.HANDLER_RAISED
