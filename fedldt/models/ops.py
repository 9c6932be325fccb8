"""Layer maps the models share, on node-major, channel-last activations ``[node, batch, time, C]``:
a convolution over time as one matrix product, and a sum of linear maps of several terms as one
product. The weights stay in the models' ``nn.Conv2d`` / ``nn.Linear`` modules (state dicts are
unchanged); ``tests/test_fast_paths.py`` compares each use with the module it replaces."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def temporal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, dilation: int = 1) -> Tensor:
    """Valid (unpadded) convolution over time, ``out[t] = b + Σ_k W[:, :, k] x[t + k * dilation]``
    (what ``nn.Conv2d`` computes along its time axis), as one matrix product of the ``k`` shifted
    inputs side by side.

    Shapes: x ``[node, batch, time, c_in]``, weight ``[c_out, c_in, k]`` (a Conv2d kernel with its
    size-1 axis squeezed), bias ``[c_out]`` -> ``[node, batch, time - (k - 1) * dilation, c_out]``.
    """
    k = weight.shape[-1]
    steps = x.shape[2] - (k - 1) * dilation
    taps = [x[:, :, i * dilation : i * dilation + steps] for i in range(k)]
    return F.linear(torch.cat(taps, dim=-1) if k > 1 else taps[0], weight.transpose(1, 2).flatten(1), bias)


def linear_of_terms(terms: list[Tensor], shape: torch.Size, weights: list[Tensor], bias: Tensor | None) -> Tensor:
    """``b + Σ_i terms[i] W_i^T`` as one product: the terms side by side times the weights side by side.

    Shapes: each term holds ``shape`` (any view of it, e.g. ``[node, rest]``), ``shape[-1] = c_in``;
    each weight ``[c_out, c_in]``; bias ``[c_out]`` -> ``shape[:-1] + [c_out]``.
    """
    stacked = torch.stack([t.view(shape) for t in terms], dim=-2)  # [..., terms, c_in]
    return F.linear(stacked.flatten(-2), torch.cat(weights, dim=1), bias)
