"""ONNX export of every model on a small synthetic territory: ONNX Runtime matches PyTorch (the
training path, with its sparse / PyG graph products) within a tolerance relative to the data's
scale; a model without a fixed-graph path is refused with a clear message. No Flower run."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from fedldt.data.windows import MaskedStandardScaler, time_features
from fedldt.delivery.onnx_export import (NotExportable, FixedGraphForecaster, export_onnx, parity_error,
                                         parity_tolerance)
from fedldt.models import MODELS, build_model
from fedldt.models.stgcn import STConvBlock, scaled_laplacian, undirected_graph
from tests.test_models_zoo import SMALL  # the same small versions of each model

N, W, H, BATCH = 7, 12, 3, 5


def _territory(seed=0, scale=2000.0):
    """A directed graph with asymmetric weights (one pair given both ways with different weights)
    and counts around ``scale`` (the case where a fixed absolute tolerance fails)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 3, 2])
    dst = torch.tensor([1, 2, 3, 4, 5, 6, 0, 3, 0, 1])
    ew = 0.2 + torch.rand(len(src), generator=g)
    rng = np.random.default_rng(seed)
    values = (scale * (1 + 0.3 * rng.standard_normal((BATCH, W, N, 1)))).astype(np.float32)
    mask = (rng.random((BATCH, W, N, 1)) > 0.1).astype(np.float32)
    values[mask == 0] = 0.0  # missing entries: any finite number
    times = pd.date_range("2024-03-04 06:00", periods=W + BATCH, freq="5min")
    cal_all = time_features(times, True, False)  # [T, 2]
    calendar = np.stack([cal_all[i:i + W] for i in range(BATCH)]).astype(np.float32)  # [B, W, 2]
    scaler = MaskedStandardScaler(per_node=True).fit(values.reshape(-1, N, 1), mask.reshape(-1, N, 1))
    return torch.stack([src, dst]), ew, values, mask, calendar, scaler


def _pytorch_reference(model, ei, ew, scaler, values, mask, calendar):
    """The training path: the model's own forward (sparse / PyG products), scaled in, data units out."""
    mean, std = scaler.mean[0], scaler.std[0]  # [N, 1]
    scaled = (values - mean) / std * mask
    cal = np.broadcast_to(calendar[:, :, None, :], (*calendar.shape[:2], N, calendar.shape[-1]))
    x = torch.from_numpy(np.concatenate([scaled, cal], axis=-1).astype(np.float32))
    with torch.no_grad():
        y = model(x, ei, ew).numpy()
    return y * std + mean


@pytest.mark.parametrize("key", sorted(SMALL))
def test_every_model_exports_to_onnx_and_matches_pytorch_within_the_relative_tolerance(key, tmp_path):
    ei, ew, values, mask, calendar, scaler = _territory(seed=1)
    torch.manual_seed(3)
    model = build_model({**SMALL[key], "in_channels": 3, "out_channels": 1, "horizon": H}, num_nodes=N).eval()
    reference = _pytorch_reference(model, ei, ew, scaler, values, mask, calendar)
    wrapper = FixedGraphForecaster(model, ei, ew, N, scaler)
    path = export_onnx(wrapper, tuple(torch.from_numpy(a[:2]) for a in (values, mask, calendar)), tmp_path / "m.onnx")
    err = parity_error(path, reference, values, mask, calendar)  # batch 5, exported with batch 2
    tol = parity_tolerance(values[mask > 0])
    assert 0.19 < tol < 0.21  # counts around 2000: 1e-4 * ~2000
    assert err <= tol, (key, err, tol)
    assert np.abs(reference).mean() > 1000  # outputs are in data units, not scaled units
    # the comparison can fail: a different graph gives different forecasts, far outside the tolerance
    other = FixedGraphForecaster(model, ei, ew * torch.linspace(0.1, 3.0, len(ew)), N, scaler)
    export_onnx(other, tuple(torch.from_numpy(a[:2]) for a in (values, mask, calendar)), tmp_path / "other.onnx")
    assert parity_error(tmp_path / "other.onnx", reference, values, mask, calendar) > 2 * tol


def test_every_registered_model_has_a_fixed_graph_path():
    """A new model in fedldt.models.MODELS must bring graph_operators/forward_dense (or export refuses it)."""
    for name, (cls, _) in MODELS.items():
        assert callable(getattr(cls, "graph_operators", None)) and callable(getattr(cls, "forward_dense", None)), name


def test_stgcn_dense_laplacian_is_pygs_chebconv_operator():
    """Known answer: for the undirected graph, L~ = -D^-1/2 A D^-1/2 (lambda_max = 2), and a
    block's spatial step with it (dense, as exported, or sparse, as trained) equals PyG's ChebConv one."""
    ei = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    ew = torch.tensor([1.0, 1.0, 4.0, 4.0])  # path 0 -1- 1 -4- 2; degrees 1, 5, 4
    lap = scaled_laplacian(ei, ew, 3)
    d = torch.tensor([1.0, 5.0, 4.0]).rsqrt()
    a = torch.tensor([[0, 1, 0], [1, 0, 4], [0, 4, 0]], dtype=torch.float32)
    assert torch.allclose(lap, -(d[:, None] * a * d[None, :]), atol=1e-6)
    torch.manual_seed(0)
    block = STConvBlock(4, 4, 3, Kt=2, Ks=3, dropout=0.0).eval()
    x = torch.randn(3, 2, 5, 4)  # [N, B, T, C]
    uei, uew = undirected_graph(ei, ew, 3)
    pyg = torch.relu(block.cheb(x.permute(1, 2, 0, 3), uei, uew, lambda_max=2.0).permute(2, 0, 1, 3) + block.align(x))
    assert torch.allclose(block.spatial(x, lap), pyg, atol=1e-5)  # dense (export) path
    assert torch.allclose(block.spatial(x, scaled_laplacian(ei, ew, 3, sparse=True)), pyg, atol=1e-5)  # training


def test_parity_tolerance_is_relative_to_the_data_scale():
    assert parity_tolerance(np.array([2000.0, -2000.0])) == pytest.approx(0.2)
    assert parity_tolerance(np.array([50.0, 70.0])) == pytest.approx(6e-3)
    assert parity_tolerance(np.array([0.5, np.nan, np.inf])) == pytest.approx(1e-4)  # floor: max(1, scale)
    assert parity_tolerance(np.array([])) == pytest.approx(1e-4)


def test_a_model_without_a_fixed_graph_path_is_refused_naming_it_and_no_onnx():
    class Mystery(nn.Module):
        name = "mystery"

        def forward(self, x, edge_index, edge_weight):
            return x

    ei, ew, *_, scaler = _territory()
    with pytest.raises(NotExportable, match=r"model 'mystery' cannot be exported to ONNX.*--no-onnx"):
        FixedGraphForecaster(Mystery(), ei, ew, N, scaler)
    with pytest.raises(NotExportable, match=r"model 'Linear' cannot be exported"):
        FixedGraphForecaster(nn.Linear(2, 2), ei, ew, N, scaler)
