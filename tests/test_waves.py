"""``federation.max_in_flight``: the ServerApp sends in waves (server.rounds.WaveGrid), with the
same results as sending everything at once (a real in-process federation: fedldt's ClientApp on
three territories of synthetic Los-loop-like data)."""

from __future__ import annotations

import pytest

from fedldt.config import compose_config, resolve_config
from fedldt.schema import ConfigError
from tests.conftest import write_los_loop_like


def _run(tmp_path, name, *overrides):
    from clients.client_app import app
    from server.rounds import run_federated
    from tests.inprocess import InProcessGrid

    class CountingGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            self.calls.append(len(messages))
            return super().send_and_receive(messages, timeout=timeout)

    folder = write_los_loop_like(tmp_path / "syn", num_steps=500)
    cfg = resolve_config(compose_config(["pilot=los_loop_3", f"dataset.path={folder}", "partition.num_territories=3",
                                         "train.rounds=2", "task.train_stride=6", "model.hidden=8", *overrides]))
    grid = CountingGrid(app, {10 + i: {"partition-id": i, "out-dir": str(tmp_path / f"{name}-out-{i}")} for i in range(3)})
    grid.calls = []
    return run_federated(grid, cfg, tmp_path / name), grid


def test_waves_bound_the_messages_out_and_keep_the_results(tmp_path):
    together, grid_all = _run(tmp_path, "all")
    waves, grid_waves = _run(tmp_path, "waves", "federation.max_in_flight=2")
    assert max(grid_all.calls) == 3  # discovery, each round's train and evaluate, the final test: 3 at once
    assert grid_waves.calls and max(grid_waves.calls) <= 2 and grid_waves.calls.count(1) >= 4  # 3 = 2 + 1 each time
    assert sum(grid_waves.calls) == sum(grid_all.calls)  # the same messages, in waves
    for key in ("test_mae", "val_mae"):
        if key in together:
            assert waves[key] == pytest.approx(together[key], rel=1e-6)
    assert waves["test_per_territory"] == together["test_per_territory"]


def test_max_in_flight_must_be_a_positive_integer():
    for bad in ("0", "-3", "2.5"):
        with pytest.raises(ConfigError, match="max_in_flight"):
            resolve_config(compose_config(["pilot=los_loop_3", f"federation.max_in_flight={bad}"]), require_data=False)


def test_no_wave_is_sent_after_the_timeout():
    from server.rounds import WaveGrid

    class SlowGrid:  # a grid whose every exchange takes 0.2 s (the replies are the messages)
        def __init__(self):
            self.sent = []

        def send_and_receive(self, messages, *, timeout=None):
            import time
            time.sleep(0.2)
            self.sent.append(list(messages))
            return list(messages)

    inner = SlowGrid()
    replies = WaveGrid(inner, 2).send_and_receive(list(range(10)), timeout=0.3)
    assert len(inner.sent) == 2 and replies == [0, 1, 2, 3]  # the third wave would start past the deadline
    assert WaveGrid(SlowGrid(), 4).send_and_receive(list(range(10))) == list(range(10))  # no timeout: all waves
    assert WaveGrid(SlowGrid(), 4).send_and_receive([], timeout=1.0) == []
