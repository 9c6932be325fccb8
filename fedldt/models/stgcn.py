"""STGCN forecaster: stacked ST-Conv blocks (gated temporal conv, Chebyshev graph conv, gated
temporal conv) and an output layer that reads all ``horizon`` steps at once.

Yu, Yin, Zhu, "Spatio-Temporal Graph Convolutional Networks: A Deep Learning Framework for
Traffic Forecasting", IJCAI 2018. Each ST-Conv block (their Sec. 3.4, Fig. 2) is a "sandwich": a
gated temporal convolution (GLU, Sec. 3.3), a spatial Chebyshev graph convolution with ``Ks``
terms (Sec. 3.2; the weights of PyG's :class:`~torch_geometric.nn.ChebConv`, applied with one sparse
matrix product per Chebyshev step, :meth:`STConvBlock.spatial`) with ReLU, a second gated
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

Layout: activations are node-major and channel-last, ``[node, batch, time, channel]``, inside
the model: a Chebyshev step is one sparse product over ``[node, batch*time*channel]`` and each
temporal convolution one matrix product over its ``Kt`` shifted inputs side by side, with the
weights of the ``nn.Conv2d`` modules (state dicts are those of the convolution layout;
``tests/test_fast_paths.py`` checks the two layouts give the same outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch_geometric.nn import ChebConv
from torch_geometric.utils import get_laplacian, to_undirected

from fedldt.models.dcrnn import plus_last_observed
from fedldt.models.diffusion import to_csr
from fedldt.models.ops import linear_of_terms, temporal_conv


def undirected_graph(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor, Tensor]:
    """The graph with every edge in both directions; a pair given both ways gets the mean of its
    two weights (PyG's ``to_undirected``). STGCN's spectral filter needs a symmetric adjacency.

    Returns:
        ``(edge_index [2, E'], edge_weight [E'])``, coalesced.
    """
    return to_undirected(edge_index, edge_weight, num_nodes=num_nodes, reduce="mean")


def scaled_laplacian(edge_index: Tensor, edge_weight: Tensor, num_nodes: int, sparse: bool = False) -> Tensor:
    """``[node, node]`` matrix of the operator STGCN's Chebyshev convolution applies:
    ``L~ = 2 L_sym / lambda_max - I`` with ``lambda_max = 2``, i.e. ``-D^-1/2 A D^-1/2`` of the
    undirected graph (:func:`undirected_graph`) without its self-loops, built with PyG's own
    ChebConv normalization (``get_laplacian``) so that ``L~ @ x`` equals ChebConv's propagation
    (``out[i] = sum over edges j->i``; row = target, column = source).

    Args:
        edge_index: ``[2, E]`` int64, any direction, self-loops allowed (dropped, as ChebConv does).
        edge_weight: ``[E]`` float; the operator has its dtype and device.
        num_nodes: N.
        sparse: return a coalesced sparse COO matrix (training: one ``torch.sparse.mm`` per
            Chebyshev step) instead of a dense one (the ONNX export path).
    """
    ei, ew = undirected_graph(edge_index, edge_weight, num_nodes)
    ei, norm = get_laplacian(ei, ew, "sym", ew.dtype, num_nodes)  # I - D^-1/2 A D^-1/2, loops removed first
    off = ei[0] != ei[1]  # ChebConv: 2 L / lambda_max - I = L - I, whose diagonal is exactly 0
    ei, norm = ei[:, off], norm[off]
    if sparse:
        return torch.sparse_coo_tensor(torch.stack([ei[1], ei[0]]), norm, (num_nodes, num_nodes),
                                       check_invariants=False).coalesce()
    lap = torch.zeros(num_nodes, num_nodes, dtype=ew.dtype, device=ew.device)
    return lap.index_put_((ei[1], ei[0]), norm, accumulate=True)


def chebyshev_terms(x: Tensor, lap: Tensor, K: int) -> list[Tensor]:
    """``[T_0(L~) x, ..., T_{K-1}(L~) x]`` by the Chebyshev recursion ``T_k = 2 L~ T_{k-1} - T_{k-2}``,
    one matrix product per step over every column at once (lap sparse CSR, the fastest on CPU, COO or dense).

    Shapes: x ``[node, cols]`` (node-major: all batch items, steps and channels as columns),
    lap ``[node, node]`` -> K tensors ``[node, cols]``.
    """
    terms = [x]
    if K > 1:
        terms.append(lap @ x)
    for _ in range(2, K):
        terms.append(2.0 * (lap @ terms[-1]) - terms[-2])
    return terms


class Align(nn.Module):
    """Residual path that brings ``c_in`` channels to ``c_out`` (as in the authors' code):
    identity when equal, zero-padding of the extra channels when ``c_in < c_out``, a 1x1
    convolution when ``c_in > c_out``.

    Shapes: x ``[node, batch, time, c_in]`` -> ``[node, batch, time, c_out]`` (channel-last).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.proj = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in > c_out else None

    def forward(self, x: Tensor) -> Tensor:
        if self.proj is not None:
            return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # the 1x1 convolution's map
        if self.c_in < self.c_out:
            return F.pad(x, (0, self.c_out - self.c_in))  # zero channels appended
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
        x ``[node, batch, time, c_in]`` -> ``[node, batch, time - Kt + 1, c_out]`` (node-major,
        channel-last: the ``(Kt, 1)`` convolution, whose module holds the weights, is one matrix
        product over the ``Kt`` shifted copies of the input side by side).
    """

    def __init__(self, c_in: int, c_out: int, Kt: int) -> None:
        super().__init__()
        self.Kt = Kt
        self.conv = nn.Conv2d(c_in, 2 * c_out, kernel_size=(Kt, 1))
        self.align = Align(c_in, c_out)

    def forward(self, x: Tensor) -> Tensor:
        pq = temporal_conv(x, self.conv.weight[..., 0], self.conv.bias)  # kernel (Kt, 1): [2 c_out, c_in, Kt]
        p, q = pq.chunk(2, dim=-1)  # 2 x [N, B, T-Kt+1, c_out]
        return (p + self.align(x[:, :, self.Kt - 1 :])) * torch.sigmoid(q)


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
        x ``[node, batch, time, c_in]`` -> ``[node, batch, time - 2 (Kt - 1), c_t]``;
        the graph as the scaled Laplacian ``lap`` ``[node, node]`` (:func:`scaled_laplacian`, sparse
        or dense). The parameters are those of PyG's ``ChebConv`` (``cheb.lins.<k>.weight``,
        ``cheb.bias``), so checkpoints from before the sparse operator load unchanged.
    """

    def __init__(self, c_in: int, c_t: int, c_s: int, Kt: int, Ks: int, dropout: float) -> None:
        super().__init__()
        self.temporal1 = TemporalGLU(c_in, c_t, Kt)
        self.cheb = ChebConv(c_t, c_s, K=Ks, normalization="sym")
        self.align = Align(c_t, c_s)
        self.temporal2 = TemporalGLU(c_s, c_t, Kt)
        self.norm = nn.LayerNorm(c_t)
        self.dropout = nn.Dropout(dropout)

    def spatial(self, x: Tensor, lap: Tensor) -> Tensor:
        """``relu(cheb(x) + align(x))``: PyG's ChebConv map (its weights ``cheb.lins``, ``cheb.bias``)
        with ``lambda_max = 2``, i.e. ``L~ = -D^-1/2 A D^-1/2``, computed node-major with one
        matrix product per Chebyshev step (:func:`chebyshev_terms`) instead of ChebConv's
        per-edge gather/scatter over every (batch, time, channel) message.

        Shapes: x ``[node, batch, time, c_t]``, lap ``[node, node]`` from :func:`scaled_laplacian`
        (sparse CSR or COO, or dense) -> ``[node, batch, time, c_s]``.
        """
        n = x.shape[0]
        terms = chebyshev_terms(x.reshape(n, -1), lap, len(self.cheb.lins))  # K x [N, B*T*Ct]
        h = linear_of_terms(terms, x.shape, [lin.weight for lin in self.cheb.lins], self.cheb.bias)  # [N, B, T, Cs]
        return torch.relu(h + self.align(x))  # [N, B, T, Cs]

    def forward(self, x: Tensor, lap: Tensor) -> Tensor:
        """Shapes: x ``[node, batch, time, c_in]``, lap ``[node, node]`` (:func:`scaled_laplacian`,
        sparse or dense) -> ``[node, batch, time', c_t]``."""
        x = self.temporal1(x)  # [N, B, T1, Ct]
        x = self.temporal2(self.spatial(x, lap))  # [N, B, T2, Ct]
        return self.dropout(self.norm(x))  # LayerNorm over the channels


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
        lap = scaled_laplacian(edge_index, edge_weight.to(x.dtype), x.shape[2], sparse=True)  # [N, N] sparse
        lap = to_csr(lap)  # a sparse-dense product about 4x faster on CPU than with COO
        return self._forward(x, lap)

    def graph_operators(self, edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> tuple[Tensor]:
        """The fixed graph as dense matrices for :meth:`forward_dense`: ``(L~ [node, node],)``
        (:func:`scaled_laplacian`)."""
        return (scaled_laplacian(edge_index, edge_weight.float(), num_nodes),)

    def forward_dense(self, x: Tensor, lap: Tensor) -> Tensor:
        """:meth:`forward` on a fixed graph given by :meth:`graph_operators` (dense products only:
        the ONNX export path). Shapes as :meth:`forward`."""
        return self._forward(x, lap)

    def _forward(self, x: Tensor, lap: Tensor) -> Tensor:
        b, t, n, _ = x.shape
        if t < self.receptive_field:
            c = self.cfg
            raise ValueError(
                f"task.window={t} is shorter than STGCN's temporal receptive field {self.receptive_field} "
                f"(= num_blocks*2*(Kt-1) + output_kernel = {c.num_blocks}*2*({c.Kt}-1) + {c.output_kernel}); "
                "raise task.window or lower model.num_blocks, model.Kt or model.output_kernel"
            )
        # node-major, channel-last activations [N, B, T, C] all along: graph products over
        # [N, B*T*C] without layout changes, temporal convolutions as matrix products
        h = x.permute(2, 0, 1, 3)  # [N, B, T, F]
        for block in self.blocks:
            h = block(h, lap)  # [N, B, T', Ct]
        h = self.out_norm(self.out_temporal(h)[:, :, -1])  # [N, B, Ct] (last step)
        out = self.out_fc(h)  # [N, B, horizon*C]
        out = out.view(n, b, self.cfg.horizon, self.cfg.out_channels).permute(1, 2, 0, 3)  # [B, H, N, C]
        return plus_last_observed(out, x) if self.cfg.residual else out
