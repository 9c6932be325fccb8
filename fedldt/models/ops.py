"""Layer maps the models share, on node-major, channel-last activations ``[node, batch, time, C]``:
a convolution over time as one matrix product, a sum of linear maps of several terms accumulated
product by product, and dropout with a cheaper mask on CPU. The weights stay in the models'
``nn.Conv2d`` / ``nn.Linear`` modules (state dicts are unchanged); ``tests/test_fast_paths.py``
compares the first two with the modules they replace and checks the dropout's distribution."""

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
    """``b + Σ_i terms[i] W_i^T``, each term's product accumulated into the output by ``torch.addmm``
    (no concatenated copy of the terms; on Graph WaveNet's layers about 1.2x the speed of one
    product of the terms side by side, which writes and reads a ``[rows, terms * c_in]`` copy).

    Shapes: each term holds ``shape`` (at least 2-d) or a contiguous view of it (e.g. ``[node, rest]``),
    ``shape[-1] = c_in``;
    each weight ``[c_out, c_in]``; bias ``[c_out]`` -> ``shape[:-1] + [c_out]``.
    """
    # views by flatten and view_as only, no size taken as a number: an ONNX trace keeps the batch dynamic
    out = F.linear(terms[0].view(shape), weights[0], bias)  # [..., c_out]
    acc = out.flatten(0, -2)  # [rows, c_out]
    for term, weight in zip(terms[1:], weights[1:]):
        acc = torch.addmm(acc, term.view(shape).flatten(0, -2), weight.t())
    return acc.view_as(out)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout, as ``F.dropout(x, p, training)``: each element kept with probability
    ``1 - p`` and scaled by ``1 / (1 - p)`` (Srivastava et al., JMLR 2014). On CPU in float32 or
    float64 the mask comes from one ``torch.rand_like`` draw (``>= p``): the same distribution as
    ``F.dropout``, whose CPU mask (``bernoulli_``) takes about 3x as long, but another random
    stream (seeded by ``torch.manual_seed`` all the same). Elsewhere (GPU: one fused kernel there;
    half precision, where a uniform draw is too coarse for ``p``) it is ``F.dropout`` itself.

    Shapes: any -> the same. ``p`` in ``[0, 1]`` (``1``: all zeros).
    """
    if not training or p == 0.0:
        return x
    if not x.is_cpu or x.dtype not in (torch.float32, torch.float64) or p >= 1.0:
        return F.dropout(x, p, training)
    keep = torch.rand_like(x).ge_(p).mul_(1.0 / (1.0 - p))  # [x.shape] 0 or 1/(1-p)
    return x * keep
