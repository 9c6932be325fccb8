"""Graph WaveNet forecaster: dilated causal gated TCN + diffusion graph convolution over the
given transitions and an optional adaptive adjacency learnt from node embeddings.

Wu, Pan, Long, Jiang, Zhang, "Graph WaveNet for Deep Spatial-Temporal Graph Modeling",
IJCAI 2019. Each layer (their Fig. 3) is a gated TCN ``tanh(Θ1 * X) ⊙ σ(Θ2 * X)`` (dilated
causal convolutions, Sec. 3.3), a skip connection, and a graph convolution (Sec. 3.2; the
diffusion convolution :class:`fedldt.models.diffusion.DiffusionConv` shared with DCRNN)

    ``Z = X W_0 + Σ_{k=1..K} P_f^k X W_{k,1} + P_b^k X W_{k,2} + Ã_apt^k X W_{k,3}``

with the forward/backward random-walk transitions ``P_f``, ``P_b`` of the territory's graph
(:func:`fedldt.models.diffusion.transition_matrices`) and, when ``adaptive`` is on, the
self-adaptive adjacency ``Ã_apt = softmax(relu(E1 E2^T))`` (Sec. 3.2, row-wise softmax)
from node embeddings ``E1, E2`` of shape ``[num_nodes, emb_dim]``; then a residual connection
and batch normalisation (as in the authors' code). The skip sum goes through two 1x1
convolutions that output all ``horizon`` steps.

Sharing across territories: with ``adaptive=false`` no parameter depends on the number of
nodes. With ``adaptive=true`` the embeddings ``node_emb1``, ``node_emb2`` are a territory's own
(:meth:`GWNetForecaster.local_parameter_names`); everything else is shared. The
batch-normalisation running statistics (shape ``[channels]``) are shared buffers.

A window shorter than :attr:`GWNetForecaster.receptive_field` is zero-padded on the left (as
in the authors' code); with a longer window the forecast reads the last step of the skip sum,
so only the last ``receptive_field`` steps are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from fedldt.models.dcrnn import plus_last_observed
from fedldt.models.diffusion import DiffusionConv, to_csr, transition_matrices
from fedldt.models.ops import dropout, temporal_conv


class MultiSupportGraphConv(DiffusionConv):
    """Graph WaveNet's graph convolution (Wu et al. 2019, Sec. 3.2): the shared diffusion
    convolution (:class:`fedldt.models.diffusion.DiffusionConv`, powers ``1..order`` of each
    support) in the TCN's channel-first layout, then dropout. Initialised as the paper's single
    1x1 convolution of the concatenated terms (``joint_init``); a state dict in that older layout
    (one ``mlp`` 1x1 convolution, fedldt 0.1.0) still loads (:meth:`DiffusionConv.load_joint_weights`).

    Args:
        c_in: input channels.
        c_out: output channels.
        num_supports: how many support matrices ``forward`` receives.
        order: powers of each support (``K`` in the paper).
        dropout: dropout on the output.

    Shapes:
        x ``[batch, c_in, node, time]`` and ``num_supports`` matrices ``[node, node]`` (sparse
        or dense; ``out_i = Σ_j A[i, j] x_j``) -> ``[batch, c_out, node, time]``.

    Raises:
        ValueError: the number of supports differs from ``num_supports``.
    """

    def __init__(self, c_in: int, c_out: int, num_supports: int, order: int = 2, dropout: float = 0.0) -> None:
        super().__init__(c_in, c_out, K=order, num_supports=num_supports, joint_init=True)
        self.order = order
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, supports: list[Tensor]) -> Tensor:  # type: ignore[override]
        h = super().forward(x.permute(2, 0, 3, 1), *supports)  # [N, B, T, c_out]
        return self.dropout(h.permute(1, 3, 0, 2))  # [B, c_out, N, T]

    def node_major(self, x: Tensor, supports: list[Tensor]) -> Tensor:
        """The same layer on node-major, channel-last activations (no layout change):
        x ``[node, batch, time, c_in]`` -> ``[node, batch, time, c_out]``."""
        return dropout(super().forward(x, *supports), self.dropout.p, self.training)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        self.load_joint_weights(state_dict, prefix)  # the fedldt 0.1.0 layout (as BatchNorm converts old versions)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def adaptive_adjacency(emb1: Tensor, emb2: Tensor) -> Tensor:
    """Self-adaptive adjacency ``softmax(relu(E1 E2^T))`` normalised over each row (Wu et al.
    2019, Sec. 3.2): row ``i`` holds the weights node ``i`` gives to every node.

    Shapes: emb1, emb2 ``[node, emb_dim]`` -> dense ``[node, node]``, rows summing to 1.
    """
    return torch.softmax(torch.relu(emb1 @ emb2.T), dim=1)


@dataclass
class GWNetConfig:
    """Hyper-parameters of :class:`GWNetForecaster` (data sizes are injected at build time).

    The defaults are those of ``conf/model/gwnet.yaml`` and the ``Field`` ranges are checked for a
    config by :mod:`fedldt.schema` before any run starts (``tests/test_schema.py``).

    Attributes:
        in_channels: input features per node and step (values + covariates), from the data.
        out_channels: forecast channels per node, from the data.
        horizon: forecast steps, from the task.
        num_nodes: the territory's number of nodes, from the data; required only when
            ``adaptive`` is true (it sizes the node embeddings), ignored otherwise.
        adaptive: learn the adaptive adjacency from per-territory node embeddings.
        emb_dim: node embedding size (paper: 10).
        residual_channels: channels of the residual stream (paper: 32).
        dilation_channels: channels of the gated TCN (paper: 32).
        skip_channels: channels of the skip sum (paper: 256).
        end_channels: channels of the first output convolution (paper: 512).
        blocks: blocks of ``layers`` layers with dilations 1, 2, 4, ... (paper: 4).
        layers: layers per block (paper: 2).
        kernel_size: TCN kernel size (paper: 2).
        order: powers of each support in the graph convolution (paper: 2).
        dropout: dropout after each graph convolution (paper: 0.3).
        residual: forecast the change from the last observed value
            (:func:`fedldt.models.dcrnn.plus_last_observed`).
    """

    in_channels: int
    out_channels: int
    horizon: int
    num_nodes: int | None = None
    adaptive: bool = True
    emb_dim: Annotated[int, Field(ge=1, le=256)] = 10
    residual_channels: Annotated[int, Field(ge=1, le=1024)] = 32
    dilation_channels: Annotated[int, Field(ge=1, le=1024)] = 32
    skip_channels: Annotated[int, Field(ge=1, le=1024)] = 64
    end_channels: Annotated[int, Field(ge=1, le=2048)] = 128
    blocks: Annotated[int, Field(ge=1, le=8)] = 4
    layers: Annotated[int, Field(ge=1, le=8)] = 2
    kernel_size: Annotated[int, Field(ge=1, le=8)] = 2
    order: Annotated[int, Field(ge=1, le=4)] = 2
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3
    residual: bool = False


class GWNetForecaster(nn.Module):
    """Graph WaveNet (Wu et al., IJCAI 2019) with a direct multi-step output.

    Args:
        cfg: hyper-parameters and data-injected sizes.

    Shapes:
        x ``[batch, window, node, in_channels]`` -> ``[batch, horizon, node, out_channels]``
        (scaled units). ``edge_index`` ``[2, E]`` int64, ``edge_weight`` ``[E]`` float.

    Raises:
        ValueError: (at build) ``adaptive`` is true and ``num_nodes`` is missing or < 1, or a
            hyper-parameter is out of range (named); (in ``forward``) the input's node count
            differs from the ``num_nodes`` the adaptive embeddings were built for.
    """

    name = "gwnet"

    def __init__(self, cfg: GWNetConfig) -> None:
        super().__init__()
        for field in ("blocks", "layers", "kernel_size", "order", "emb_dim", "residual_channels",
                      "dilation_channels", "skip_channels", "end_channels"):
            if int(getattr(cfg, field)) < 1:
                raise ValueError(f"model.{field}={getattr(cfg, field)!r} must be >= 1")
        self.cfg = cfg
        if cfg.adaptive:
            if cfg.num_nodes is None or int(cfg.num_nodes) < 1:
                raise ValueError(
                    f"model.num_nodes={cfg.num_nodes!r}: gwnet with model.adaptive=true needs the territory's "
                    "number of nodes for its node embeddings; build it with "
                    "build_model(cfg, num_nodes=<territory's num_nodes>) or set model.adaptive=false"
                )
            self.node_emb1 = nn.Parameter(torch.randn(int(cfg.num_nodes), cfg.emb_dim))  # [N, emb]
            self.node_emb2 = nn.Parameter(torch.randn(int(cfg.num_nodes), cfg.emb_dim))  # [N, emb]
        r, d, s = cfg.residual_channels, cfg.dilation_channels, cfg.skip_channels
        num_supports = 2 + int(cfg.adaptive)
        self.start = nn.Conv2d(cfg.in_channels, r, kernel_size=1)
        self.filter_convs, self.gate_convs = nn.ModuleList(), nn.ModuleList()
        self.skip_convs, self.gconvs, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.dilations: list[int] = []
        for _ in range(cfg.blocks):
            for layer in range(cfg.layers):
                dil = 2**layer
                self.dilations.append(dil)
                self.filter_convs.append(nn.Conv2d(r, d, kernel_size=(1, cfg.kernel_size), dilation=(1, dil)))
                self.gate_convs.append(nn.Conv2d(r, d, kernel_size=(1, cfg.kernel_size), dilation=(1, dil)))
                self.skip_convs.append(nn.Conv2d(d, s, kernel_size=1))
                self.gconvs.append(MultiSupportGraphConv(d, r, num_supports, cfg.order, cfg.dropout))
                self.norms.append(nn.BatchNorm2d(r))
        self.end1 = nn.Conv2d(s, cfg.end_channels, kernel_size=1)
        self.end2 = nn.Conv2d(cfg.end_channels, cfg.horizon * cfg.out_channels, kernel_size=1)

    @property
    def receptive_field(self) -> int:
        """Input steps one forecast sees: ``1 + (kernel_size - 1) * Σ dilations`` (13 with the
        paper's settings); shorter windows are zero-padded on the left."""
        return 1 + (self.cfg.kernel_size - 1) * sum(self.dilations)

    def local_parameter_names(self) -> list[str]:
        """State-dict keys that depend on a territory's nodes: the two node embeddings when
        ``adaptive`` is on, none otherwise."""
        return ["node_emb1", "node_emb2"] if self.cfg.adaptive else []

    def head_parameter_names(self) -> list[str]:
        """State-dict keys of the output head (the two end 1x1 convolutions), local under FedPer."""
        return [k for k in self.state_dict() if k.startswith(("end1.", "end2."))]

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        p_f, p_b = transition_matrices(edge_index, edge_weight.to(x.dtype), x.shape[2])
        # CSR: one sparse-dense product per diffusion step is about 4x faster on CPU than COO
        return self.forward_dense(x, to_csr(p_f), to_csr(p_b))

    def graph_operators(self, edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
        """The fixed graph as dense matrices for :meth:`forward_dense`: the forward and backward
        random-walk transitions ``(P_f, P_b)``, each ``[node, node]`` float32."""
        p_f, p_b = transition_matrices(edge_index, edge_weight.float(), num_nodes)
        return p_f.to_dense(), p_b.to_dense()

    def forward_dense(self, x: Tensor, p_f: Tensor, p_b: Tensor) -> Tensor:
        """:meth:`forward` with the transition matrices already built (sparse COO or dense
        ``[node, node]``): dense ones make it the ONNX export path. Shapes as :meth:`forward`."""
        b, t, n, _ = x.shape
        supports = [p_f, p_b]
        if self.cfg.adaptive:
            if n != self.node_emb1.shape[0]:
                raise ValueError(
                    f"input has {n} nodes but this gwnet's adaptive embeddings were built for "
                    f"model.num_nodes={self.node_emb1.shape[0]}; build one model per territory with its num_nodes"
                )
            supports.append(adaptive_adjacency(self.node_emb1, self.node_emb2))  # [N, N]
        # Node-major, channel-last activations [N, B, T, C] all along: every 1x1 or (1 x kernel_size)
        # convolution of the paper is one matrix product over the last dim (the convolution modules
        # hold the weights, so state dicts are unchanged), and a graph product is a product over
        # [N, B*T*C] with no layout change. About 2x the speed of the [B, C, N, T] convolutions on CPU.
        h = x.permute(2, 0, 1, 3)  # [N, B, T, F]
        if t < self.receptive_field:
            h = F.pad(h, (0, 0, self.receptive_field - t, 0))  # left zero-padding to the receptive field
        h = F.linear(h, self.start.weight.flatten(1), self.start.bias)  # [N, B, T, R]
        d = self.cfg.dilation_channels
        skip: Tensor | None = None  # the skip sum at the last step, the only one the output reads
        for i, dil in enumerate(self.dilations):
            res = h
            tcn = torch.cat([self.filter_convs[i].weight, self.gate_convs[i].weight])[:, :, 0, :]  # [2D, R, ks]
            fg = temporal_conv(h, tcn, torch.cat([self.filter_convs[i].bias, self.gate_convs[i].bias]), dil)
            steps = fg.shape[2]  # T' of the dilated causal convolution; fg [N, B, T', 2D] (filter and gate)
            filt, gate = fg.split(d, dim=-1)  # each [N, B, T', D]; the backward is one concatenation
            g = torch.tanh(filt) * torch.sigmoid(gate)  # gated TCN [N, B, T', D]
            s = F.linear(g[:, :, -1], self.skip_convs[i].weight.flatten(1), self.skip_convs[i].bias)  # [N, B, S]
            skip = s if skip is None else s + skip
            h = self.gconvs[i].node_major(g, supports) + res[:, :, -steps:]  # [N, B, T', R]
            # BatchNorm2d over every (node, window, step) of a channel: the statistics of the paper's layout
            h = self.norms[i](h.reshape(-1, h.shape[-1], 1, 1)).view(h.shape)
        assert skip is not None
        out = torch.relu(skip)  # [N, B, S] (last step)
        out = torch.relu(F.linear(out, self.end1.weight.flatten(1), self.end1.bias))  # [N, B, E]
        out = F.linear(out, self.end2.weight.flatten(1), self.end2.bias)  # [N, B, H*C]
        out = out.view(n, b, self.cfg.horizon, self.cfg.out_channels).permute(1, 2, 0, 3)  # [B, H, N, C]
        return plus_last_observed(out, x) if self.cfg.residual else out
