"""The model zoo (dcrnn, stgcn, gwnet): one set of shared weights on graphs of several sizes,
local (per-territory) parameters, known answers of the building blocks, a short training
sanity check, and every conf/model/*.yaml."""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fedldt.config import CONF_DIR, compose_config
from fedldt.models import MODELS, build_model, load_shared_state, local_state_names, split_state
from fedldt.models.dcrnn import transition_matrices
from fedldt.models.gwnet import MultiSupportGraphConv, adaptive_adjacency
from fedldt.models.stgcn import STConvBlock, TemporalGLU, scaled_laplacian, undirected_graph

DIMS = dict(in_channels=2, out_channels=1, horizon=3)
# Small versions of each model; receptive fields: stgcn 2*2*(3-1)+4 = 12, gwnet 1+2*(1+2) = 7.
SMALL = {
    "dcrnn": dict(name="dcrnn", hidden=8, num_layers=2, K=2),
    "stgcn": dict(name="stgcn", temporal_channels=8, spatial_channels=4, num_blocks=2, Kt=3, Ks=3, output_kernel=4),
    "gwnet": dict(name="gwnet", adaptive=False, residual_channels=8, dilation_channels=8, skip_channels=16,
                  end_channels=16, blocks=2, layers=2, dropout=0.0),
    "gwnet_adaptive": dict(name="gwnet", adaptive=True, emb_dim=4, residual_channels=8, dilation_channels=8,
                           skip_channels=16, end_channels=16, blocks=2, layers=2, dropout=0.0),
}
LOCAL_KEYS = {"dcrnn": [], "stgcn": [], "gwnet": [], "gwnet_adaptive": ["node_emb1", "node_emb2"]}
SIZES = (1, 7, 30)


def _ring(n, seed=0):
    """Bidirectional ring with positive random weights (no edges for a single node)."""
    if n == 1:
        return torch.zeros(2, 0, dtype=torch.long), torch.zeros(0)
    src = torch.arange(n)
    dst = (src + 1) % n
    ei = torch.cat([torch.stack([src, dst]), torch.stack([dst, src])], dim=1)
    return ei, 0.5 + torch.rand(ei.shape[1], generator=torch.Generator().manual_seed(seed))


def _build(key, n, seed=0):
    torch.manual_seed(seed)
    return build_model({**SMALL[key], **DIMS}, num_nodes=n)


def _models_for_sizes(key, sizes=SIZES):
    """One model per size, all holding the shared weights of the first one (local ones their own)."""
    ref = _build(key, sizes[0])
    shared, _ = split_state(ref)
    models = {sizes[0]: ref}
    for i, n in enumerate(sizes[1:], start=1):
        m = _build(key, n, seed=100 + i)  # different initial weights, then the shared ones loaded
        load_shared_state(m, shared)
        models[n] = m
    return shared, models


# ------------------------------------------------------------------ shapes and shared weights
@pytest.mark.parametrize("window", [12, 24])
@pytest.mark.parametrize("key", sorted(SMALL))
def test_same_shared_weights_run_on_three_graph_sizes(key, window):
    shared, models = _models_for_sizes(key)
    for n, model in models.items():
        got, _ = split_state(model)
        assert list(got) == list(shared) and all(torch.equal(got[k], shared[k]) for k in shared)
        model.eval()
        ei, ew = _ring(n)
        with torch.no_grad():
            y = model(torch.randn(4, window, n, DIMS["in_channels"]), ei, ew)
        assert y.shape == (4, DIMS["horizon"], n, DIMS["out_channels"])
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("key", sorted(SMALL))
def test_output_depends_on_the_graph(key):
    model = _build(key, 7).eval()
    ei, ew = _ring(7)
    x = torch.randn(2, 12, 7, DIMS["in_channels"])
    with torch.no_grad():
        y1, y2 = model(x, ei, ew), model(x, ei, ew * torch.linspace(0.1, 3.0, ew.numel()))
    assert (y1 - y2).abs().max() > 1e-4


@pytest.mark.parametrize("key", ["dcrnn", "stgcn", "gwnet", "gwnet_adaptive"])
def test_shared_part_does_not_depend_on_num_nodes(key):
    shapes = []
    for n in SIZES:
        model = _build(key, n)
        shared, local = split_state(model)
        shapes.append({k: tuple(v.shape) for k, v in shared.items()})
        n_shared = sum(p.numel() for name, p in model.named_parameters() if name in shared)
        n_local = sum(p.numel() for name, p in model.named_parameters() if name in local)
        assert n_shared == sum(p.numel() for p in model.parameters()) - n_local
        assert n_local == (2 * n * SMALL[key]["emb_dim"] if LOCAL_KEYS[key] else 0)
    assert shapes[0] == shapes[1] == shapes[2]


@pytest.mark.parametrize("key", sorted(SMALL))
def test_local_parameter_names_and_split_state_partition(key):
    model = _build(key, 5)
    assert model.local_parameter_names() == LOCAL_KEYS[key]
    state = model.state_dict()
    shared, local = split_state(model)
    int_buffers = [k for k, v in state.items() if not torch.is_floating_point(v)]
    assert all(k.endswith("num_batches_tracked") for k in int_buffers)
    assert len(int_buffers) == (4 if key.startswith("gwnet") else 0)  # one BatchNorm per layer: 2 blocks x 2
    assert list(local) == LOCAL_KEYS[key] + int_buffers  # node-dependent parameters and integer buffers
    assert set(shared).isdisjoint(local) and len(shared) + len(local) == len(state)
    assert [k for k in state if k in shared] == list(shared)  # order kept
    assert all(shared[k] is state[k] or torch.equal(shared[k], state[k]) for k in shared)
    assert all(torch.equal(local[k], state[k]) for k in local)
    if key == "gwnet_adaptive":
        assert local["node_emb1"].shape == (5, SMALL[key]["emb_dim"])


def test_load_shared_state_keeps_local_and_refuses_local_or_missing_keys():
    a, b = _build("gwnet_adaptive", 5, seed=1), _build("gwnet_adaptive", 9, seed=2)
    shared_a, _ = split_state(a)
    _, local_b = split_state(b)
    local_b = {k: v.clone() for k, v in local_b.items()}
    load_shared_state(b, shared_a)
    assert torch.equal(b.start.weight, a.start.weight)
    assert all(torch.equal(b.state_dict()[k], v) for k, v in local_b.items())  # own embeddings kept
    with pytest.raises(ValueError, match=r"local keys \['node_emb1', 'node_emb2', 'norms.0.num_batches_tracked'"):
        load_shared_state(b, a.state_dict())
    with pytest.raises(ValueError, match="missing.*start.weight"):
        load_shared_state(b, {k: v for k, v in shared_a.items() if k != "start.weight"})
    with pytest.raises(TypeError, match="local_parameter_names"):
        split_state(nn.Linear(2, 2))


def test_num_nodes_injection_and_errors():
    cfg = {**SMALL["gwnet_adaptive"], **DIMS}
    with pytest.raises(ValueError, match=r"model.num_nodes=None.*build_model\(cfg, num_nodes="):
        build_model(cfg)
    assert build_model({**cfg, "num_nodes": 4}).node_emb1.shape == (4, 4)  # injected in the dict
    with pytest.raises(ValueError, match="disagrees"):
        build_model({**cfg, "num_nodes": 4}, num_nodes=5)
    model = build_model(cfg, num_nodes=4)
    with pytest.raises(ValueError, match="input has 6 nodes.*model.num_nodes=4"):
        model(torch.randn(1, 12, 6, 2), *_ring(6))
    # models without node-dependent parameters accept and ignore num_nodes
    assert isinstance(build_model({**SMALL["dcrnn"], **DIMS}, num_nodes=4), nn.Module)
    assert build_model({**SMALL["gwnet"], **DIMS}).local_parameter_names() == []


# ------------------------------------------------------------------ receptive fields
def test_stgcn_window_shorter_than_receptive_field_is_named():
    model = _build("stgcn", 3)
    assert model.receptive_field == 12
    with pytest.raises(ValueError, match=r"task.window=11 .* receptive field 12"):
        model(torch.randn(1, 11, 3, 2), *_ring(3))


@pytest.mark.parametrize("key,rf", [("stgcn", 12), ("gwnet", 7), ("gwnet_adaptive", 7)])
def test_forecast_uses_exactly_the_last_receptive_field_steps(key, rf):
    model = _build(key, 5).double().eval()  # float64: "unused" is exactly 0, "used" is clearly not
    assert model.receptive_field == rf
    ei, ew = _ring(5)
    ew = ew.double()
    x = torch.randn(2, 24, 5, 2, dtype=torch.float64)
    with torch.no_grad():
        y = model(x, ei, ew)
        assert torch.allclose(model(x[:, -rf:], ei, ew), y, rtol=0, atol=1e-12)  # earlier steps unused
        x2 = x.clone()
        x2[:, -rf] += 1.0  # the oldest step inside the receptive field matters
        assert (model(x2, ei, ew) - y).abs().max() > 1e-8
        if key != "stgcn":  # gwnet zero-pads a short window on the left
            short = torch.cat([torch.zeros(2, rf - 4, 5, 2, dtype=torch.float64), x[:, -4:]], dim=1)
            assert torch.allclose(model(x[:, -4:], ei, ew), model(short, ei, ew), rtol=0, atol=1e-12)


# ------------------------------------------------------------------ known answers
def test_temporal_glu_known_answer():
    glu = TemporalGLU(1, 1, Kt=2)
    with torch.no_grad():
        glu.conv.weight.zero_()
        glu.conv.weight[0, 0, :, 0] = torch.tensor([1.0, 2.0])  # P = x_{t-1} + 2 x_t
        glu.conv.bias.copy_(torch.tensor([0.0, math.log(3.0)]))  # Q = log 3 -> sigmoid(Q) = 0.75
    x = torch.tensor([1.0, 2.0, 4.0]).view(1, 1, 3, 1)  # [N, B, T, C]
    out = glu(x).view(-1).tolist()
    # (P + residual x_t) * 0.75: t=1 -> (1 + 4 + 2) * .75, t=2 -> (2 + 8 + 4) * .75
    assert out == pytest.approx([7 * 0.75, 14 * 0.75])
    wide = TemporalGLU(1, 2, Kt=2)  # residual zero-padded to 2 channels
    with torch.no_grad():
        wide.conv.weight.zero_(); wide.conv.bias.zero_()
    assert wide(x)[0, 0].T.flatten().tolist() == pytest.approx([1.0, 2.0, 0.0, 0.0])  # 0.5 * (x_t; 0), channel-major


def test_stgcn_spatial_layer_known_answer_on_a_weighted_path():
    # path 0 -1- 1 -4- 2 given as directed edges, symmetrised like the model does; sym-normalised
    # with lambda_max = 2: L~ = -D^-1/2 A D^-1/2 with degrees (1, 5, 4).
    ei, ew = undirected_graph(torch.tensor([[0, 1], [1, 2]]), torch.tensor([1.0, 4.0]), 3)
    assert ei.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]] and ew.tolist() == [1.0, 1.0, 4.0, 4.0]
    block = STConvBlock(1, 1, 1, Kt=2, Ks=2, dropout=0.0)
    with torch.no_grad():
        block.cheb.lins[0].weight.fill_(1.0); block.cheb.lins[1].weight.fill_(1.0); block.cheb.bias.zero_()
    x = torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1, 1) * torch.tensor([1.0, 2.0]).view(1, 1, 2, 1)  # [N, B, T=2, C]
    out = block.spatial(x, scaled_laplacian(ei, ew, 3, sparse=True))  # relu(x + L~x + x): one graph for all (b, t)
    a01, a12 = 1 / math.sqrt(5), 4 / math.sqrt(20)
    ax = [a01 * -2.0, a01 * 1.0 + a12 * 3.0, a12 * -2.0]  # D^-1/2 A D^-1/2 x
    expected = torch.tensor([max(2 * xi - axi, 0.0) for xi, axi in zip([1.0, -2.0, 3.0], ax)])
    assert expected[1] == 0.0  # the ReLU is exercised
    assert torch.allclose(out[:, 0, 0, 0], expected, atol=1e-6)
    assert torch.allclose(out[:, 0, 1, 0], 2 * expected, atol=1e-6)


def _random_graph(n, seed):
    """Directed random graph with weights, duplicate pairs, a pair given both ways with different
    weights, and a self-loop on every node (ChebConv drops them)."""
    g = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, n, (2, 3 * n), generator=g)
    ei = torch.cat([ei, torch.arange(n).repeat(2, 1)], dim=1)
    return ei, 0.1 + torch.rand(ei.shape[1], generator=g)


def _pyg_chebconv_spatial(graph):
    """STConvBlock.spatial as fedldt computed it before the sparse operator: PyG's ChebConv (the
    block's own weights) on the undirected graph, message passing over every (batch, time)."""
    def spatial(block, x, lap):  # noqa: ARG001 (the operator is ignored: the graph is used)
        ei, ew = undirected_graph(graph[0], graph[1].to(x.dtype), x.shape[0])  # x [N, B, T, Ct]
        h = block.cheb(x.permute(1, 2, 0, 3), ei, ew, lambda_max=2.0)  # [B, T, N, Cs]
        return torch.relu(h.permute(2, 0, 1, 3) + block.align(x))
    return spatial


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("n,batch,Ks", [(1, 3, 3), (6, 1, 2), (23, 4, 3), (40, 2, 4)])
def test_stgcn_sparse_operator_equals_pygs_chebconv_outputs_and_gradients(n, batch, Ks, mode, monkeypatch):
    cfg = {**SMALL["stgcn"], **DIMS, "Ks": Ks, "dropout": 0.3}
    torch.manual_seed(0)
    fast = build_model(cfg)
    ref = build_model(cfg)
    ref.load_state_dict(fast.state_dict(), strict=True)  # same parameter names and shapes as ChebConv's
    assert any(k.endswith("cheb.lins.0.weight") for k in fast.state_dict())
    getattr(fast, mode)(), getattr(ref, mode)()
    graph = _random_graph(n, seed=n) if n > 1 else (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0))
    x = torch.randn(batch, 12, n, DIMS["in_channels"], generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks in both
    y_fast = fast(x, *graph)
    with monkeypatch.context() as m:
        m.setattr(STConvBlock, "spatial", _pyg_chebconv_spatial(graph))
        torch.manual_seed(2)
        y_ref = ref(x, *graph)
    assert torch.allclose(y_fast, y_ref, atol=1e-5)
    target = torch.randn_like(y_ref)
    ((y_fast - target) ** 2).mean().backward()
    ((y_ref - target) ** 2).mean().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5), name
    dense = fast.graph_operators(*graph, n)[0]  # the export path: the same operator, dense
    assert torch.allclose(dense, scaled_laplacian(*graph, n, sparse=True).to_dense())
    if mode == "eval":
        with torch.no_grad():
            assert torch.allclose(fast.forward_dense(x, dense), y_fast, atol=1e-5)


def test_adaptive_adjacency_known_answer():
    e1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    e2 = torch.tensor([[2.0, 0.0], [0.0, 0.0], [0.0, -1.0]])
    # E1 E2^T = [[2,0,0],[0,0,-1],[2,0,-1]] -> relu -> row softmax
    a = adaptive_adjacency(e1, e2)
    z = math.e**2 + 2
    assert a[0].tolist() == pytest.approx([math.e**2 / z, 1 / z, 1 / z])
    assert a[1].tolist() == pytest.approx([1 / 3] * 3)
    assert a[2].tolist() == pytest.approx(a[0].tolist())


def test_gwnet_graph_conv_known_answer_sparse_and_dense():
    # directed ring 0->1->2->0: forward transition P x = (x2, x0, x1)
    p_f, _ = transition_matrices(torch.tensor([[0, 1, 2], [1, 2, 0]]), torch.tensor([1.0, 2.0, 3.0]), 3)
    conv = MultiSupportGraphConv(1, 1, num_supports=1, order=2)
    with torch.no_grad():
        for lin, w in zip(conv.lins, (1.0, 10.0, 100.0)):  # the terms x, P x, P^2 x
            lin.weight.fill_(w)
        conv.lins[0].bias.zero_()
    x = torch.tensor([1.0, 2.0, 5.0]).view(1, 1, 3, 1)  # [B, C, N, T]
    expected = [1 + 10 * 5 + 100 * 2, 2 + 10 * 1 + 100 * 5, 5 + 10 * 2 + 100 * 1]  # x + 10 Px + 100 P^2 x
    assert conv(x, [p_f]).view(-1).tolist() == pytest.approx(expected)
    assert conv(x, [p_f.to_dense()]).view(-1).tolist() == pytest.approx(expected)
    xb = torch.randn(2, 1, 3, 4)  # [B, C, N, T]
    assert torch.allclose(conv(xb, [p_f]), conv(xb, [p_f.to_dense()]), atol=1e-6)


# ------------------------------------------------------------------ training sanity
@pytest.mark.parametrize("key", sorted(SMALL))
def test_short_training_fits_a_sine(key):
    torch.manual_seed(0)
    n, t, window, horizon = 4, 240, 12, 3
    steps = torch.arange(t, dtype=torch.float32)[:, None]
    series = torch.sin(2 * math.pi * steps / 24 + torch.arange(n) * 0.8)  # [T, N]
    starts = torch.arange(0, t - window - horizon, 3)
    x = torch.stack([series[s : s + window] for s in starts]).unsqueeze(-1)  # [B, W, N, 1]
    y = torch.stack([series[s + window : s + window + horizon] for s in starts]).unsqueeze(-1)  # [B, H, N, 1]
    model = build_model({**SMALL[key], "in_channels": 1, "out_channels": 1, "horizon": horizon}, num_nodes=n)
    ei, ew = _ring(n)

    def loss():
        model.eval()
        with torch.no_grad():
            return float((model(x, ei, ew) - y).abs().mean())

    before = loss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        (model(x, ei, ew) - y).abs().mean().backward()
        opt.step()
    after = loss()
    assert after < 0.1 * before and after < 0.08  # MAE of a zero forecast is ~0.64


# ------------------------------------------------------------------ configs
MODEL_FILES = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def test_every_registered_model_has_a_config():
    assert MODEL_FILES == sorted(MODELS)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_config_composes_and_builds(name):
    cfg = compose_config([f"model={name}"])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    assert model_cfg["name"] == name
    assert not {"in_channels", "out_channels", "horizon", "num_nodes"} & set(model_cfg)  # data sizes injected
    model = build_model({**model_cfg, **DIMS, "horizon": cfg.task.horizon}, num_nodes=6).eval()
    with torch.no_grad():
        y = model(torch.randn(2, cfg.task.window, 6, DIMS["in_channels"]), *_ring(6))
    assert y.shape == (2, cfg.task.horizon, 6, DIMS["out_channels"]) and torch.isfinite(y).all()


# ------------------------------------------------------------------ personalization
@pytest.mark.parametrize("key,head", [
    ("dcrnn", ["readout.weight", "readout.bias"]),
    ("stgcn", ["out_temporal.conv.weight", "out_temporal.conv.bias", "out_norm.weight", "out_norm.bias",
               "out_fc.0.weight", "out_fc.0.bias", "out_fc.2.weight", "out_fc.2.bias"]),
    ("gwnet_adaptive", ["end1.weight", "end1.bias", "end2.weight", "end2.bias"]),
])
def test_fedper_keeps_the_output_head_local(key, head):
    model = _build(key, 6)
    base = local_state_names(model, "none")
    assert local_state_names(model, "fedper") == [k for k in model.state_dict() if k in set(base) | set(head)]
    shared, local = split_state(model, "fedper")
    assert not set(head) & set(shared) and set(head) <= set(local)


@pytest.mark.parametrize("key,norm_keys", [
    ("stgcn", [f"{p}.{w}" for p in ("blocks.0.norm", "blocks.1.norm", "out_norm") for w in ("weight", "bias")]),
    ("gwnet", [f"norms.{i}.{w}" for i in range(4) for w in ("weight", "bias", "running_mean", "running_var",
                                                               "num_batches_tracked")]),
])
def test_fedbn_keeps_every_normalization_layer_local(key, norm_keys):
    model = _build(key, 6)
    assert sorted(local_state_names(model, "fedbn")) == sorted(set(norm_keys) | set(local_state_names(model, "none")))


def test_fedbn_without_normalization_layers_and_unknown_mode_are_errors():
    with pytest.raises(ValueError, match="model 'dcrnn' has no normalization layers"):
        local_state_names(_build("dcrnn", 4), "fedbn")
    with pytest.raises(ValueError, match=r"personalization.name='fedsgd' must be one of \['none', 'fedper', 'fedbn', 'finetune', 'ditto'\]"):
        split_state(_build("dcrnn", 4), "fedsgd")


@pytest.mark.parametrize("key", sorted(SMALL))
def test_residual_output_is_the_plain_output_plus_the_last_observed_value(key):
    torch.manual_seed(0)
    plain = build_model({**SMALL[key], **DIMS}, num_nodes=7).eval()
    torch.manual_seed(0)
    res = build_model({**SMALL[key], **DIMS, "residual": True}, num_nodes=7).eval()
    x, (ei, ew) = torch.randn(2, 12, 7, DIMS["in_channels"]), _ring(7)
    with torch.no_grad():
        diff = res(x, ei, ew) - plain(x, ei, ew)
    assert torch.allclose(diff, x[:, -1:, :, :1].expand_as(diff), atol=1e-6)
