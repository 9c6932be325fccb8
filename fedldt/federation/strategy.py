"""FedAvg for territories: deterministic reply order, per-territory history, exact metrics.

``FedLDTAvg`` subclasses Flower's :class:`flwr.serverapp.strategy.FedAvg` (McMahan et al.,
AISTATS 2017) and only overrides its aggregation hooks; the round loop is Flower's.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedldt.metrics import MetricSums, pool, report


class FederationError(RuntimeError):
    """The federation cannot go on (missing territories, too few replies); the message says why."""


def reply_territory(msg: Message) -> int:
    """The territory index a (non-error) reply carries in its metrics."""
    record = next(iter(msg.content.metric_records.values()))
    return int(record["territory"])


def _sorted(replies: Iterable[Message]) -> list[Message]:
    # Replies arrive in any order; summing floats in a fixed order makes runs repeatable.
    return sorted(replies, key=lambda m: (1, m.metadata.src_node_id) if m.has_error() else (0, reply_territory(m)))


def failure_reasons(replies: Iterable[Message]) -> list[dict[str, Any]]:
    """``[{"node_id", "reason"}]`` of the replies that carry an error."""
    return [{"node_id": int(m.metadata.src_node_id), "reason": str(m.error.reason)} for m in replies if m.has_error()]


class FedLDTAvg(FedAvg):
    """FedAvg weighted by training windows (``num-examples``) that records every territory.

    Flower drops failed replies silently; this strategy records each one with its territory
    (``failures``, and a row in ``history``) and stops the run when fewer than
    ``min_train_territories`` territories trained successfully in a round.

    Args:
        territory_ids: territory index -> id (e.g. ``{0: "t0"}``), for the history.
        report_steps: horizon steps logged per round.
        num_rounds: total rounds (for the progress line).
        node_territories: SuperNode id -> territory index (from discovery), to name the
            territory of a failed reply (error replies carry no metrics; a SuperLink-made
            "node unavailable" reply does not even carry the node's id).
        min_train_territories: successful training replies a round needs (default: all
            territories in ``territory_ids``).
        **kwargs: passed to :class:`FedAvg`.

    Attributes:
        history: one dict per (round, territory): train loss, validation metrics and status
            (``train_status``/``eval_status`` = ``ok``, ``failed`` or ``not sampled``; ``error``).
        rounds: one dict per round: mean train loss and pooled validation metrics.
        failures: one dict per failed or missing reply (round, phase, territory, node id, reason).

    Raises:
        FederationError: (from :meth:`aggregate_train`) too few territories trained in a round.
    """

    def __init__(self, *, territory_ids: dict[int, str], report_steps: list[int], num_rounds: int,
                 node_territories: dict[int, int] | None = None, min_train_territories: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(weighted_by_key="num-examples", **kwargs)
        self.territory_ids = territory_ids
        self.report_steps = list(report_steps)
        self.num_rounds = num_rounds
        self.node_territories = dict(node_territories or {})
        self.min_train_territories = len(territory_ids) if min_train_territories is None else int(min_train_territories)
        self.history: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._train: dict[int, dict[str, float]] = {}
        self._sent: dict[str, list[Message]] = {"train": [], "evaluate": []}
        self._status: dict[str, dict[int, tuple[str, str]]] = {"train": {}, "evaluate": {}}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        # Keep the messages: Flower sets their ids when it sends them, and replies point back.
        self._sent["train"] = list(super().configure_train(server_round, arrays, config, grid))
        return self._sent["train"]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._sent["evaluate"] = list(super().configure_evaluate(server_round, arrays, config, grid))
        return self._sent["evaluate"]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = _sorted(replies)
        self._record_failures(server_round, "train", replies)
        ok = [m for m in replies if not m.has_error()]
        self._train = {}
        for m in ok:
            rec = next(iter(m.content.metric_records.values()))
            self._train[reply_territory(m)] = {"train_loss": float(rec["train_loss"]), "num_train": int(rec["num-examples"])}
        if len(ok) < self.min_train_territories:
            failed = [f for f in self.failures if f["round"] == server_round and f["phase"] == "train"]
            raise FederationError(
                f"round {server_round}: only {len(ok)} of {len(self.territory_ids)} territories trained, fewer than "
                f"federation.min_train_territories={self.min_train_territories}; failures: {failed}"
            )
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = _sorted(replies)
        self._record_failures(server_round, "evaluate", replies)
        per: dict[int, MetricSums] = {}
        for m in replies:
            if not m.has_error():
                per[reply_territory(m)] = MetricSums.from_dict(next(iter(m.content.metric_records.values())), "model.")
        known = set(per) | set(self._train) | set(self._status["train"]) | set(self._status["evaluate"])
        for idx in sorted(known | set(self.territory_ids)):
            row: dict[str, Any] = {"round": server_round, "territory": self.territory_ids.get(idx, str(idx))}
            row.update(self._train.get(idx, {"train_loss": None, "num_train": None}))
            row.update(_flat(report(per[idx], self.report_steps), "val_") if idx in per else {})
            train_status, train_err = self._status["train"].get(idx, ("not sampled", ""))
            eval_status, eval_err = self._status["evaluate"].get(idx, ("not sampled", ""))
            row.update(train_status=train_status, eval_status=eval_status,
                       error="; ".join(f"{p}: {e}" for p, e in (("train", train_err), ("evaluate", eval_err)) if e))
            self.history.append(row)
        self._status = {"train": {}, "evaluate": {}}
        if not per:
            return None
        pooled = report(pool(per.values()), self.report_steps)
        losses = [v["train_loss"] for v in self._train.values()]
        mean_loss = sum(losses) / len(losses) if losses else None
        self.rounds.append({"round": server_round, "train_loss": mean_loss, "val": pooled})
        per_mae = "  ".join(f"{self.territory_ids.get(i, i)}={report(s, [])['mae']['all']:.3f}" for i, s in per.items())
        loss_txt = "n/a" if mean_loss is None else f"{mean_loss:.4f}"
        print(
            f"[fedldt] round {server_round}/{self.num_rounds}  train loss {loss_txt}  "
            f"val MAE {pooled['mae']['all']:.3f} (h{self.report_steps[-1]} {pooled['mae'][f'h{self.report_steps[-1]}']:.3f})  "
            f"per territory: {per_mae}",
            flush=True,
        )
        return MetricRecord({k: v for k, v in _flat(pooled, "val_").items() if v is not None})

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
                status[reply_territory(m)] = ("ok", "")
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


def _flat(block: dict[str, dict[str, float | None]], prefix: str) -> dict[str, float | None]:
    """``{"mae": {"h3": x}}`` -> ``{"<prefix>mae_h3": x}``."""
    return {f"{prefix}{metric}_{step}": v for metric, steps in block.items() for step, v in steps.items()}
