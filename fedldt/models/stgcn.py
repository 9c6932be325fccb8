"""STGCN forecaster: stacked ST-Conv blocks (gated temporal conv, Chebyshev graph conv, gated
temporal conv) and an output layer that reads all ``horizon`` steps at once.

Yu, Yin, Zhu, "Spatio-Temporal Graph Convolutional Networks: A Deep Learning Framework for
Traffic Forecasting", IJCAI 2018. Each ST-Conv block (their Sec. 3.4, Fig. 2) is a "sandwich": a
gated temporal convolution (GLU, Sec. 3.3), a spatial Chebyshev graph convolution with ``Ks``
terms (Sec. 3.2, here PyG's :class:`~torch_geometric.nn.ChebConv`) with ReLU, a second gated
temporal convolution, then layer normalisation and dropout. The output layer is a gated
temporal convolution with kernel ``output_kernel`` followed by a per-node MLP.

Differences from the paper (the first two so that territories of any size and any window share
one model):

* layer normalisation is over channels only (the authors normalise over ``[node, channel]``,
  which would give every node its own scale and bias);
* the output layer reads the last time step of the output temporal convolution and predicts
  all ``horizon`` steps directly (the paper predicts one step; its output kernel spans the
  remaining window, which would tie the weights to ``task.window``). With a window longer than
  :attr:`STGCNForecaster.receptive_field` the earliest steps are therefore not used;
* the graph is made undirected (``to_undirected``, mean of the two directions' weights) before
  the symmetric-normalised Laplacian is built, and ``lambda_max`` is approximated by 2 (as in
  ChebNet), so the spectral filter is well defined on any input graph.

No parameter depends on the number of nodes or on the window length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch_geometric.nn import ChebConv
from torch_geometric.utils import to_undirected

from fedldt.models.dcrnn import plus_last_observed


def undirected_graph(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """The graph with every edge in both directions; a pair given both ways gets the mean of its
    two weights (PyG's ``to_undirected``). STGCN's spectral filter needs a symmetric adjacency.

    Returns:
        ``(edge_index [2, E'], edge_weight [E'])``, coalesced.
    """
    return to_undirected(edge_index, edge_weight, num_nodes=num_nodes, reduce="mean")


def scaled_laplacian(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> Tensor:
    """Dense ``[node, node]`` float32 matrix of the operator STGCN's ChebConv applies:
    ``L~ = 2 L_sym / lambda_max - I`` with ``lambda_max = 2``, i.e. ``-D^-1/2 A D^-1/2`` of the
    undirected graph (:func:`undirected_graph`), built with PyG's own normalization so that
    ``L~ @ x`` equals ChebConv's propagation (``out[i] = sum over edges j->i``).
    """
    ei, ew = undirected_graph(edge_index, edge_weight.float(), num_nodes)
    conv = ChebConv(1, 1, K=2, normalization="sym")
    ei, norm = conv.__norm__(ei, num_nodes, ew, "sym", 2.0, dtype=ew.dtype)
    lap = torch.zeros(num_nodes, num_nodes, dtype=ew.dtype)
    return lap.index_put_((ei[1], ei[0]), norm, accumulate=True)  # row = target, column = source


class Align(nn.Module):
    """Residual path that brings ``c_in`` channels to ``c_out`` (as in the authors' code):
    identity when equal, zero-padding of the extra channels when ``c_in < c_out``, a 1x1
    convolution when ``c_in > c_out``.

    Shapes: x ``[batch, c_in, time, node]`` -> ``[batch, c_out, time, node]``.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.proj = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in > c_out else None

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            return self.proj(x)
        if self.c_in < self.c_out:
            return F.pad(x, (0, 0, 0, 0, 0, self.c_out - self.c_in))  # zero channels appended
        return x


class TemporalGLU(nn.Module):
    """Gated temporal convolution (Yu et al. 2018, Sec. 3.3) with the authors' residual.

    A convolution over time with kernel ``Kt`` and no padding, shared by all nodes, gives
    ``2 * c_out`` channels split into ``P`` and ``Q``; the output is
    ``(P + align(x)) * sigmoid(Q)``, where ``align(x)`` is the input's last ``T - Kt + 1``
    steps brought to ``c_out`` channels by :class:`Align`.

    Args:
        c_in: input channels.
        c_out: output channels.
        Kt: temporal kernel size (>= 1).

    Shapes:
        x ``[batch, c_in, time, node]`` -> ``[batch, c_out, time - Kt + 1, node]``.
    """

    def __init__(self, c_in: int, c_out: int, Kt: int) -> None:
        super().__init__()
        self.Kt = Kt
        self.conv = nn.Conv2d(c_in, 2 * c_out, kernel_size=(Kt, 1))
        self.align = Align(c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        p, q = self.conv(x).chunk(2, dim=1)  # 2 x [B, c_out, T-Kt+1, N]
        return (p + self.align(x[:, :, self.Kt - 1 :, :])) * torch.sigmoid(q)


class STConvBlock(nn.Module):
    """ST-Conv block (Yu et al. 2018, Sec. 3.4, Fig. 2): GLU temporal conv -> Chebyshev graph conv with
    ReLU (and the authors' aligned residual) -> GLU temporal conv -> LayerNorm over channels
    -> dropout.

    Args:
        c_in: input channels.
        c_t: channels of the two temporal convolutions (the block's output channels).
        c_s: channels of the spatial graph convolution (the bottleneck).
        Kt: temporal kernel size.
        Ks: Chebyshev terms (PyG's ``K``: ``Ks=3`` uses polynomials up to order 2).
        dropout: dropout after the normalisation.

    Shapes:
        x ``[batch, c_in, time, node]`` -> ``[batch, c_t, time - 2 (Kt - 1), node]``;
        ``edge_index`` ``[2, E]``, ``edge_weight`` ``[E]`` (undirected, see the module).
    """

    def __init__(self, c_in: int, c_t: int, c_s: int, Kt: int, Ks: int, dropout: float) -> None:
        super().__init__()
        self.temporal1 = TemporalGLU(c_in, c_t, Kt)
        self.cheb = ChebConv(c_t, c_s, K=Ks, normalization="sym")
        self.align = Align(c_t, c_s)
        self.temporal2 = TemporalGLU(c_s, c_t, Kt)
        self.norm = nn.LayerNorm(c_t)
        self.dropout = nn.Dropout(dropout)

    def spatial(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        """``relu(cheb(x) + align(x))`` with ``lambda_max = 2``, i.e. ``L~ = -D^-1/2 A D^-1/2``.

        Shapes: x ``[batch, c_t, time, node]`` -> ``[batch, c_s, time, node]``.
        """
        # ChebConv propagates along dim -2 (nodes) with any leading dims: one static graph for all (b, t).
        h = self.cheb(x.permute(0, 2, 3, 1), edge_index, edge_weight, lambda_max=2.0)  # [B, T, N, Cs]
        return torch.relu(h.permute(0, 3, 1, 2) + self.align(x))  # [B, Cs, T, N]

    def spatial_dense(self, x: Tensor, lap: Tensor) -> Tensor:
        """:meth:`spatial` with the scaled Laplacian given as a dense matrix (the export path:
        no scatter, only matrix products, which ONNX exports).

        Shapes: x ``[batch, c_t, time, node]``, lap ``[node, node]`` from
        :func:`scaled_laplacian` -> ``[batch, c_s, time, node]``.
        """
        tx0 = x.permute(0, 2, 3, 1)  # [B, T, N, Ct]
        h = self.cheb.lins[0](tx0)
        if len(self.cheb.lins) > 1:
            tx1 = torch.einsum("ij,btjc->btic", lap, tx0)
            h = h + self.cheb.lins[1](tx1)
            for lin in self.cheb.lins[2:]:  # Chebyshev recursion T_k = 2 L~ T_{k-1} - T_{k-2}
                tx2 = 2.0 * torch.einsum("ij,btjc->btic", lap, tx1) - tx0
                h = h + lin(tx2)
                tx0, tx1 = tx1, tx2
        if self.cheb.bias is not None:
            h = h + self.cheb.bias
        return torch.relu(h.permute(0, 3, 1, 2) + self.align(x))  # [B, Cs, T, N]

    def forward(self, x: Tensor, edge_index: Tensor | None = None, edge_weight: Tensor | None = None,
                lap: Tensor | None = None) -> Tensor:
        """Shapes: x ``[batch, c_in, time, node]`` -> ``[batch, c_t, time', node]``; the graph as
        ``edge_index``/``edge_weight`` (PyG's ChebConv) or as the dense ``lap`` (export)."""
        x = self.temporal1(x)  # [B, Ct, T1, N]
        s = self.spatial(x, edge_index, edge_weight) if lap is None else self.spatial_dense(x, lap)
        x = self.temporal2(s)  # [B, Ct, T2, N]
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # [B, Ct, T2, N]
        return self.dropout(x)


@dataclass
class STGCNConfig:
    """Hyper-parameters of :class:`STGCNForecaster` (data sizes are injected at build time).

    The defaults are those of ``conf/model/stgcn.yaml`` and the ``Field`` ranges are checked for a
    config by :mod:`fedldt.schema` before any run starts (``tests/test_schema.py``).

    Attributes:
        in_channels: input features per node and step (values + covariates), from the data.
        out_channels: forecast channels per node, from the data.
        horizon: forecast steps, from the task.
        temporal_channels: channels of the temporal convolutions (paper: 64).
        spatial_channels: channels of the graph convolution bottleneck (paper: 16).
        num_blocks: ST-Conv blocks (paper: 2).
        Kt: temporal kernel size (paper: 3).
        Ks: Chebyshev terms (PyG's ``K``; paper: 3, i.e. polynomials up to order 2).
        output_kernel: temporal kernel of the output layer (paper: the remaining window, 4 for
            a 12-step window with the defaults above).
        dropout: dropout at the end of each block.
        residual: forecast the change from the last observed value
            (:func:`fedldt.models.dcrnn.plus_last_observed`).
    """

    in_channels: int
    out_channels: int
    horizon: int
    temporal_channels: Annotated[int, Field(ge=1, le=1024)] = 32
    spatial_channels: Annotated[int, Field(ge=1, le=1024)] = 16
    num_blocks: Annotated[int, Field(ge=1, le=8)] = 2
    Kt: Annotated[int, Field(ge=1, le=12)] = 3
    Ks: Annotated[int, Field(ge=1, le=8)] = 3
    output_kernel: Annotated[int, Field(ge=1, le=100)] = 4
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    residual: bool = False


class STGCNForecaster(nn.Module):
    """STGCN (Yu, Yin, Zhu, IJCAI 2018) with a direct multi-step output layer.

    Args:
        cfg: hyper-parameters and data-injected sizes.

    Shapes:
        x ``[batch, window, node, in_channels]`` -> ``[batch, horizon, node, out_channels]``
        (scaled units). ``edge_index`` ``[2, E]`` int64, ``edge_weight`` ``[E]`` float.

    Raises:
        ValueError: (at build) a hyper-parameter out of range, named; (in ``forward``) a window
            shorter than :attr:`receptive_field`, naming ``task.window`` and the fix.
    """

    name = "stgcn"

    def __init__(self, cfg: STGCNConfig) -> None:
        super().__init__()
        for field in ("num_blocks", "Kt", "Ks", "output_kernel", "temporal_channels", "spatial_channels"):
            if int(getattr(cfg, field)) < 1:
                raise ValueError(f"model.{field}={getattr(cfg, field)!r} must be >= 1")
        self.cfg = cfg
        c_t = cfg.temporal_channels
        self.blocks = nn.ModuleList(
            STConvBlock(cfg.in_channels if i == 0 else c_t, c_t, cfg.spatial_channels, cfg.Kt, cfg.Ks, cfg.dropout)
            for i in range(cfg.num_blocks)
        )
        self.out_temporal = TemporalGLU(c_t, c_t, cfg.output_kernel)
        self.out_norm = nn.LayerNorm(c_t)
        self.out_fc = nn.Sequential(nn.Linear(c_t, c_t), nn.ReLU(), nn.Linear(c_t, cfg.horizon * cfg.out_channels))

    @property
    def receptive_field(self) -> int:
        """Input steps one forecast sees: ``num_blocks * 2 * (Kt - 1) + output_kernel``; the
        smallest ``task.window`` the model accepts."""
        return self.cfg.num_blocks * 2 * (self.cfg.Kt - 1) + self.cfg.output_kernel

    def local_parameter_names(self) -> list[str]:
        """State-dict keys that depend on a territory's nodes: none."""
        return []

    def head_parameter_names(self) -> list[str]:
        """State-dict keys of the output block (temporal GLU, layer norm, fully connected
        layers), local under FedPer."""
        return [k for k in self.state_dict() if k.startswith(("out_temporal.", "out_norm.", "out_fc."))]

    def forward(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        edge_index, edge_weight = undirected_graph(edge_index, edge_weight.to(x.dtype), x.shape[2])
        return self._forward(x, lambda block, h: block(h, edge_index, edge_weight))

    def graph_operators(self, edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor]:
        """The fixed graph as dense matrices for :meth:`forward_dense`: ``(L~ [node, node],)``
        (:func:`scaled_laplacian`)."""
        return (scaled_laplacian(edge_index, edge_weight, num_nodes),)

    def forward_dense(self, x: Tensor, lap: Tensor) -> Tensor:
        """:meth:`forward` on a fixed graph given by :meth:`graph_operators` (dense products only:
        the ONNX export path). Shapes as :meth:`forward`."""
        return self._forward(x, lambda block, h: block(h, lap=lap))

    def _forward(self, x: Tensor, run_block) -> Tensor:
        b, t, n, _ = x.shape
        if t < self.receptive_field:
            c = self.cfg
            raise ValueError(
                f"task.window={t} is shorter than STGCN's temporal receptive field {self.receptive_field} "
                f"(= num_blocks*2*(Kt-1) + output_kernel = {c.num_blocks}*2*({c.Kt}-1) + {c.output_kernel}); "
                "raise task.window or lower model.num_blocks, model.Kt or model.output_kernel"
            )
        h = x.permute(0, 3, 1, 2)  # [B, F, T, N]
        for block in self.blocks:
            h = run_block(block, h)  # [B, Ct, T', N]
        h = self.out_temporal(h)[:, :, -1, :]  # [B, Ct, N] (last step)
        h = self.out_norm(h.transpose(1, 2))  # [B, N, Ct]
        out = self.out_fc(h)  # [B, N, horizon*C]
        out = out.view(b, n, self.cfg.horizon, self.cfg.out_channels).permute(0, 2, 1, 3)  # [B, H, N, C]
        return plus_last_observed(out, x) if self.cfg.residual else out
