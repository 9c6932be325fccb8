"""Sensor-graph preprocessing shared by every dataset: one self-loop per node, and its normalisation.

Every :class:`~fedldt.data.territory.TerritoryDataset` passes its graph through
:func:`complete_self_loops` when it is built, so every loader (Los-loop, CHARGED, territory data
packages) and every territory cut from a network ends with exactly one self-loop per node: added
(weight 1) where missing, never doubled. The models normalise the graph themselves, as their
papers do (DCRNN and Graph WaveNet: forward and reverse random walks, valid for directed graphs;
STGCN: symmetric normalisation of the graph made undirected); :func:`normalized_adjacency` gives
the matrix that applies to a graph (symmetric normalisation only when the graph is symmetric,
both random walks otherwise) for reports and tests.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch_geometric.utils import add_remaining_self_loops, coalesce, is_undirected


def self_loop_counts(edge_index: Tensor, num_nodes: int) -> Tensor:
    """``[node]`` int64: how many self-loop edges ``i -> i`` each node has."""
    ei = torch.as_tensor(edge_index, dtype=torch.long)
    loops = ei[0] == ei[1]
    return torch.bincount(ei[0][loops], minlength=num_nodes)


def complete_self_loops(edge_index: Tensor, edge_weight: Tensor, num_nodes: int,
                        fill_value: float = 1.0) -> tuple[Tensor, Tensor]:
    """The graph with exactly one self-loop per node.

    A graph that already has one self-loop per node and no repeated edge is returned unchanged
    (same edge order, so the built-in datasets' graphs are bit-identical). Otherwise repeated
    edges are merged into one with the mean of their weights (PyG ``coalesce``), and a self-loop
    of weight ``fill_value`` is added to each node without one (PyG ``add_remaining_self_loops``;
    an existing self-loop keeps its weight). The result is sorted by (source, target).

    Args:
        edge_index: ``[2, E]`` int64, source row 0, target row 1.
        edge_weight: ``[E]`` float32 positive weights.
        num_nodes: N.
        fill_value: weight of an added self-loop.

    Returns:
        ``(edge_index [2, E'], edge_weight [E'])``.
    """
    ei = torch.as_tensor(edge_index, dtype=torch.long)
    ew = torch.as_tensor(edge_weight, dtype=torch.float32)
    if num_nodes == 0:
        return ei, ew
    counts = self_loop_counts(ei, num_nodes)
    flat = ei[0] * num_nodes + ei[1]
    if bool((counts == 1).all()) and flat.unique().numel() == flat.numel():
        return ei, ew
    ei, ew = coalesce(ei, ew, num_nodes=num_nodes, reduce="mean")
    ei, ew = add_remaining_self_loops(ei, ew, fill_value=float(fill_value), num_nodes=num_nodes)
    return coalesce(ei, ew, num_nodes=num_nodes)


def is_symmetric(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> bool:
    """Whether every edge ``i -> j`` has a reverse ``j -> i`` of the same weight (PyG ``is_undirected``)."""
    return bool(is_undirected(edge_index, edge_weight, num_nodes=num_nodes))


def normalized_adjacency(edge_index: Tensor, edge_weight: Tensor, num_nodes: int) -> dict[str, Tensor]:
    """Dense normalised adjacency of a graph (after :func:`complete_self_loops`).

    * symmetric graph: ``{"sym": D^-1/2 A D^-1/2}`` (Kipf & Welling, ICLR 2017), ``A[i, j]`` the
      weight of ``i -> j``, ``D`` the weighted degree;
    * directed graph: ``{"forward": P_f, "reverse": P_b}``, the two random-walk transitions of
      DCRNN (Li et al., ICLR 2018, :func:`fedldt.models.dcrnn.transition_matrices`), which the
      models use: ``P_f[i, j] = w_{j->i} / sum_k w_{k->i}``, ``P_b[j, i] = w_{j->i} / sum_k w_{j->k}``.

    Returns:
        Name -> ``[node, node]`` float32 dense matrix.
    """
    from fedldt.models.dcrnn import transition_matrices  # the models' own operator, not a copy

    ei, ew = complete_self_loops(edge_index, edge_weight, num_nodes)
    if is_symmetric(ei, ew, num_nodes):
        a = torch.zeros(num_nodes, num_nodes, dtype=torch.float32)
        a.index_put_((ei[0], ei[1]), ew, accumulate=True)
        d = a.sum(dim=1)
        inv = torch.where(d > 0, d.rsqrt(), torch.zeros_like(d))
        return {"sym": inv[:, None] * a * inv[None, :]}
    p_f, p_b = transition_matrices(ei, ew, num_nodes)
    return {"forward": p_f.to_dense(), "reverse": p_b.to_dense()}
