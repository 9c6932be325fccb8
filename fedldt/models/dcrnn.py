"""DCRNN-style forecaster: diffusion-convolution GRU encoder with a direct multi-step readout.

Li, Yu, Shahabi, Liu, "Diffusion Convolutional Recurrent Neural Network: Data-Driven Traffic
Forecasting", ICLR 2018. The diffusion convolution (their eq. 2;
:class:`fedldt.models.diffusion.DiffusionConv`, shared with Graph WaveNet) mixes ``K`` steps of
the forward random walk ``D_in^-1 W`` and of the reverse walk on the transposed graph, each with
its own weight matrix; the DCGRU cell replaces the GRU's matrix products by this convolution
(their eq. 3). Unlike the paper's seq2seq decoder, this model reads the ``horizon`` forecasts
off the encoder's last hidden state with a per-node linear layer (as in e.g. AGCRN).

No parameter depends on the number of nodes: territories of different sizes share one model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field
from torch import Tensor, nn

from fedldt.models.diffusion import DiffusionConv, to_csr, transition_matrices


def plus_last_observed(out: Tensor, x: Tensor) -> Tensor:
    """``out`` ``[batch, horizon, node, C]`` plus the last input step's first ``C`` channels of
    ``x`` ``[batch, window, node, F]`` (the scaled values): the ``residual`` option of the models,
    which then forecast the change from the last observed value."""
    return out + x[:, -1:, :, : out.shape[-1]]


class DCGRUCell(nn.Module):
    """GRU cell whose linear maps are diffusion convolutions (Li et al. 2018, eq. 3).

    Shapes: x ``[node, batch, in]``, h ``[node, batch, hidden]`` -> ``[node, batch, hidden]``.
    """

    def __init__(self, in_channels: int, hidden: int, K: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gates = DiffusionConv(in_channels + hidden, 2 * hidden, K)
        self.cand = DiffusionConv(in_channels + hidden, hidden, K)

    def forward(self, x: Tensor, h: Tensor, p_f: Tensor, p_b: Tensor) -> Tensor:
        ru = torch.sigmoid(self.gates(torch.cat([x, h], dim=-1), p_f, p_b))
        r, u = ru.split(self.hidden, dim=-1)
        c = torch.tanh(self.cand(torch.cat([x, r * h], dim=-1), p_f, p_b))
        return u * h + (1.0 - u) * c


@dataclass
class DCRNNConfig:
    """Hyper-parameters of :class:`DCRNNForecaster` (data sizes are injected at build time).

    The defaults are those of ``conf/model/dcrnn.yaml`` and the ``Field`` ranges are checked for a
    config by :mod:`fedldt.schema` before any run starts (``tests/test_schema.py``).

    Attributes:
        in_channels: input features per node and step (values + covariates), from the data.
        out_channels: forecast channels per node, from the data.
        horizon: forecast steps.
        hidden: GRU hidden size.
        num_layers: stacked DCGRU layers.
        K: diffusion steps.
        dropout: dropout on the last hidden state before the readout.
        residual: forecast the change from the last observed value (the readout is added to
            the last input step's value channels), which suits smooth series where persistence
            is strong; requires the first ``out_channels`` inputs to be the scaled values.
    """

    in_channels: int
    out_channels: int
    horizon: int
    hidden: Annotated[int, Field(ge=1, le=1024)] = 32
    num_layers: Annotated[int, Field(ge=1, le=8)] = 1
    K: Annotated[int, Field(ge=1, le=8)] = 2
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    residual: bool = False


class DCRNNForecaster(nn.Module):
    """DCGRU encoder + per-node linear readout of all horizon steps (DCRNN, ICLR 2018).

    Shapes:
        x ``[batch, window, node, in_channels]`` -> ``[batch, horizon, node, out_channels]``
        (scaled units). ``edge_index`` ``[2, E]`` int64, ``edge_weight`` ``[E]`` float32.
    """

    name = "dcrnn"

    def __init__(self, cfg: DCRNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dims = [cfg.in_channels] + [cfg.hidden] * cfg.num_layers
        self.cells = nn.ModuleList(DCGRUCell(dims[i], cfg.hidden, cfg.K) for i in range(cfg.num_layers))
        self.dropout = nn.Dropout(cfg.dropout)
        self.readout = nn.Linear(cfg.hidden, cfg.horizon * cfg.out_channels)

    def local_parameter_names(self) -> list[str]:
        """State-dict keys that depend on a territory's nodes: none."""
        return []

    def head_parameter_names(self) -> list[str]:
        """State-dict keys of the output head (the readout layer), local under FedPer."""
        return [k for k in self.state_dict() if k.startswith("readout.")]

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        p_f, p_b = transition_matrices(edge_index, edge_weight.to(x.dtype), x.shape[2])
        # CSR: one sparse-dense product per diffusion step is about 4x faster on CPU than COO
        return self.forward_dense(x, to_csr(p_f), to_csr(p_b))

    def graph_operators(self, edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
        """The fixed graph as dense matrices for :meth:`forward_dense`: ``(P_f, P_b)``, each
        ``[node, node]`` float32 (:func:`transition_matrices`)."""
        p_f, p_b = transition_matrices(edge_index, edge_weight.float(), num_nodes)
        return p_f.to_dense(), p_b.to_dense()

    def forward_dense(self, x: Tensor, p_f: Tensor, p_b: Tensor) -> Tensor:
        """:meth:`forward` with the transition matrices already built (sparse or dense
        ``[node, node]``, see :func:`transition_matrices`); with the dense ones of
        :meth:`graph_operators` it is the fixed-graph ONNX export path."""
        b, t, n, _ = x.shape
        xs = x.permute(1, 2, 0, 3)  # [T, N, B, F]
        hs = [x.new_zeros(n, b, self.cfg.hidden) for _ in self.cells]
        for step in range(t):
            inp = xs[step]  # [N, B, F]
            for i, cell in enumerate(self.cells):
                hs[i] = cell(inp, hs[i], p_f, p_b)  # [N, B, H]
                inp = hs[i]
        out = self.readout(self.dropout(hs[-1]))  # [N, B, horizon*C]
        out = out.view(n, b, self.cfg.horizon, self.cfg.out_channels).permute(1, 2, 0, 3)  # [B, H, N, C]
        return plus_last_observed(out, x) if self.cfg.residual else out
