"""``train_loss`` is one windows-weighted mean in every mode: over a territory's batches (a short
last batch counts for its windows) and over territories (their training windows)."""

import numpy as np
import pytest
import torch

from fedldt.engine import TerritoryTask, masked_mae_loss, train_epochs
from fedldt.metrics import MetricSums, windows_weighted_mean
from fedldt.models import build_model
from fedldt.results import NO_VALID_TARGET, NOT_AVAILABLE, history_row, round_row
from tests.test_engine import _ramp_dataset


def test_windows_weighted_mean_known_numbers():
    # territory A: loss 1.0 over 10 windows, B: 4.0 over 30, C: no window -> (10 + 120) / 40
    assert windows_weighted_mean([(1.0, 10), (4.0, 30), (9.0, 0)]) == 3.25  # the unweighted mean would be 2.5
    assert windows_weighted_mean([]) is None and windows_weighted_mean([(2.0, 0)]) is None
    with pytest.raises(ValueError, match="window count -1"):
        windows_weighted_mean([(1.0, -1)])


def test_round_row_weights_territories_by_training_windows():
    sums = MetricSums.zeros(2)
    sums.abs_err_sum[:] = [3.0, 6.0]
    sums.num_valid[:] = [3, 3]
    row = round_row(4, [(1.0, 10), (4.0, 30)], {"a": sums, "b": MetricSums.zeros(2)}, [2])
    assert row["round"] == 4 and row["train_loss"] == 3.25
    assert row["val"]["mae"] == {"h2": 2.0, "all": 1.5}  # b has no valid target: it adds nothing
    assert row["val_not_available"] == ["b"]


def test_history_row_is_the_same_for_every_mode():
    row = history_row(2, "b", [1], train=(0.5, 7), val=MetricSums.zeros(1))
    assert list(row)[:4] == ["round", "territory", "train_loss", "num_train"]
    assert list(row)[-3:] == ["train_status", "eval_status", "error"]
    assert (row["train_loss"], row["num_train"], row["val_mae_h1"]) == (0.5, 7, None)
    assert row["eval_status"] == NOT_AVAILABLE and row["error"] == f"evaluate: {NO_VALID_TARGET}"
    failed = history_row(2, "c", [1], train_status="failed", train_error="boom", eval_status="not sampled")
    assert failed["train_loss"] is None and failed["error"] == "train: boom" and "val_mae_h1" not in failed


def test_train_epochs_returns_the_windows_weighted_mean_of_its_batches():
    # 200 hourly steps, window 4, horizon 2, split 0.7: 140 - 5 = 135 training windows in
    # batches of 32: four of 32 and a short last one of 7
    task = TerritoryTask(_ramp_dataset(), window=4, horizon=2, time_of_day=False, batch_size=32)
    torch.manual_seed(0)
    model = build_model(dict(name="dcrnn", hidden=4, num_layers=1, K=1, **task.model_dims()))
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # the weights stay put: each batch loss is known
    loss = train_epochs(model, opt, [(task, 7)], epochs=1, seed=7, grad_clip=None)
    pairs = []
    with torch.no_grad():
        for b in task.loader("train", shuffle=True, seed=7):
            pairs.append((float(masked_mae_loss(model(b.x, task.edge_index, task.edge_weight), b.y_scaled, b.mask)),
                          b.x.shape[0]))
    sizes = [n for _, n in pairs]
    assert sum(sizes) == task.num_windows("train") and sizes[-1] < sizes[0]
    expected = sum(v * n for v, n in pairs) / sum(sizes)
    assert loss == pytest.approx(expected, rel=1e-6)
    assert abs(expected - np.mean([v for v, _ in pairs])) > 1e-4  # the plain batch mean is another number
