"""The models' fast paths compute the same function as the plain layouts they replace
(issue 15): Graph WaveNet's node-major, channel-last layers against the paper's
``[batch, channel, node, time]`` convolutions run through the model's own ``nn.Conv2d`` modules,
the fused diffusion convolution against one ``nn.Linear`` per term, and the CSR graph operators
against the dense ones. Outputs and gradients are compared, in training mode (batch statistics)
and in evaluation mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from fedldt.models import build_model
from fedldt.models.diffusion import DiffusionConv, per_term_linears, to_csr, transition_matrices
from fedldt.models.gwnet import GWNetForecaster, adaptive_adjacency


def conv_layout_gwnet(model: GWNetForecaster, x: Tensor, p_f: Tensor, p_b: Tensor) -> Tensor:
    """Graph WaveNet as the authors' code lays it out: activations ``[B, C, N, T]``, every layer
    an ``nn.Conv2d`` call, the graph convolution on the permuted activations; the model's own
    modules and weights (dropout must be 0 or the model in eval mode)."""
    b, t, n, _ = x.shape
    supports = [p_f, p_b] + ([adaptive_adjacency(model.node_emb1, model.node_emb2)] if model.cfg.adaptive else [])
    h = x.permute(0, 3, 2, 1)  # [B, F, N, T]
    if t < model.receptive_field:
        h = F.pad(h, (model.receptive_field - t, 0))
    h = model.start(h)
    skip = None
    for i in range(len(model.dilations)):
        res = h
        g = torch.tanh(model.filter_convs[i](res)) * torch.sigmoid(model.gate_convs[i](res))
        s = model.skip_convs[i](g)
        skip = s if skip is None else s + skip[..., -s.shape[-1]:]
        h = model.gconvs[i](g, supports) + res[..., -g.shape[-1]:]  # the [B, C, N, T] forward
        h = model.norms[i](h)
    out = model.end2(torch.relu(model.end1(torch.relu(skip[..., -1:]))))  # [B, H*C, N, 1]
    return out.view(b, model.cfg.horizon, model.cfg.out_channels, n).permute(0, 1, 3, 2)


def graph(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    src = torch.randint(0, n, (4 * n,), generator=gen)
    dst = torch.randint(0, n, (4 * n,), generator=gen)
    keep = src != dst
    return torch.stack([src[keep], dst[keep]]), torch.rand(int(keep.sum()), generator=gen) + 0.1


@pytest.mark.parametrize(("adaptive", "window", "kernel_size", "train"),
                         [(True, 12, 2, True), (False, 16, 2, True), (True, 7, 3, False), (False, 12, 1, False)])
def test_gwnet_node_major_layers_equal_the_convolution_layout(adaptive, window, kernel_size, train):
    n = 9
    torch.manual_seed(0)
    model = build_model({"name": "gwnet", "in_channels": 3, "out_channels": 2, "horizon": 4, "adaptive": adaptive,
                         "residual_channels": 8, "dilation_channels": 6, "skip_channels": 10, "end_channels": 12,
                         "blocks": 2, "layers": 2, "kernel_size": kernel_size, "dropout": 0.0, "emb_dim": 4},
                        num_nodes=n)
    model.train(train)
    ei, ew = graph(n, 1)
    x = torch.randn(5, window, n, 3)
    p_f, p_b = (a.to_dense() for a in transition_matrices(ei, ew, n))

    fast = model(x, ei, ew)
    fast_grads = torch.autograd.grad(fast.square().sum(), list(model.parameters()), allow_unused=True)
    ref = conv_layout_gwnet(model, x, p_f, p_b)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(model.parameters()), allow_unused=True)

    assert fast.shape == (5, 4, n, 2)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), fast_grads, ref_grads):
        # the last layer's graph convolution and norm feed no output (only its skip does), in both layouts
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert sum(a is not None for a in fast_grads) > len(fast_grads) // 2


def test_gwnet_batch_norm_statistics_are_those_of_the_convolution_layout():
    n = 7
    torch.manual_seed(3)
    cfg = {"name": "gwnet", "in_channels": 2, "out_channels": 1, "horizon": 3, "adaptive": True, "residual_channels": 5,
           "dilation_channels": 5, "skip_channels": 6, "end_channels": 6, "blocks": 1, "layers": 2, "dropout": 0.0,
           "emb_dim": 3}
    fast_model = build_model(cfg, num_nodes=n)
    ref_model = build_model(cfg, num_nodes=n)
    ref_model.load_state_dict(fast_model.state_dict())
    ei, ew = graph(n, 2)
    x = torch.randn(4, 12, n, 2)
    p_f, p_b = (a.to_dense() for a in transition_matrices(ei, ew, n))
    fast_model(x, ei, ew)
    conv_layout_gwnet(ref_model, x, p_f, p_b)
    for a, b in zip(fast_model.norms, ref_model.norms):
        torch.testing.assert_close(a.running_mean, b.running_mean)
        torch.testing.assert_close(a.running_var, b.running_var)  # unbiased variance over the same count
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1
        assert not torch.allclose(a.running_var, torch.ones_like(a.running_var))  # it moved


@pytest.mark.parametrize("supports", [2, 3])
def test_fused_diffusion_convolution_equals_one_linear_per_term(supports):
    n = 6
    torch.manual_seed(supports)
    conv = DiffusionConv(4, 5, K=2, num_supports=supports).double()  # float64: differences are the method's, not rounding
    ops = [torch.rand(n, n, dtype=torch.float64) for _ in range(supports)]
    x = torch.randn(n, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    fused = conv(x, *ops)
    g_fused = torch.autograd.grad(fused.square().sum(), [x, *conv.parameters()])
    with per_term_linears(conv):
        assert conv.fused is False
        plain = conv(x, *ops)
        g_plain = torch.autograd.grad(plain.square().sum(), [x, *conv.parameters()])
    assert conv.fused is True
    torch.testing.assert_close(fused, plain)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b)
    # and by hand: X W0 + b + sum_s sum_k (A_s^k X) W_{s,k}
    by_hand = conv.lins[0](x)
    for s, a in enumerate(ops):
        h = x
        for k in range(2):
            h = torch.einsum("ij,j...->i...", a, h)
            by_hand = by_hand + conv.lins[1 + s * 2 + k](h)
    torch.testing.assert_close(fused, by_hand)


@pytest.mark.parametrize("name", ["dcrnn", "gwnet", "stgcn"])
def test_sparse_csr_forward_equals_the_dense_export_path(name):
    n = 11
    torch.manual_seed(0)
    model = build_model({"name": name, "in_channels": 3, "out_channels": 1, "horizon": 3,
                         **({"dropout": 0.0} if name != "dcrnn" else {})}, num_nodes=n)
    model.eval()
    ei, ew = graph(n, 5)
    x = torch.randn(2, 12, n, 3)
    with torch.no_grad():
        sparse_out = model(x, ei, ew)
        dense_out = model.forward_dense(x, *model.graph_operators(ei, ew, n))
    torch.testing.assert_close(sparse_out, dense_out, rtol=1e-5, atol=1e-5)


def test_csr_operator_keeps_the_gradient_of_the_dense_operand():
    ei, ew = graph(8, 7)
    p_f, _ = transition_matrices(ei, ew, 8)
    h = torch.randn(8, 5, requires_grad=True)
    (grad_csr,) = torch.autograd.grad((to_csr(p_f) @ h).sum(), h)
    (grad_dense,) = torch.autograd.grad((p_f.to_dense() @ h).sum(), h)
    torch.testing.assert_close(grad_csr, grad_dense)
    assert torch.allclose(grad_dense[:, 0], p_f.to_dense().sum(0))  # column sums of P_f: a known answer


@pytest.mark.parametrize(("c_in", "c_out", "kt"), [(3, 5, 3), (6, 4, 2), (4, 4, 1)])
def test_stgcn_temporal_glu_equals_its_convolution_module(c_in, c_out, kt):
    from fedldt.models.stgcn import TemporalGLU

    torch.manual_seed(c_in)
    glu = TemporalGLU(c_in, c_out, Kt=kt)
    x = torch.randn(7, 2, 9, c_in)  # [N, B, T, C]
    conv_layout = x.permute(1, 3, 2, 0)  # [B, C, T, N], the layout of the (Kt, 1) convolution
    p, q = glu.conv(conv_layout).chunk(2, dim=1)
    res = conv_layout[:, :, kt - 1:]
    if c_in > c_out:
        res = glu.align.proj(res)
    elif c_in < c_out:
        res = F.pad(res, (0, 0, 0, 0, 0, c_out - c_in))
    ref = ((p + res) * torch.sigmoid(q)).permute(3, 0, 2, 1)  # back to [N, B, T', C]
    out = glu(x)
    assert out.shape == (7, 2, 9 - kt + 1, c_out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_dropout_keeps_each_element_with_probability_one_minus_p_and_scales_it():
    from fedldt.models.ops import dropout

    x = torch.rand(400_000, dtype=torch.float64) + 0.5  # no zeros, so a dropped element is exactly 0
    torch.manual_seed(7)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.7)  # inverted dropout: kept elements scaled by 1 / (1 - p)
    # kept fraction: binomial(400 000, 0.7), standard deviation 0.00072: within 5 of them of 0.7
    assert abs(float(kept.double().mean()) - 0.7) < 5 * (0.21 / 400_000) ** 0.5
    assert abs(float(y.mean() / x.mean()) - 1.0) < 0.01  # the expectation is kept
    torch.manual_seed(7)
    torch.testing.assert_close(dropout(x, 0.3, training=True), y)  # the seed fixes the mask
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
    xg = x[:10].clone().requires_grad_()
    torch.manual_seed(1)
    out = dropout(xg, 0.5, training=True)
    (grad,) = torch.autograd.grad(out.sum(), xg)
    torch.testing.assert_close(grad, torch.where(out != 0, 2.0, 0.0).double())  # the gradient is the mask


def test_gwnet_dropout_acts_in_training_mode_only():
    n = 9
    torch.manual_seed(4)
    model = build_model({"name": "gwnet", "in_channels": 2, "out_channels": 1, "horizon": 3, "adaptive": True,
                         "residual_channels": 8, "dilation_channels": 8, "skip_channels": 8, "end_channels": 8,
                         "blocks": 1, "layers": 2, "dropout": 0.3, "emb_dim": 4}, num_nodes=n).eval()
    ei, ew = graph(n, 5)
    x = torch.randn(4, 12, n, 2)
    p_f, p_b = (a.to_dense() for a in transition_matrices(ei, ew, n))
    torch.testing.assert_close(model(x, ei, ew), conv_layout_gwnet(model, x, p_f, p_b), rtol=1e-5, atol=1e-5)
    conv = model.gconvs[0]
    supports = [p_f, p_b, adaptive_adjacency(model.node_emb1, model.node_emb2)]
    g = torch.rand(n, 50, 40, 8) + 0.5  # [N, B, T, D]: 144 000 outputs
    assert int((conv.node_major(g, supports) == 0).sum()) == 0  # evaluation: nothing dropped
    model.train()
    zero = float((conv.node_major(g, supports) == 0).double().mean())
    assert abs(zero - 0.3) < 5 * (0.21 / g.numel()) ** 0.5  # training: each output dropped with p = 0.3


def test_dropout_falls_back_to_torch_where_its_mask_would_be_coarse():
    from fedldt.models.ops import dropout

    x = torch.ones(1000, dtype=torch.bfloat16)
    torch.manual_seed(0)
    y = dropout(x, 0.25, training=True)
    torch.manual_seed(0)
    torch.testing.assert_close(y, F.dropout(x, 0.25, training=True))  # bfloat16: F.dropout itself, same stream
    assert float((dropout(torch.ones(10), 1.0, training=True)).abs().sum()) == 0.0  # p = 1: everything dropped
