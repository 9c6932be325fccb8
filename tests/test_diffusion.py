"""The diffusion convolution shared by DCRNN and Graph WaveNet: a hand-computed answer on a tiny
graph, the paper's concatenated form, both initialisations, and old Graph WaveNet weights."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedldt.models import build_model
from fedldt.models.diffusion import DiffusionConv, transition_matrices
from fedldt.models.gwnet import MultiSupportGraphConv

# 0 -> 1 (w=1), 2 -> 1 (w=3), 1 -> 0 (w=2), 1 -> 2 (w=2)
EDGES = torch.tensor([[0, 2, 1, 1], [1, 1, 0, 2]])
WEIGHTS = torch.tensor([1.0, 3.0, 2.0, 2.0])


def _conv_with_decimal_weights() -> DiffusionConv:
    conv = DiffusionConv(1, 1, K=2, num_supports=2)
    with torch.no_grad():  # terms x, P_f x, P_f^2 x, P_b x, P_b^2 x weighted 1, 10, 100, 1000, 10000
        for lin, w in zip(conv.lins, (1.0, 10.0, 100.0, 1000.0, 10000.0)):
            lin.weight.fill_(w)
        conv.lins[0].bias.fill_(0.5)
    return conv


@pytest.mark.parametrize("dense", [False, True])
def test_two_step_two_support_known_answer(dense):
    # In-degrees 2, 4, 2: P_f rows [0,1,0], [1/4,0,3/4], [0,1,0]. Out-degrees 1, 4, 3:
    # P_b rows [0,1,0], [1/2,0,1/2], [0,1,0]. With x = (1, 2, 5):
    # P_f x = (2, 4, 2), P_f^2 x = (4, 2, 4), P_b x = (2, 3, 2), P_b^2 x = (3, 2, 3).
    p_f, p_b = transition_matrices(EDGES, WEIGHTS, 3)
    if dense:
        p_f, p_b = p_f.to_dense(), p_b.to_dense()
    x = torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1)  # [N, B, C]
    out = _conv_with_decimal_weights()(x, p_f, p_b).view(3).tolist()
    assert out == [1 + 20 + 400 + 2000 + 30000 + 0.5,
                   2 + 40 + 200 + 3000 + 20000 + 0.5,
                   5 + 20 + 400 + 2000 + 30000 + 0.5]


def test_any_middle_dims_are_batch_items():
    p_f, p_b = transition_matrices(EDGES, WEIGHTS, 3)
    conv = _conv_with_decimal_weights()
    x = torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1, 1) * torch.tensor([1.0, -2.0, 0.0]).view(1, 1, 3, 1)
    out = conv(x.expand(3, 2, 3, 1), p_f, p_b)  # [N, B=2, T=3, C]
    base = torch.tensor([32421.0, 23242.0, 32425.0]).view(3, 1)  # the answer above less the bias
    assert torch.equal(out[:, 1, :, 0], base * torch.tensor([1.0, -2.0, 0.0]) + 0.5)


def test_wrong_number_of_supports_is_refused():
    p_f, _ = transition_matrices(EDGES, WEIGHTS, 3)
    with pytest.raises(ValueError, match="built for 2 supports, got 1"):
        DiffusionConv(1, 1, K=1)(torch.ones(3, 1, 1), p_f)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), num_supports=st.integers(1, 3), K=st.integers(0, 3))
def test_equals_graph_wavenets_one_convolution_of_the_concatenated_terms(seed, num_supports, K):
    # Wu et al. 2019, eq. 6-7: one 1x1 convolution over [x, A_1 x, .., A_1^K x, A_2 x, ..]
    g = torch.Generator().manual_seed(seed)
    n, c_in, c_out = 5, 3, 4
    supports = [torch.softmax(torch.randn(n, n, generator=g), dim=1) for _ in range(num_supports)]
    conv = MultiSupportGraphConv(c_in, c_out, num_supports, order=K)
    x = torch.randn(2, c_in, n, 4, generator=g)  # [B, C, N, T]
    terms = [x]
    for a in supports:
        h = x
        for _ in range(K):
            h = torch.einsum("ij,bcjt->bcit", a, h)
            terms.append(h)
    weight = torch.cat([lin.weight for lin in conv.lins], dim=1)[:, :, None, None]
    expected = nn.functional.conv2d(torch.cat(terms, dim=1), weight, conv.lins[0].bias)
    assert torch.allclose(conv(x, supports), expected, atol=1e-5)


def test_initialisations_draw_like_the_layers_they_replace():
    torch.manual_seed(3)
    joint = MultiSupportGraphConv(4, 6, num_supports=3, order=2)  # Graph WaveNet: one 1x1 conv of 7 terms
    torch.manual_seed(3)
    ref = nn.Conv2d(4 * 7, 6, kernel_size=1)
    assert torch.equal(torch.cat([lin.weight for lin in joint.lins], dim=1), ref.weight[:, :, 0, 0])
    assert torch.equal(joint.lins[0].bias, ref.bias)
    torch.manual_seed(3)
    per_term = DiffusionConv(4, 6, K=2)  # DCRNN: one nn.Linear per term, bias on the first
    torch.manual_seed(3)
    refs = [nn.Linear(4, 6, bias=(i == 0)) for i in range(5)]
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(per_term.lins, refs))
    assert torch.equal(per_term.lins[0].bias, refs[0].bias)


def test_graph_wavenet_weights_in_the_old_single_convolution_layout_still_load():
    cfg = dict(name="gwnet", adaptive=True, num_nodes=3, emb_dim=4, residual_channels=8, dilation_channels=8,
               skip_channels=16, end_channels=16, blocks=1, layers=2, dropout=0.0,
               in_channels=2, out_channels=1, horizon=3)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    old = {}
    for k, v in model.state_dict().items():  # fedldt 0.1.0: gconvs.<i>.mlp = Conv2d(c * 7, c, 1)
        if ".lins." not in k:
            old[k] = v
        elif k.endswith("lins.0.weight"):
            prefix = k[: -len("lins.0.weight")]
            lins = [model.state_dict()[f"{prefix}lins.{j}.weight"] for j in range(7)]
            old[f"{prefix}mlp.weight"] = torch.cat(lins, dim=1)[:, :, None, None]
            old[f"{prefix}mlp.bias"] = model.state_dict()[f"{prefix}lins.0.bias"]
    assert not any(".lins." in k for k in old)
    torch.manual_seed(1)
    fresh = build_model(cfg).eval()
    fresh.load_state_dict(old, strict=True)
    x = torch.randn(2, 7, 3, 2)
    ei, ew = EDGES, WEIGHTS
    assert torch.equal(fresh(x, ei, ew), model(x, ei, ew))
