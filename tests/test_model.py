"""The DCRNN-style forecaster: shared weights across graph sizes, diffusion known answer."""

import pytest
import torch

from fedldt.models import build_model
from fedldt.models.dcrnn import DiffusionConv, transition_matrices


def _ring(n):
    src = torch.arange(n)
    dst = (src + 1) % n
    ei = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    return ei, torch.ones(ei.shape[1])


def test_same_weights_run_on_graphs_of_three_sizes():
    torch.manual_seed(0)
    model = build_model(dict(name="dcrnn", in_channels=3, out_channels=1, horizon=12, hidden=16, num_layers=2, K=2))
    n_params = sum(p.numel() for p in model.parameters())
    for n in (1, 5, 40):
        ei, ew = _ring(n) if n > 1 else (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0))
        y = model(torch.randn(4, 12, n, 3), ei, ew)
        assert y.shape == (4, 12, n, 1)
        assert torch.isfinite(y).all()
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_random_walk_transition_known_answer():
    # path 0 -> 1 (w=1), 2 -> 1 (w=3): node 1's in-weights normalise to 1/4 and 3/4
    ei = torch.tensor([[0, 2], [1, 1]])
    p_f, p_b = transition_matrices(ei, torch.tensor([1.0, 3.0]), 3)
    dense_f = p_f.to_dense()
    assert dense_f[1].tolist() == pytest.approx([0.25, 0.0, 0.75])
    assert dense_f[0].tolist() == [0.0, 0.0, 0.0]  # no in-edges
    dense_b = p_b.to_dense()
    assert dense_b[0].tolist() == pytest.approx([0.0, 1.0, 0.0])  # 0's only out-edge goes to 1
    assert dense_b[2].tolist() == pytest.approx([0.0, 1.0, 0.0])


def test_diffusion_conv_one_step_known_answer():
    conv = DiffusionConv(1, 1, K=1)
    with torch.no_grad():
        conv.lins[0].weight.fill_(1.0); conv.lins[0].bias.zero_()   # identity term
        conv.lins[1].weight.fill_(10.0)                              # forward walk
        conv.lins[2].weight.fill_(0.0)                               # reverse walk off
    ei = torch.tensor([[0, 2], [1, 1]])
    p_f, p_b = transition_matrices(ei, torch.tensor([1.0, 3.0]), 3)
    x = torch.tensor([[1.0], [2.0], [5.0]]).view(3, 1, 1)  # [N, B, C]
    out = conv(x, p_f, p_b).view(3).tolist()
    assert out == pytest.approx([1.0, 2.0 + 10 * (0.25 * 1 + 0.75 * 5), 5.0])


def test_unknown_model_or_hyperparameter_is_named():
    with pytest.raises(ValueError, match="model.name='nope'"):
        build_model(dict(name="nope"))
    with pytest.raises(ValueError, match="hidden_size"):
        build_model(dict(name="dcrnn", in_channels=1, out_channels=1, horizon=3, hidden_size=3))


def test_residual_forecast_starts_from_last_observed_value():
    model = build_model(dict(name="dcrnn", in_channels=3, out_channels=1, horizon=4, hidden=8, num_layers=1, residual=True))
    with torch.no_grad():
        model.readout.weight.zero_(); model.readout.bias.zero_()
    x = torch.randn(2, 6, 5, 3)
    ei, ew = _ring(5)
    y = model(x, ei, ew)
    assert torch.equal(y, x[:, -1:, :, :1].expand(2, 4, 5, 1))
