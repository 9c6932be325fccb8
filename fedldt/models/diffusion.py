"""Diffusion convolution on a graph: the one implementation DCRNN and Graph WaveNet share.

``Z = X Θ_0 + b + Σ_{s=1..S} Σ_{k=1..K} (A_s^k X) Θ_{s,k}``

over ``S`` support matrices ``A_s`` (``[node, node]``, ``(A X)_i = Σ_j A[i, j] X_j``):

* DCRNN (Li, Yu, Shahabi, Liu, "Diffusion Convolutional Recurrent Neural Network:
  Data-Driven Traffic Forecasting", ICLR 2018, eq. 2): ``S = 2``, the forward and reverse
  random walks ``P_f``, ``P_b`` of :func:`transition_matrices`;
* Graph WaveNet (Wu, Pan, Long, Jiang, Zhang, "Graph WaveNet for Deep Spatial-Temporal Graph
  Modeling", IJCAI 2019, Sec. 3.2, eq. 6-7): the same two walks plus, optionally, the
  self-adaptive adjacency (``S = 3``). The paper writes the layer as one 1x1 convolution of
  the concatenated terms ``[X, A_1 X, A_1^2 X, ..., A_S^K X]``; that is the same map with
  ``Θ`` split into the blocks ``Θ_0, Θ_{1,1}, ..., Θ_{S,K}`` (in that order).

Supports may be sparse COO (training: one ``torch.sparse.mm`` per product) or dense (the
fixed-graph ONNX export path: plain matrix products).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch_geometric.utils import scatter

from fedldt.models.ops import linear_of_terms


def random_walk_weights(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Weights of the forward and reverse random-walk transitions for each edge.

    For an edge ``j -> i`` with weight ``w``: forward ``w / sum_{k->i} w`` (normalised by the
    target's weighted in-degree), reverse ``w / sum_{j->k} w`` (used on the reversed edge).

    Returns:
        ``(fwd, bwd)`` float tensors of shape ``[num_edges]``.
    """
    src, dst = edge_index
    deg_in = scatter(edge_weight, dst, dim=0, dim_size=num_nodes, reduce="sum")
    deg_out = scatter(edge_weight, src, dim=0, dim_size=num_nodes, reduce="sum")
    fwd = edge_weight / deg_in.clamp_min(1e-12)[dst]
    bwd = edge_weight / deg_out.clamp_min(1e-12)[src]
    return fwd, bwd


def transition_matrices(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """Sparse (COO) forward and reverse random-walk transition matrices ``[node, node]``.

    ``P_f[i, j] = w_{j->i} / sum_k w_{k->i}`` aggregates over a node's in-edges;
    ``P_b[j, i] = w_{j->i} / sum_k w_{j->k}`` walks the edges backwards (DCRNN's
    ``D_O^-1 W`` and ``D_I^-1 W^T``), degrees computed with PyG's ``scatter``.
    """
    fwd, bwd = random_walk_weights(edge_index, edge_weight, num_nodes)
    src, dst = edge_index
    size = (num_nodes, num_nodes)
    p_f = torch.sparse_coo_tensor(torch.stack([dst, src]), fwd, size, check_invariants=False).coalesce()
    p_b = torch.sparse_coo_tensor(torch.stack([src, dst]), bwd, size, check_invariants=False).coalesce()
    return p_f, p_b


def to_csr(a: Tensor) -> Tensor:
    """``a`` (sparse COO ``[node, node]``) in the sparse CSR layout: a sparse-dense product with it
    is about 4x faster on CPU than with COO (one product on Los-loop's 207-node graph, forward and
    backward, ``docs/benchmarks.md``); autograd flows to the dense operand. PyTorch's warning that
    CSR support is in beta is silenced here (only products and ``to_dense`` are used)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)
        return a.to_sparse_csr()


class DiffusionConv(nn.Module):
    """K-step diffusion convolution over ``num_supports`` support matrices (module docstring).

    One linear map per term: ``lins[0]`` (with the bias ``b``) maps ``X``, ``lins[1 + s*K + k]``
    (no bias) maps ``A_{s+1}^{k+1} X``. Node-major layout, so that a graph product is one
    (sparse) matrix product over every batch item and step at once.

    Args:
        in_channels: input features per node.
        out_channels: output features per node.
        K: diffusion steps (powers of each support); ``K=0`` is a per-node linear layer.
        num_supports: support matrices ``forward`` receives (DCRNN: 2).
        joint_init: initialise the term maps as one ``nn.Linear`` (or 1x1 convolution) of the
            concatenated terms would be (fan-in ``in_channels * (1 + S*K)``; Graph WaveNet);
            default: each term as its own ``nn.Linear`` (fan-in ``in_channels``; DCRNN).

    Shapes:
        x ``[node, *, in_channels]`` (any middle dims, e.g. ``[node, batch, C]`` or
        ``[node, batch, time, C]``) -> ``[node, *, out_channels]``; each support ``[node, node]``,
        sparse COO or dense, same dtype as ``x``.

    Raises:
        ValueError: ``forward`` got another number of supports than ``num_supports``.
    """

    def __init__(self, in_channels: int, out_channels: int, K: int = 2, num_supports: int = 2,
                 joint_init: bool = False) -> None:
        super().__init__()
        self.K, self.num_supports = int(K), int(num_supports)
        terms = 1 + self.num_supports * self.K
        if not joint_init:
            self.lins = nn.ModuleList(nn.Linear(in_channels, out_channels, bias=(i == 0)) for i in range(terms))
            return
        self.lins = nn.ModuleList(nn.utils.skip_init(nn.Linear, in_channels, out_channels, bias=(i == 0))
                                  for i in range(terms))
        # exactly nn.Conv2d(in * terms, out, 1).reset_parameters(): the same draws in the same order
        weight = torch.empty(out_channels, in_channels * terms)
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_channels * terms)
        bias = torch.empty(out_channels).uniform_(-bound, bound)
        with torch.no_grad():
            for lin, block in zip(self.lins, weight.split(in_channels, dim=1)):
                lin.weight.copy_(block)
            self.lins[0].bias.copy_(bias)

    #: ``True``: the term maps as plain products accumulated into one output
    #: (:func:`fedldt.models.ops.linear_of_terms`: the same map, no module call per term);
    #: ``False``: each term through its own ``lins[i]`` module, as Opacus needs to see the
    #: activations of each ``nn.Linear`` (:func:`fedldt.engine.train_epochs_dpsgd` sets it).
    fused: bool = True

    def forward(self, x: Tensor, *supports: Tensor) -> Tensor:
        if len(supports) != self.num_supports:
            raise ValueError(f"diffusion convolution built for {self.num_supports} supports, got {len(supports)}")
        n = x.shape[0]
        flat = x.reshape(n, -1)  # [N, rest*C]: one copy (x is often a permuted view), shared by every support
        terms = [flat]
        for a in supports:
            h = flat
            for _ in range(self.K):
                h = a @ h  # [N, rest*C]; sparse CSR (fastest on CPU), COO or dense
                terms.append(h)
        if self.fused:
            return linear_of_terms(terms, x.shape, [lin.weight for lin in self.lins], self.lins[0].bias)
        out = self.lins[0](flat.view(x.shape))
        for lin, h in zip(self.lins[1:], terms[1:]):
            out = out + lin(h.view(x.shape))
        return out

    def load_joint_weights(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Rewrite, in ``state_dict``, one joint map of the concatenated terms (``<prefix>mlp.weight``
        ``[out, in * (1 + S*K)]`` or 1x1-convolution ``[out, in * (1 + S*K), 1, 1]`` and
        ``<prefix>mlp.bias``: Graph WaveNet checkpoints and packages of fedldt 0.1.0, before this layer
        was shared) into this
        layer's per-term keys; a state dict without them is left as it is."""
        w = state_dict.get(f"{prefix}mlp.weight")
        if not isinstance(w, Tensor) or w.dim() not in (2, 4) or w.shape[1] % len(self.lins):
            return
        del state_dict[f"{prefix}mlp.weight"]
        for i, block in enumerate(w.reshape(w.shape[0], w.shape[1]).split(w.shape[1] // len(self.lins), dim=1)):
            state_dict[f"{prefix}lins.{i}.weight"] = block
        if f"{prefix}mlp.bias" in state_dict:
            state_dict[f"{prefix}lins.0.bias"] = state_dict.pop(f"{prefix}mlp.bias")


@contextmanager
def per_term_linears(model: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`DiffusionConv` of ``model`` maps each term through its own
    ``nn.Linear`` (``fused = False``): the same outputs, but each module's own forward runs, which
    Opacus' per-sample gradient hooks need (DP-SGD, :func:`fedldt.engine.train_epochs_dpsgd`).
    The previous setting is restored on exit."""
    convs = [m for m in model.modules() if isinstance(m, DiffusionConv)]
    before = [c.fused for c in convs]
    for c in convs:
        c.fused = False
    try:
        yield
    finally:
        for c, fused in zip(convs, before):
            c.fused = fused
