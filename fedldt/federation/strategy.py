"""FedAvg for territories: deterministic reply order, per-territory history, exact metrics.

``FedLDTAvg`` subclasses Flower's :class:`flwr.serverapp.strategy.FedAvg` (McMahan et al.,
AISTATS 2017) and only overrides its aggregation hooks; the round loop is Flower's.
"""

from __future__ import annotations

from typing import Any, Iterable

from flwr.app import Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from fedldt.metrics import MetricSums, pool, report


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

    Args:
        territory_ids: territory index -> id (e.g. ``{0: "t0"}``), for the history.
        report_steps: horizon steps logged per round.
        num_rounds: total rounds (for the progress line).
        **kwargs: passed to :class:`FedAvg`.

    Attributes:
        history: one dict per (round, territory): train loss and validation metrics.
        rounds: one dict per round: mean train loss and pooled validation metrics.
        failures: one dict per failed reply (round, phase, node id, reason).
    """

    def __init__(self, *, territory_ids: dict[int, str], report_steps: list[int], num_rounds: int, **kwargs: Any) -> None:
        super().__init__(weighted_by_key="num-examples", **kwargs)
        self.territory_ids = territory_ids
        self.report_steps = list(report_steps)
        self.num_rounds = num_rounds
        self.history: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self._train: dict[int, dict[str, float]] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = _sorted(replies)
        self._record_failures(server_round, "train", replies)
        ok = [m for m in replies if not m.has_error()]
        self._train = {}
        for m in ok:
            rec = next(iter(m.content.metric_records.values()))
            self._train[reply_territory(m)] = {"train_loss": float(rec["train_loss"]), "num_train": int(rec["num-examples"])}
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = _sorted(replies)
        self._record_failures(server_round, "evaluate", replies)
        per: dict[int, MetricSums] = {}
        for m in replies:
            if not m.has_error():
                per[reply_territory(m)] = MetricSums.from_dict(next(iter(m.content.metric_records.values())), "model.")
        for idx in sorted(set(per) | set(self._train)):
            row: dict[str, Any] = {"round": server_round, "territory": self.territory_ids.get(idx, str(idx))}
            row.update(self._train.get(idx, {"train_loss": None, "num_train": None}))
            row.update(_flat(report(per[idx], self.report_steps), "val_") if idx in per else {})
            self.history.append(row)
        if not per:
            return None
        pooled = report(pool(per.values()), self.report_steps)
        losses = [v["train_loss"] for v in self._train.values()]
        mean_loss = sum(losses) / len(losses) if losses else None
        self.rounds.append({"round": server_round, "train_loss": mean_loss, "val": pooled})
        per_mae = "  ".join(f"{self.territory_ids.get(i, i)}={report(s, [])['mae']['all']:.3f}" for i, s in per.items())
        print(
            f"[fedldt] round {server_round}/{self.num_rounds}  train loss {mean_loss:.4f}  "
            f"val MAE {pooled['mae']['all']:.3f} (h{self.report_steps[-1]} {pooled['mae'][f'h{self.report_steps[-1]}']:.3f})  "
            f"per territory: {per_mae}",
            flush=True,
        )
        return MetricRecord({k: v for k, v in _flat(pooled, "val_").items() if v is not None})

    def _record_failures(self, server_round: int, phase: str, replies: list[Message]) -> None:
        for f in failure_reasons(replies):
            self.failures.append({"round": server_round, "phase": phase, **f})


def _flat(block: dict[str, dict[str, float | None]], prefix: str) -> dict[str, float | None]:
    """``{"mae": {"h3": x}}`` -> ``{"<prefix>mae_h3": x}``."""
    return {f"{prefix}{metric}_{step}": v for metric, steps in block.items() for step, v in steps.items()}
