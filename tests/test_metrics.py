"""Known answers and invariants of the masked metrics and their exact pooling."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedldt.metrics import MetricSums, mae, mape, masked_error_sums, pool, report, rmse


def _sums(y, y_hat, mask=None):
    """Sums of flat vectors, as a batch of one sample with one horizon step."""
    y = np.asarray(y, dtype=float)[None, None, :]
    y_hat = np.asarray(y_hat, dtype=float)[None, None, :]
    m = (y != 0).astype(float) if mask is None else np.asarray(mask, dtype=float)[None, None, :]
    return masked_error_sums(y_hat, y, m)


def test_known_answer_mae_rmse_mape_with_missing_zero():
    s = _sums([0, 2, 4], [1, 1, 1])  # 0 = missing
    assert mae(s) == pytest.approx(2.0)
    assert rmse(s) == pytest.approx(2.2361, abs=1e-4)
    assert mape(s) == pytest.approx(0.625)


def test_all_missing_batch_contributes_nothing():
    base = _sums([0, 2, 4], [1, 1, 1])
    empty = _sums([0, 0, 0], [5, 5, 5])
    assert int(empty.num_valid.sum()) == 0 and float(empty.abs_err_sum.sum()) == 0.0
    assert mae(empty) is None and rmse(empty) is None and mape(empty) is None  # undefined, not 0
    pooled = pool([base, empty])
    assert mae(pooled) == pytest.approx(2.0)
    assert rmse(pooled) == pytest.approx(np.sqrt(5.0))


def test_two_clients_pool_to_exact_mae_not_mean_of_means():
    a = _sums([0, 0, 0, 10], [9, 9, 9, 8])  # 1 valid target, error 2
    b = _sums([5, 5, 5, 5], [4, 4, 4, 4])  # 4 valid targets, error 1 each
    assert mae(a) == pytest.approx(2.0) and mae(b) == pytest.approx(1.0)
    assert mae(pool([a, b])) == pytest.approx(1.2)
    # RMSE pools through squared sums: sqrt((4 + 4) / 5)
    assert rmse(pool([a, b])) == pytest.approx(np.sqrt(8 / 5))


def test_per_horizon_step_mae():
    y = np.arange(1, 13, dtype=float).reshape(1, 12, 1, 1)  # y = 1..12 over the horizon
    s = masked_error_sums(np.zeros_like(y), y, np.ones_like(y))
    assert mae(s, 3) == pytest.approx(3.0)  # 15-min step at 5-min data
    assert mae(s, 12) == pytest.approx(12.0)
    assert mae(s) == pytest.approx(6.5)
    r = report(s, [3, 6, 12])
    assert r["mae"]["h3"] == pytest.approx(3.0) and r["mae"]["h6"] == pytest.approx(6.0)
    assert r["mape"]["h3"] == pytest.approx(1.0)


def test_masked_nan_target_is_ignored():
    y = np.array([[[np.nan, 2.0]]])
    s = masked_error_sums(np.array([[[1.0, 1.0]]]), y, np.array([[[0.0, 1.0]]]))
    assert mae(s) == pytest.approx(1.0)


def test_report_rejects_steps_beyond_horizon():
    with pytest.raises(ValueError, match="outside the horizon"):
        report(MetricSums.zeros(12), [3, 24])


def test_record_round_trip_keeps_dtypes():
    s = _sums([0, 2, 4], [1, 1, 1])
    back = MetricSums.from_dict(s.to_dict("model."), "model.")
    assert back.num_valid.dtype == np.int64 and back.abs_err_sum.dtype == np.float64
    assert mae(back) == mae(s)
    with pytest.raises(KeyError, match="model.ape_sum"):
        MetricSums.from_dict({k: v for k, v in s.to_dict("model.").items() if k != "model.ape_sum"}, "model.")


@settings(max_examples=50, deadline=None)
@given(
    st.integers(min_value=1, max_value=20),
    st.integers(min_value=1, max_value=19),
    st.integers(min_value=0, max_value=2**16),
)
def test_pooling_split_batches_equals_whole(n, cut, seed):
    """Summing per-part sums equals computing on the whole batch, whatever the split."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(-5, 5, size=(n + 1, 3, 4, 1))
    y_hat = rng.uniform(-5, 5, size=y.shape)
    m = (rng.uniform(size=y.shape) > 0.3).astype(float)
    cut = min(cut, n)
    whole = masked_error_sums(y_hat, y, m)
    parts = pool([masked_error_sums(y_hat[:cut], y[:cut], m[:cut]), masked_error_sums(y_hat[cut:], y[cut:], m[cut:])])
    np.testing.assert_allclose(parts.abs_err_sum, whole.abs_err_sum, rtol=1e-12)
    np.testing.assert_array_equal(parts.num_valid, whole.num_valid)
    if whole.num_valid.sum() > 0:
        assert mae(parts) <= rmse(parts) + 1e-12  # MAE never exceeds RMSE


def test_wape_is_scale_free_and_pools_exactly():
    from fedldt.metrics import wape

    small = _sums([1, 2, 3], [2, 3, 4], mask=[1, 1, 1])   # errors 3 over targets 6
    big = _sums([100, 200, 300], [200, 300, 400], mask=[1, 1, 1])  # errors 300 over 600
    assert wape(small) == pytest.approx(0.5) and wape(big) == pytest.approx(0.5)
    assert wape(pool([small, big])) == pytest.approx(303 / 606)
    assert wape(_sums([0, 0], [1, 1])) is None  # no valid target
