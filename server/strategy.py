"""Flower strategies for territories: deterministic reply order, per-territory history, exact
metrics and aggregation guards.

:class:`FedLDTStrategy` is a mixin over Flower's own strategies
(:mod:`flwr.serverapp.strategy`): it overrides the configure/aggregate hooks only, so the round
loop and the aggregation rule stay Flower's. One class per rule (``STRATEGIES``, chosen with
``strategy=<name>``):

========================  =====================================================================
``fedavg``                FedAvg, McMahan et al., AISTATS 2017
``fedprox``               FedProx, Li et al., MLSys 2020 (server sends ``proximal-mu``; the
                          territory adds ``mu/2 ||w - w_global||^2`` to its loss)
``fedadam`` ``fedyogi``   adaptive server optimizers, Reddi et al., "Adaptive Federated
``fedadagrad``            Optimization", ICLR 2021
``fedavgm``               FedAvg with server momentum, Hsu et al., arXiv:1909.06335, 2019
``fedmedian``             coordinate-wise median, Yin et al., ICML 2018
``fedtrimmedavg``         coordinate-wise trimmed mean, Yin et al., ICML 2018
``krum``                  Krum, Blanchard et al., NeurIPS 2017
``fedclipavg``            FedAvg of updates clipped to the round's median norm (norm bounding,
                          Sun et al., arXiv:1911.07963, 2019, with the median as the bound)
========================  =====================================================================
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (DifferentialPrivacyServerSideFixedClipping, FedAdagrad, FedAdam, FedAvg, FedAvgM,
                                     FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.differential_privacy import compute_clip_model_update, get_norm

from fedldt.checkpoint import State
from fedldt.launch.progress import fmt as _fmt
from fedldt.launch.progress import round_line
from fedldt.metrics import MetricSums, report, windows_weighted_mean
from fedldt.engine import derive_seed
from fedldt.privacy import PrivacyLedger, check_privacy_config
from fedldt.results import flat_metrics, history_row, round_row
from fedldt.schema import strategy_arguments

#: Weight of a territory's parameters in the average: its number of training windows.
WEIGHT_KEY = "num-examples"


class FederationError(RuntimeError):
    """The federation cannot go on (missing territories, too few replies); the message says why."""


class AggregationGuardError(FederationError):
    """A territory's reply does not fit the global model (keys, shapes, dtypes, weights)."""


def reply_territory(msg: Message, node_territories: Mapping[int, int] | None = None) -> int:
    """The territory index of a (non-error) reply: the one discovery gave its SuperNode
    (``node_territories``, node id -> index), which must be the index it carries in its metrics.

    A territory cannot speak for another one: a reply whose node is not a discovered territory,
    or that claims another territory's index (its own metrics would overwrite the other's), is
    refused. Without ``node_territories`` (no discovery) the claimed index is used.

    Raises:
        AggregationGuardError: the claimed index is not a whole number, the node is unknown, or
            the claim differs from the node's territory (node id and both indices named).
    """
    record = next(iter(msg.content.metric_records.values()))
    claimed = record.get("territory")
    if isinstance(claimed, bool) or not isinstance(claimed, (int, float)) or not np.isfinite(claimed) or claimed != int(claimed):
        raise AggregationGuardError(f"a reply from SuperNode {int(msg.metadata.src_node_id)} carries territory={claimed!r}; "
                                    "it must be the territory's index (a whole number)")
    if not node_territories:
        return int(claimed)
    node = int(msg.metadata.src_node_id)
    if node not in node_territories:
        raise AggregationGuardError(f"a reply from SuperNode {node}, which is not a discovered territory of this run")
    if int(claimed) != node_territories[node]:
        raise AggregationGuardError(f"a reply from SuperNode {node} (territory index {node_territories[node]}) claims "
                                    f"territory index {int(claimed)}: a territory cannot report for another")
    return node_territories[node]


def _sorted(replies: Iterable[Message], node_territories: Mapping[int, int] | None = None) -> list[Message]:
    # Replies arrive in any order; summing floats in a fixed order makes runs repeatable.
    return sorted(replies, key=lambda m: (1, m.metadata.src_node_id) if m.has_error()
                  else (0, reply_territory(m, node_territories)))


def failure_reasons(replies: Iterable[Message]) -> list[dict[str, Any]]:
    """``[{"node_id", "reason"}]`` of the replies that carry an error."""
    return [{"node_id": int(m.metadata.src_node_id), "reason": str(m.error.reason)} for m in replies if m.has_error()]


def check_reply_arrays(template: Mapping[str, tuple[tuple[int, ...], np.dtype]], arrays: ArrayRecord,
                       territory: str) -> None:
    """Check that a territory's parameters match the global model exactly.

    Args:
        template: shared key -> ``(shape, dtype)`` of the global model the server sent.
        arrays: the territory's reply.
        territory: its id, for the message.

    Raises:
        AggregationGuardError: a key is missing or not shared (local parameters such as node
            embeddings, integer buffers and personalized layers must stay on the territory),
            a shape differs (never broadcast: node embeddings of a 5-node and a 1-node
            territory cannot be averaged), a dtype differs (float32 stays float32) or a float
            parameter is not finite (one NaN would make every rule's aggregate NaN, the
            median's and the clipped average's included). The message names the territory
            and the parameter.
    """
    missing = [k for k in template if k not in arrays]
    extra = [k for k in arrays if k not in template]
    if missing or extra:
        raise AggregationGuardError(
            f"territory {territory} sent parameters that do not match the global model: missing {missing}, not shared "
            f"{extra} (node-dependent parameters, integer buffers and personalized layers must stay on the territory; "
            "check that every territory runs the same model and personalization config)")
    for key, (shape, dtype) in template.items():
        arr = arrays[key]
        if tuple(arr.shape) != tuple(shape):
            raise AggregationGuardError(
                f"territory {territory}: parameter '{key}' has shape {tuple(arr.shape)}, the global model has {tuple(shape)}; "
                "a parameter whose shape depends on the territory must be local (model.local_parameter_names())")
        if np.dtype(arr.dtype) != np.dtype(dtype):
            raise AggregationGuardError(
                f"territory {territory}: parameter '{key}' is {np.dtype(arr.dtype)}, the global model is {np.dtype(dtype)}; "
                "a territory must train and send the model in the global dtype (e.g. float64 data must be cast to float32)")
        if np.issubdtype(np.dtype(dtype), np.floating) and not np.isfinite(arr.numpy()).all():
            raise AggregationGuardError(
                f"territory {territory}: parameter '{key}' is not finite (NaN or infinite); its training diverged or the "
                "territory is faulty: lower the learning rates, check its data, or leave it out of the federation")


def _in_template_order(msg: Message, template: Mapping[str, Any]) -> None:
    """Put a (checked) reply's arrays in the global model's key order, in place.

    Some Flower rules pair arrays by position (FedAvgM zips ``to_numpy_ndarrays()`` with the
    global model's, Krum's distances flatten each reply in its own order); a territory may list
    its parameters in any order, so every reply is put in one order before any rule sees it.
    """
    key = next(iter(msg.content.array_records))
    arrays = msg.content.array_records[key]
    msg.content[key] = ArrayRecord({k: arrays[k] for k in template})


def _with_weighted_mean(arrays: ArrayRecord, replies: list[Message], keys: Iterable[str]) -> ArrayRecord:
    """``arrays`` with ``keys`` replaced by the ``num-examples``-weighted mean of the replies."""
    recs = [(next(iter(m.content.array_records.values())), float(next(iter(m.content.metric_records.values()))[WEIGHT_KEY]))
            for m in replies]
    total = sum(w for _, w in recs)
    out = {k: arrays[k] for k in arrays.keys()}
    for k in keys:
        out[k] = Array(np.asarray(sum(rec[k].numpy().astype(np.float64) * (w / total) for rec, w in recs)))
    return ArrayRecord(out)


def _train_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Aggregated train metrics: the windows-weighted mean ``train_loss``
    (:func:`fedldt.metrics.windows_weighted_mean`) and the total examples (the per-territory
    values are kept in the strategy's history)."""
    recs = [next(iter(r.metric_records.values())) for r in records]
    pairs = [(float(m["train_loss"]), int(m[weighted_by_key])) for m in recs]
    loss = windows_weighted_mean(pairs)
    return MetricRecord({**({"train_loss": loss} if loss is not None else {}), weighted_by_key: sum(n for _, n in pairs)})


class FedLDTStrategy:
    """Mixin for Flower strategies: territories recorded, replies checked, failures named.

    Put it before a Flower strategy class (``class FedLDTAvg(FedLDTStrategy, FedAvg)``); it
    overrides ``configure_train``/``configure_evaluate``/``aggregate_train``/``aggregate_evaluate``
    and calls the Flower class for the aggregation rule itself.

    Per round it:

    * sorts replies by territory (floating-point sums in a fixed order: bit-reproducible runs);
    * records every failed or missing reply with its territory (Flower drops them silently) and
      stops when fewer than ``min_train_territories`` territories trained;
    * checks each reply against the global model (:func:`check_reply_arrays`) and puts its
      arrays in the global model's key order, so that every rule pairs parameters by name;
    * leaves territories that report 0 training windows out of the aggregation (a 0 weight must
      not change the result, also for unweighted rules such as the median), and stops when all
      of them report 0;
    * casts the aggregate back to the global dtypes (numpy may promote float32 to float64) and
      refuses a non-finite result.

    Args:
        territory_ids: territory index -> id (e.g. ``{0: "t0"}``), for the history.
        report_steps: horizon steps logged per round.
        num_rounds: total rounds (for the progress line).
        node_territories: SuperNode id -> territory index (from discovery), to name the
            territory of a failed reply (error replies carry no metrics; a SuperLink-made
            "node unavailable" reply does not even carry the node's id).
        min_train_territories: successful training replies a round needs (default: all
            territories in ``territory_ids``).
        buffer_keys: shared float buffers (BatchNorm running statistics). Rules with a server
            optimizer (FedAdam/FedYogi/FedAdagrad, FedAvgM) step parameters, not statistics:
            these keys get the example-weighted mean instead (a running variance stepped by
            Adam can turn negative).
        **kwargs: passed to the Flower strategy class that follows this mixin in the MRO.

    Attributes:
        history: one dict per (round, territory): train loss, validation metrics and status
            (``train_status``/``eval_status`` = ``ok``, ``failed``, ``not sampled`` or, for
            ``eval_status``, ``not available``: no valid validation target; ``error``). A
            metric that cannot be computed is ``None`` (JSON ``null``, an empty CSV cell).
        rounds: one dict per round: mean train loss, pooled validation metrics (``None`` where
            no territory has a valid target) and ``val_not_available`` (the territories without one).
        failures: one dict per failed or missing reply (round, phase, territory, node id, reason).

    Raises:
        FederationError: (from :meth:`aggregate_train`) too few territories trained in a round,
            every territory reported 0 training windows, or the aggregate is not finite.
        AggregationGuardError: (from :meth:`aggregate_train`) a reply does not fit the global
            model (keys, shapes, dtypes) or reports a bad ``num-examples``; territory and
            parameter named.
    """

    def __init__(self, *, territory_ids: dict[int, str], report_steps: list[int], num_rounds: int,
                 node_territories: dict[int, int] | None = None, min_train_territories: int | None = None,
                 buffer_keys: Iterable[str] = (), **kwargs: Any) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, train_metrics_aggr_fn=_train_metrics, **kwargs)
        self.buffer_keys = list(buffer_keys)
        self.territory_ids = territory_ids
        self.report_steps = list(report_steps)
        self.num_rounds = num_rounds
        self.node_territories = dict(node_territories or {})
        self.min_train_territories = len(territory_ids) if min_train_territories is None else int(min_train_territories)
        self.history: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._train: dict[int, tuple[float, int]] = {}  # territory -> (train loss, training windows)
        self._sent: dict[str, list[Message]] = {"train": [], "evaluate": []}
        self._status: dict[str, dict[int, tuple[str, str]]] = {"train": {}, "evaluate": {}}
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        #: the run's privacy accountant (:class:`fedldt.privacy.PrivacyLedger`), ``None`` without DP
        self.privacy: PrivacyLedger | None = None

    def checkpoint_state(self) -> State:
        """The strategy's state for a checkpoint (:mod:`fedldt.checkpoint`): the metric history
        so far (:attr:`history`, :attr:`rounds`, :attr:`failures`) as JSON metadata.

        A strategy class with more state extends this and :meth:`load_checkpoint_state` (calling
        ``super()`` and adding its arrays and metadata under its own names: see
        :class:`_ServerOptimizer`, :class:`FedLDTAvgM`). A component that is not the strategy (a
        privacy accountant, a wrapper around the strategy) is checkpointed as its own component
        (``server.rounds.run_federated``, ``components``), not through this method. The state of
        one round (sent messages, replies' status) is not saved: a checkpoint is written between
        rounds only.
        """
        return State(meta={"history": self.history, "rounds": self.rounds, "failures": self.failures})

    def load_checkpoint_state(self, state: State) -> None:
        """Put back what :meth:`checkpoint_state` returned (the checkpoint was checked when loaded).

        Raises:
            ValueError: a field is missing or not a list of objects.
        """
        for name in ("history", "rounds", "failures"):
            value = state.meta.get(name)
            if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
                raise ValueError(f"checkpoint strategy state '{name}' must be a list of objects")
            setattr(self, name, [dict(r) for r in value])

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._template = {k: (tuple(int(d) for d in a.shape), np.dtype(a.dtype)) for k, a in arrays.items()}
        if isinstance(self, FedAvgM):
            # Flower's FedAvgM keeps its own copy of the global model from the first round on; the
            # momentum step must start from the model this round sends (fedldt casts and may
            # average buffers after each step).
            self.current_arrays = arrays
        # Keep the messages: Flower sets their ids when it sends them, and replies point back.
        self._sent["train"] = list(super().configure_train(server_round, arrays, config, grid))
        return self._sent["train"]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent["evaluate"] = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._sent["evaluate"]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        contributing = self.checked_train_replies(server_round, replies)
        arrays, metrics = self.aggregate_checked(server_round, contributing)
        if arrays is not None and self.privacy is not None and self.privacy.privacy["mode"] == "sample":
            self.privacy.record_round(server_round, self.trained_windows(contributing))
        return arrays, metrics

    def checked_train_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies a round aggregates, after fedldt's checks (see the class docstring):
        sorted by territory, failures recorded, ``min_train_territories`` enforced, arrays
        checked and put in the global model's key order, 0-window territories left out.

        Raises:
            FederationError, AggregationGuardError: see the class docstring.
        """
        replies = _sorted(replies, self.node_territories)
        self._record_failures(server_round, "train", replies)
        ok = [m for m in replies if not m.has_error()]
        self._train = {}
        for m in ok:
            rec = next(iter(m.content.metric_records.values()))
            n = rec[WEIGHT_KEY]
            if isinstance(n, bool) or not isinstance(n, (int, float)) or not np.isfinite(n) or n < 0 or n != int(n):
                raise AggregationGuardError(f"round {server_round}: territory {self._tid(reply_territory(m, self.node_territories))} reported "
                                            f"{WEIGHT_KEY}={n!r}; it must be a whole number >= 0 (training windows)")
            self._train[reply_territory(m, self.node_territories)] = (float(rec["train_loss"]), int(n))
        if len(ok) < self.min_train_territories:
            failed = [f for f in self.failures if f["round"] == server_round and f["phase"] == "train"]
            raise FederationError(
                f"round {server_round}: only {len(ok)} of {len(self.territory_ids)} territories trained, fewer than "
                f"federation.min_train_territories={self.min_train_territories}; failures: {failed}"
            )
        contributing = []
        for m in ok:
            tid = self._tid(reply_territory(m, self.node_territories))
            if self._template:
                check_reply_arrays(self._template, next(iter(m.content.array_records.values())), str(tid))
                _in_template_order(m, self._template)
            if self._train[reply_territory(m, self.node_territories)][1] > 0:
                contributing.append(m)
        if ok and not contributing:
            raise FederationError(
                f"round {server_round}: every territory that trained reported {WEIGHT_KEY}=0 (no training windows), so "
                "there is nothing to aggregate; check each territory's data and task.split/task.window")
        return contributing

    def aggregate_checked(self, server_round: int, contributing: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregation rule on :meth:`checked_train_replies` output, cast to the global dtypes."""
        arrays, metrics = self._aggregate_rule(server_round, contributing)
        if arrays is not None and self.buffer_keys and isinstance(self, _SERVER_OPTIMIZERS):
            arrays = _with_weighted_mean(arrays, contributing, self.buffer_keys)
        return self._conform(server_round, arrays), metrics

    def trained_windows(self, contributing: list[Message]) -> dict[str, int]:
        """Territory id -> training windows of the replies ``contributing`` (for the accountant)."""
        return {str(self._tid(reply_territory(m, self.node_territories))): self._train[reply_territory(m, self.node_territories)][1] for m in contributing}

    def _aggregate_rule(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The aggregation rule on checked, ordered replies: the Flower class's own
        ``aggregate_train`` (a strategy class overrides this hook to correct a rule)."""
        return super().aggregate_train(server_round, replies)

    def _conform(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """The aggregate in the global model's dtypes, checked finite."""
        if arrays is None or not self._template:
            return arrays
        out = {}
        for key, (shape, dtype) in self._template.items():
            value = np.asarray(arrays[key].numpy()).astype(dtype, copy=False).reshape(shape)
            if np.issubdtype(dtype, np.floating) and not np.isfinite(value).all():
                raise FederationError(f"round {server_round}: the aggregated parameter '{key}' is not finite "
                                      f"({type(self).__name__}); lower the learning rates or check the territories' data")
            out[key] = Array(np.ascontiguousarray(value))
        return ArrayRecord(out)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = _sorted(replies, self.node_territories)
        self._record_failures(server_round, "evaluate", replies)
        per: dict[int, MetricSums] = {}
        for m in replies:
            if not m.has_error():
                per[reply_territory(m, self.node_territories)] = MetricSums.from_dict(next(iter(m.content.metric_records.values())), "model.")
        # a territory whose validation targets are all missing has no metric this round
        # (history_row marks it); the pooled metrics come from the others (its zero counts add
        # nothing to the sums)
        known = set(per) | set(self._train) | set(self._status["train"]) | set(self._status["evaluate"])
        for idx in sorted(known | set(self.territory_ids)):
            train_status, train_err = self._status["train"].get(idx, ("not sampled", ""))
            eval_status, eval_err = self._status["evaluate"].get(idx, ("not sampled", ""))
            self.history.append(history_row(server_round, self.territory_ids.get(idx, str(idx)), self.report_steps,
                                            train=self._train.get(idx), val=per.get(idx), train_status=train_status,
                                            eval_status=eval_status, train_error=train_err, eval_error=eval_err))
        self._status = {"train": {}, "evaluate": {}}
        if not per:
            return None
        row = round_row(server_round, self._train.values(), {self._tid(i): s for i, s in per.items()}, self.report_steps)
        self.rounds.append(row)
        pooled, mean_loss = row["val"], row["train_loss"]  # pooled: all None when no territory has a valid target
        per_mae = "  ".join(f"{self.territory_ids.get(i, i)}={_fmt(report(s, [])['mae']['all'], 3)}" for i, s in per.items())
        last = f"h{self.report_steps[-1]}"
        # the progress line the launching process shows (fedldt.launch.progress parses it)
        print(round_line(server_round, self.num_rounds, mean_loss, pooled["mae"]["all"],
                         extra=f" ({last} {_fmt(pooled['mae'][last], 3)})  per territory: {per_mae}"), flush=True)
        return MetricRecord({k: v for k, v in flat_metrics(pooled, "val_").items() if v is not None})

    def _record_failures(self, server_round: int, phase: str, replies: list[Message]) -> None:
        """Record every error reply and every message that got no reply, with its territory
        (in territory order, so the record is the same from run to run)."""
        sent = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in self._sent.get(phase, [])}
        status: dict[int, tuple[str, str]] = {}
        failed: list[tuple[int, str]] = []  # (node id, reason)
        answered: set[str] = set()
        for m in replies:
            answered.add(m.metadata.reply_to_message_id)
            if m.has_error():
                failed.append((sent.get(m.metadata.reply_to_message_id, int(m.metadata.src_node_id)), str(m.error.reason)))
            else:
                status[reply_territory(m, self.node_territories)] = ("ok", "")
        failed += [(node, "no reply within federation.timeout_s") for msg_id, node in sent.items() if msg_id not in answered]
        big = len(self.territory_ids) + 1
        for node, reason in sorted(failed, key=lambda f: (self.node_territories.get(f[0], big), f[0])):
            idx = self.node_territories.get(node)
            self.failures.append({"round": server_round, "phase": phase, "territory": self._tid(idx),
                                  "node_id": node, "reason": reason})
            if idx is not None:
                status[idx] = ("failed", reason)
        self._status[phase] = status

    def _tid(self, idx: int | None) -> str | None:
        return None if idx is None else self.territory_ids.get(idx, str(idx))


class FedLDTAvg(FedLDTStrategy, FedAvg):
    """FedAvg (McMahan et al., AISTATS 2017) over territories, weighted by training windows."""


class FedLDTProx(FedLDTStrategy, FedProx):
    """FedProx (Li et al., MLSys 2020): FedAvg aggregation; the server sends ``proximal-mu`` and
    each territory adds ``mu/2 ||w - w_global||^2`` over the shared parameters to its loss."""


class _ServerOptimizer(FedLDTStrategy):
    """The server optimizer's state, in attributes a checkpoint can save and restore.

    Attributes (Flower's names, kept):
        current_arrays: the global model of this round, key -> array (set by ``configure_train``).
        m_t: first moment, key -> array (``None`` before the first update).
        v_t: second moment, key -> array (``None`` before the first update).
        optimizer_step: ``t``, the number of server optimizer updates made so far (0 before
            the first; a round whose training fails makes none).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer_step = 0

    def checkpoint_state(self) -> State:
        """Adds ``m_t``/``v_t`` (arrays ``m_t/<key>``, ``v_t/<key>``) and :attr:`optimizer_step`.
        ``current_arrays`` is not saved: ``configure_train`` sets it from the global model each round."""
        state = super().checkpoint_state()
        for name in ("m_t", "v_t"):
            moments = getattr(self, name) or {}
            state.arrays.update({f"{name}/{k}": np.asarray(v) for k, v in moments.items()})
            state.meta[name] = list(moments)  # key order
        state.meta["optimizer_step"] = self.optimizer_step
        return state

    def load_checkpoint_state(self, state: State) -> None:
        super().load_checkpoint_state(state)
        for name in ("m_t", "v_t"):
            keys = state.meta.get(name)
            if not isinstance(keys, list) or any(f"{name}/{k}" not in state.arrays for k in keys):
                raise ValueError(f"checkpoint strategy state: '{name}' keys and arrays do not match")
            setattr(self, name, {k: state.arrays[f"{name}/{k}"] for k in keys} or None)
        step = state.meta.get("optimizer_step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"checkpoint strategy state: optimizer_step={step!r} must be an integer >= 0")
        self.optimizer_step = step

    def _aggregate_rule(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super()._aggregate_rule(server_round, replies)
        if arrays is not None:
            self.optimizer_step += 1
        return arrays, metrics


class FedLDTAdam(_ServerOptimizer, FedAdam):
    """FedAdam (Reddi et al., ICLR 2021): Adam on the server over the averaged update
    ``delta_t`` (the example-weighted mean minus the global model), with Adam's bias
    correction (Kingma & Ba, ICLR 2015, Algorithm 1 in its efficient form, end of Sec. 2)::

        m_t = beta_1 m_{t-1} + (1 - beta_1) delta_t          (m_0 = 0)
        v_t = beta_2 v_{t-1} + (1 - beta_2) delta_t^2        (v_0 = 0)
        x_{t+1} = x_t + eta sqrt(1 - beta_2^t) / (1 - beta_1^t) m_t / (sqrt(v_t) + tau)

    with ``t`` = :attr:`optimizer_step`, 1 at the first update. Flower 1.42's ``FedAdam``
    uses the exponent ``server_round + 1`` (2 at the first update), which shrinks the early
    steps; this class keeps Flower's mean and ``m_t`` (``_compute_deltat_and_mt``) and makes
    the step itself.
    """

    def _aggregate_rule(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = FedAvg.aggregate_train(self, server_round, replies)  # the weighted mean; Adam below
        if mean is None:
            return mean, metrics
        delta, m_t, _ = self._compute_deltat_and_mt(mean)  # Flower's: checks keys/shapes, updates self.m_t
        if not self.v_t:
            self.v_t = {k: np.zeros_like(d) for k, d in delta.items()}
        self.v_t = {k: self.beta_2 * v + (1 - self.beta_2) * delta[k] ** 2 for k, v in self.v_t.items()}
        self.optimizer_step += 1
        t = self.optimizer_step
        step = self.eta * np.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)
        new = {k: x + step * m_t[k] / (np.sqrt(self.v_t[k]) + self.tau) for k, x in self.current_arrays.items()}
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}), metrics


class FedLDTYogi(_ServerOptimizer, FedYogi):
    """FedYogi (Reddi et al., ICLR 2021, Algorithm 2): Yogi on the server over the averaged
    update, Flower's rule, without bias correction (as the paper)::

        m_t = beta_1 m_{t-1} + (1 - beta_1) delta_t
        v_t = v_{t-1} - (1 - beta_2) delta_t^2 sign(v_{t-1} - delta_t^2)     (v_0 = 0, Flower)
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
    """


class FedLDTAdagrad(_ServerOptimizer, FedAdagrad):
    """FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2): Adagrad on the server over the
    averaged update, Flower's rule, without bias correction (as the paper). Flower fixes
    ``beta_1 = 0``, so ``m_t = delta_t``::

        m_t = delta_t
        v_t = v_{t-1} + delta_t^2                                            (v_0 = 0, Flower)
        x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
    """


class FedLDTAvgM(FedLDTStrategy, FedAvgM):
    """FedAvgM (Hsu et al., arXiv:1909.06335, 2019): FedAvg with server momentum.

    Its checkpoint state adds Flower's ``momentum_vector`` (a list in the global model's key
    order; arrays ``momentum_vector/<index>``)."""

    def checkpoint_state(self) -> State:
        state = super().checkpoint_state()
        vector = self.momentum_vector or []
        state.arrays.update({f"momentum_vector/{i}": np.asarray(v) for i, v in enumerate(vector)})
        state.meta["momentum_vector"] = len(vector)
        return state

    def load_checkpoint_state(self, state: State) -> None:
        super().load_checkpoint_state(state)
        n = state.meta.get("momentum_vector")
        if isinstance(n, bool) or not isinstance(n, int) or any(f"momentum_vector/{i}" not in state.arrays for i in range(n)):
            raise ValueError("checkpoint strategy state: 'momentum_vector' length and arrays do not match")
        self.momentum_vector = [state.arrays[f"momentum_vector/{i}"] for i in range(n)] or None


class FedLDTMedian(FedLDTStrategy, FedMedian):
    """FedMedian (Yin et al., ICML 2018): coordinate-wise median of the territories' parameters."""


class FedLDTTrimmedAvg(FedLDTStrategy, FedTrimmedAvg):
    """FedTrimmedAvg (Yin et al., ICML 2018): coordinate-wise mean without the ``beta`` tails."""


class FedLDTKrum(FedLDTStrategy, Krum):
    """Krum (Blanchard et al., NeurIPS 2017): the reply closest to its neighbours."""


class FedLDTClipAvg(FedLDTStrategy, FedAvg):
    """FedAvg of norm-clipped updates: each territory's update (its parameters minus the global
    model of the round) is clipped to the median L2 norm of the round's updates, then the
    clipped parameters are averaged as FedAvg does (weighted by training windows).

    With ``n`` replies and ``u_i = w_i - w_global``, ``c = median_i ||u_i||`` (over all shared
    float arrays flattened together; for even ``n`` the mean of the two middle norms) and::

        w_i' = w_global + u_i * min(1, c / ||u_i||)
        w_new = sum_i n_i w_i' / sum_i n_i

    Norm bounding is the defence of Sun, Kairouz, Suresh and McMahan, "Can you really backdoor
    federated learning?", arXiv:1911.07963, 2019; the bound here is the round's median norm (the
    adaptive choice of Andrew et al., "Differentially private learning with adaptive clipping",
    NeurIPS 2021, at the 0.5 quantile, computed exactly since no privacy is sought). While
    fewer than half the territories attack, ``c`` is an honest territory's norm, so one attacker
    moves the average by at most ``n_a c / sum_i n_i`` whatever it sends (a sign-flipped update
    scaled by 10, noise of the parameters' scale); it still moves it, unlike a median, but keeps
    the honest majority's average where their updates agree. The clipping itself is Flower's
    (``flwr.supercore.differential_privacy.compute_clip_model_update``, the FlatClip of
    McMahan et al., arXiv:1710.06963).

    An update whose norm is ``<= c`` (also a zero update) is left unchanged.

    Attributes:
        last_clip: the last round's ``{"clip_norm": c, "update_norms": [||u_i||, ...]}`` (replies
            in territory order; L2 norms in parameter units), for logs and tests.
    """

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._global = {k: np.asarray(a.numpy()) for k, a in arrays.items()}  # the model the updates start from
        return super().configure_train(server_round, arrays, config, grid)

    def _aggregate_rule(self, server_round: int, replies: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        keys = [k for k, a in self._global.items() if np.issubdtype(a.dtype, np.floating)]
        base = [self._global[k].astype(np.float64) for k in keys]
        params = []
        for m in replies:
            rec = next(iter(m.content.array_records.values()))
            params.append([rec[k].numpy().astype(np.float64) for k in keys])
        norms = [get_norm([w - g for w, g in zip(p, base)]) for p in params]
        clip = float(np.median(norms)) if norms else 0.0
        for m, p, norm in zip(replies, params, norms):
            if norm <= clip:
                continue
            compute_clip_model_update(p, base, clip)  # p := base + clipped (p - base), in place
            key = next(iter(m.content.array_records))
            rec = m.content.array_records[key]
            m.content[key] = ArrayRecord({k: (Array(np.ascontiguousarray(p[keys.index(k)].astype(rec[k].numpy().dtype)))
                                              if k in keys else rec[k]) for k in rec.keys()})
        self.last_clip = {"clip_norm": clip, "update_norms": norms}
        return super()._aggregate_rule(server_round, replies)


#: Rules that step the global model with a server optimizer (see ``FedLDTStrategy.buffer_keys``).
_SERVER_OPTIMIZERS = (FedOpt, FedAvgM)

#: ``strategy.name`` -> strategy class.
STRATEGIES: dict[str, type] = {
    "fedavg": FedLDTAvg, "fedprox": FedLDTProx, "fedadam": FedLDTAdam, "fedyogi": FedLDTYogi,
    "fedadagrad": FedLDTAdagrad, "fedavgm": FedLDTAvgM, "fedmedian": FedLDTMedian,
    "fedtrimmedavg": FedLDTTrimmedAvg, "krum": FedLDTKrum, "fedclipavg": FedLDTClipAvg,
}
def build_strategy(strategy_cfg: Mapping[str, Any], **fedldt_args: Any) -> FedLDTStrategy:
    """Build the strategy named by ``strategy_cfg["name"]`` with its Flower options.

    Args:
        strategy_cfg: the ``strategy`` config block (``conf/strategy/<name>.yaml``), e.g.
            ``{"name": "fedprox", "proximal_mu": 0.01}``.
        **fedldt_args: the :class:`FedLDTStrategy` arguments (``territory_ids``, ...) and
            ``min_*_nodes``.

    Raises:
        ValueError: see :func:`strategy_arguments`; ``krum`` with ``n <= 2 f + 2`` territories
            (``f`` = ``num_malicious_nodes``; Blanchard et al.'s condition).
    """
    args = strategy_arguments(strategy_cfg)
    n = len(fedldt_args.get("territory_ids", {}))
    if strategy_cfg["name"] == "krum" and n <= 2 * int(args.get("num_malicious_nodes", 0)) + 2:
        raise ValueError(f"strategy 'krum' needs more than 2*num_malicious_nodes+2 territories; the pilot has {n} "
                         f"(strategy.num_malicious_nodes={args.get('num_malicious_nodes', 0)})")
    if strategy_cfg["name"] == "fedtrimmedavg" and int(float(args.get("beta", 0.2)) * n) == 0:
        print(f"[fedldt] WARNING: fedtrimmedavg with beta={args.get('beta', 0.2)} trims int(beta*{n}) = 0 territories "
              "per side: with this many territories it is a plain unweighted mean", flush=True)
    return STRATEGIES[strategy_cfg["name"]](fraction_train=1.0, fraction_evaluate=1.0, **args, **fedldt_args)


class TerritoryDP(DifferentialPrivacyServerSideFixedClipping):
    """Territory-level DP around a fedldt FedAvg/FedProx strategy: Flower's
    ``DifferentialPrivacyServerSideFixedClipping`` (McMahan et al., ICLR 2018; Andrew et al.,
    NeurIPS 2021 for the Flower wrapper's papers) with fedldt's reply checks kept.

    Flower's wrapper skips a round silently when a reply has an error, clips replies in their
    own key order and averages them weighted by ``num-examples``. This subclass keeps Flower's
    configure step, its clipping (``compute_clip_model_update``) and its noise
    (``_add_noise_to_aggregated_arrays``: std ``noise_multiplier * clipping_norm / n``), and
    around them:

    * runs :meth:`FedLDTStrategy.checked_train_replies` first (failures recorded, territories
      named, ``min_train_territories`` enforced, arrays checked and ordered by name);
    * averages the clipped updates *unweighted* (each reply's ``num-examples`` set to 1 for
      the rule; the history keeps the real counts): the noise is calibrated to a mean of ``n``
      equal-weight updates, ``n`` = the territories that trained this round;
    * seeds the noise from the run seed and the round (:func:`fedldt.engine.derive_seed`);
    * composes the round in the ledger (:class:`fedldt.privacy.PrivacyLedger`, on the wrapped
      strategy's ``privacy``) after the noisy aggregate is made.

    Args:
        strategy: a :class:`FedLDTAvg` or :class:`FedLDTProx` whose ``privacy`` ledger is set.
        seed: the run seed.
    """

    def __init__(self, strategy: FedLDTStrategy, seed: int) -> None:
        ledger = strategy.privacy
        if ledger is None or ledger.privacy["mode"] != "territory":
            raise ValueError("TerritoryDP needs a strategy whose privacy ledger has mode 'territory'")
        if not isinstance(strategy, (FedLDTAvg, FedLDTProx)) or isinstance(strategy, _SERVER_OPTIMIZERS):
            raise ValueError(f"territory-level DP needs FedAvg or FedProx, not {type(strategy).__name__}")
        super().__init__(strategy, float(ledger.privacy["noise_multiplier"]), float(ledger.privacy["clipping_norm"]),
                         num_sampled_clients=len(strategy.territory_ids))
        self.seed = int(seed)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        fed: FedLDTStrategy = self.strategy
        contributing = fed.checked_train_replies(server_round, replies)
        if not contributing:
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        for m in contributing:
            key, record = next(iter(m.content.array_records.items()))
            clipped = record.to_numpy_ndarrays()
            compute_clip_model_update(param1=clipped, param2=current, clipping_norm=self.clipping_norm)
            m.content[key] = ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(record.keys(), clipped, strict=True)})
        trained = fed.trained_windows(contributing)
        for m in contributing:  # equal weights: the noise below is calibrated to an unweighted mean
            next(iter(m.content.metric_records.values()))[WEIGHT_KEY] = 1
        arrays, metrics = fed.aggregate_checked(server_round, contributing)
        if arrays is None:
            return arrays, metrics
        self.num_sampled_clients = len(contributing)
        state = np.random.get_state()  # Flower draws the noise from numpy's global generator
        try:
            np.random.seed(derive_seed(self.seed, server_round, NOISE_STREAM) % 2**32)
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        finally:
            np.random.set_state(state)
        fed.privacy.record_round(server_round, trained)
        return fed._conform(server_round, arrays), metrics

    # the run reads the wrapped strategy's records
    @property
    def history(self) -> list[dict[str, Any]]:
        return self.strategy.history

    @property
    def rounds(self) -> list[dict[str, Any]]:
        return self.strategy.rounds

    @property
    def failures(self) -> list[dict[str, Any]]:
        return self.strategy.failures

    @property
    def privacy(self) -> PrivacyLedger | None:
        return self.strategy.privacy


#: derive_seed stream of the server's DP noise (distinct from territories' training seeds).
NOISE_STREAM = 0xD1F


def with_privacy(strategy: FedLDTStrategy, cfg: Mapping[str, Any]) -> FedLDTStrategy | TerritoryDP:
    """The run's strategy with its privacy: unchanged for ``privacy.mode: none``; with a
    :class:`fedldt.privacy.PrivacyLedger` for ``sample`` (the territories run DP-SGD); wrapped
    in :class:`TerritoryDP` for ``territory``.

    Raises:
        fedldt.privacy.PrivacyConfigError: see :func:`fedldt.privacy.check_privacy_config`.
    """
    p = cfg.get("privacy") or {"mode": "none"}
    if p["mode"] == "none":
        return strategy
    check_privacy_config(cfg)
    strategy.privacy = PrivacyLedger(p, cfg["train"])
    return TerritoryDP(strategy, int(cfg["seed"])) if p["mode"] == "territory" else strategy
