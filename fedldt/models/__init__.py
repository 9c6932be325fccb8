"""Forecasting models. Each takes ``[batch, window, node, in_channels]`` and returns
``[batch, horizon, node, out_channels]``; none has a parameter that depends on ``num_nodes``."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from fedldt.models.dcrnn import DCRNNConfig, DCRNNForecaster

MODELS: dict[str, tuple[type, type]] = {"dcrnn": (DCRNNForecaster, DCRNNConfig)}


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """Build a model from a plain config dict: ``{"name": ..., <hyper-parameters>, in_channels,
    out_channels, horizon}``.

    Raises:
        ValueError: unknown model name or unknown hyper-parameter (named).
    """
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not one of {sorted(MODELS)}")
    cls, cfg_cls = MODELS[name]
    known = set(cfg_cls.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"model '{name}' has no hyper-parameter(s) {unknown}; known: {sorted(known)}")
    return cls(cfg_cls(**cfg))
