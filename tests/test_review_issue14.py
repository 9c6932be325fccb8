"""Review of issue 14 (a breaker's findings, each a known defect fixed): forged fine-tuning replies,
forged personal models, hold-out and contribution names checked before any training, long
values kept out of messages."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedldt.config import compose_config, resolve_config
from server.strategy import FederationError


def _cfg(*overrides: str) -> dict:
    return resolve_config(compose_config(["pilot=los_loop_3", *overrides]), require_data=False)


# ------------------------------------------------------------------ forged fine-tuning replies (server side)
def _hostile_territory(metrics_of):
    """A territory that does not run fedldt's ClientApp: it answers every message with the metric
    record ``metrics_of(node)`` (no egress mod between it and the server)."""
    def app(msg: Message, context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord(metrics_of(int(context.node_id)))}), reply_to=msg)
    return app


def _finetune(metrics_of):
    from server.rounds import finetune_territories
    from tests.inprocess import InProcessGrid

    grid = InProcessGrid(_hostile_territory(metrics_of), {10: {"partition-id": 0}, 11: {"partition-id": 1}})
    arrays = ArrayRecord({"w": torch.zeros(2)})
    return finetune_territories(grid, {0: 10, 1: 11}, arrays, _cfg(), timeout=5.0, **{"run-key": "0" * 32})


def _good(node: int) -> dict:
    return {"territory": node - 10, "kept": 1, "val_mae_global": 2.5, "val_mae_finetuned": 2.0, "epochs_run": 3}


def test_an_honest_finetune_reply_is_accepted():
    from server.rounds import finetune_result

    out = _finetune(_good)
    assert sorted(out) == [0, 1]
    assert finetune_result(out[1]) == {"kept": "finetuned", "val_mae_global": 2.5, "val_mae_finetuned": 2.0,
                                       "epochs_run": 3}
    # no computable validation MAE: the keys are absent, the result holds None
    assert finetune_result({"territory": 0, "kept": 0, "epochs_run": 0})["val_mae_global"] is None


@pytest.mark.parametrize("forged, match", [
    ({"kept": -1}, "'kept' must be finite and >= 0"),  # was read as KEPT[-1] = "finetuned"
    ({"kept": 2}, "'kept' must be 0"),  # was an IndexError
    ({"val_mae_global": math.nan}, "'val_mae_global' must be finite"),  # was a crash writing summary.json at the end
    ({"val_mae_finetuned": math.inf}, "'val_mae_finetuned' must be finite"),
    ({"epochs_run": -5}, "'epochs_run' must be finite and >= 0"),
    ({"epochs_run": 2.5}, "'epochs_run' must be int"),
    ({"secret": 1.0}, "keys not in the allow-list"),
    ({"territory": 0}, "answered for territory 0"),  # node 11 claims territory 0
])
def test_a_forged_finetune_reply_is_refused_naming_the_node(forged, match):
    def metrics_of(node):
        return {**_good(node), **forged} if node == 11 else _good(node)

    with pytest.raises(FederationError, match=match) as e:
        _finetune(metrics_of)
    assert "node 11" in str(e.value)
