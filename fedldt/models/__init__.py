"""Forecasting models. Each takes ``[batch, window, node, in_channels]`` and returns
``[batch, horizon, node, out_channels]`` (scaled units), called as
``model(x, edge_index, edge_weight)``.

Territories of different sizes share one model. A parameter that depends on a territory's
nodes (node embeddings) is *local*: each model lists such state-dict keys in
``local_parameter_names()``; integer buffers are local too, and personalization (FedPer,
FedBN) adds the output head or the normalization layers (:func:`local_state_names`).
:func:`split_state` separates them; they must never be sent to the server.

Models: ``dcrnn`` (Li et al., ICLR 2018), ``stgcn`` (Yu et al., IJCAI 2018), ``gwnet``
(Wu et al., IJCAI 2019).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fedldt.models.dcrnn import DCRNNConfig, DCRNNForecaster
from fedldt.models.gwnet import GWNetConfig, GWNetForecaster
from fedldt.models.stgcn import STGCNConfig, STGCNForecaster

MODELS: dict[str, tuple[type, type]] = {
    "dcrnn": (DCRNNForecaster, DCRNNConfig),
    "stgcn": (STGCNForecaster, STGCNConfig),
    "gwnet": (GWNetForecaster, GWNetConfig),
}
#: The ``model._target_`` allow-list: target -> ``model.name`` (the only model classes built from
#: a config; nothing named in a config is imported).
MODEL_TARGETS: dict[str, str] = {f"fedldt.models.{cls.__name__}": name for name, (cls, _) in MODELS.items()}


def build_model(model_cfg: Mapping[str, Any], num_nodes: int | None = None) -> nn.Module:
    """Build a model from a plain config dict: ``{"_target_": ..., "name": ..., <hyper-parameters>,
    in_channels, out_channels, horizon}`` (the last three injected from the data).

    ``_target_`` must be in :data:`MODEL_TARGETS` and be the class of ``name``; a config without
    it (a model package written before it existed) is built by ``name``.

    Args:
        model_cfg: the config dict. It may also hold a data-injected ``num_nodes``.
        num_nodes: the territory's number of nodes (data-injected, like ``in_channels``). Only
            models whose config has a ``num_nodes`` field use it (``gwnet`` with
            ``adaptive=true`` requires it); the others ignore it, so callers may always pass it.

    Raises:
        ValueError: unknown model name, ``_target_`` not registered or not the class of
            ``name``, or unknown hyper-parameter (named); ``num_nodes`` given
            both in ``model_cfg`` and as argument with different values; a model-specific
            invalid or missing value (named by the model).
    """
    cfg = dict(model_cfg)
    name = cfg.pop("name", None)
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not one of {sorted(MODELS)}")
    target = cfg.pop("_target_", None)
    if target is not None and MODEL_TARGETS.get(target) != name:
        raise ValueError(f"model._target_={target!r} " + (
            f"is the class of model '{MODEL_TARGETS[target]}', not of model.name={name!r}" if target in MODEL_TARGETS
            else f"is not a registered fedldt model; allowed: {sorted(MODEL_TARGETS)}") + f" (conf/model/{name}.yaml)")
    n = cfg.pop("num_nodes", None)
    if num_nodes is not None:
        if n is not None and int(n) != int(num_nodes):
            raise ValueError(f"model.num_nodes={n} disagrees with build_model(num_nodes={num_nodes})")
        n = num_nodes
    cls, cfg_cls = MODELS[name]
    known = set(cfg_cls.__dataclass_fields__)
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"model '{name}' has no hyper-parameter(s) {unknown}; known: {sorted(known)}")
    if "num_nodes" in known and n is not None:
        cfg["num_nodes"] = int(n)
    return cls(cfg_cls(**cfg))


#: Personalization modes (``personalization.name`` in the config).
#: ``none``: only node-dependent parameters and integer buffers stay local;
#: ``fedper``: also the output head (FedPer, Arivazhagan et al., arXiv:1912.00818, 2019);
#: ``fedbn``: also every normalization layer (FedBN, Li et al., ICLR 2021);
#: ``finetune``, ``ditto``: what is shared is as ``none``; each territory also keeps a complete
#: personal model (:mod:`fedldt.personal`, ``clients/territory.py``).
PERSONALIZATIONS = ("none", "fedper", "fedbn", "finetune", "ditto")

#: Normalization layers that FedBN keeps local (BatchNorm*/InstanceNorm* share ``_NormBase``).
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def local_state_names(model: nn.Module, personalization: str = "none") -> list[str]:
    """State-dict keys a territory keeps at home (never sent, never averaged), in state order.

    Always local: the model's ``local_parameter_names()`` (parameters that depend on the
    territory's nodes, e.g. Graph WaveNet node embeddings) and every non-floating-point entry
    (integer buffers such as BatchNorm ``num_batches_tracked``: a per-territory counter that
    averaging would turn into a float). Then, by ``personalization``:

    * ``fedper``: the output head, ``model.head_parameter_names()`` (FedPer: shared base
      layers, personal head; Arivazhagan et al., arXiv:1912.00818, 2019);
    * ``fedbn``: the weights and running statistics of every normalization layer (FedBN;
      Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
      Normalization", ICLR 2021).

    Raises:
        TypeError: the model has no ``local_parameter_names`` method (or, for ``fedper``, no
            ``head_parameter_names``).
        ValueError: unknown ``personalization``; ``fedbn`` on a model without normalization
            layers (it would silently equal FedAvg); a listed name is not a state-dict key.
    """
    if personalization not in PERSONALIZATIONS:
        raise ValueError(f"personalization.name={personalization!r} must be one of {list(PERSONALIZATIONS)}")
    if not callable(getattr(model, "local_parameter_names", None)):
        raise TypeError(f"{type(model).__name__} has no local_parameter_names(); every fedldt model must define it")
    state = model.state_dict()
    names = set(model.local_parameter_names())
    names |= {k for k, v in state.items() if not torch.is_floating_point(v)}
    if personalization == "fedper":
        if not callable(getattr(model, "head_parameter_names", None)):
            raise TypeError(f"{type(model).__name__} has no head_parameter_names(); personalization=fedper needs it")
        names |= set(model.head_parameter_names())
    elif personalization == "fedbn":
        prefixes = tuple(f"{name}." for name, mod in model.named_modules() if isinstance(mod, NORM_LAYERS))
        if not prefixes:
            raise ValueError(f"personalization=fedbn: model '{getattr(model, 'name', type(model).__name__)}' has no "
                             "normalization layers, so FedBN would equal FedAvg; use personalization=none or fedper")
        names |= {k for k in state if k.startswith(prefixes)}
    missing = sorted(names - set(state))
    if missing:
        raise ValueError(f"{type(model).__name__} lists local names {missing} that are not in its state dict")
    return [k for k in state if k in names]


def split_state(model: nn.Module, personalization: str = "none") -> tuple[OrderedDict[str, Tensor], OrderedDict[str, Tensor]]:
    """Split a model's state dict into its shared part and its territory-local part.

    Returns:
        ``(shared, local)``: two state dicts that partition ``model.state_dict()`` (same
        tensors, same order); ``local`` holds exactly :func:`local_state_names`. Only
        ``shared`` may be sent to the server.

    Raises:
        TypeError, ValueError: see :func:`local_state_names`.
    """
    local_names = set(local_state_names(model, personalization))
    state = model.state_dict()
    shared = OrderedDict((k, v) for k, v in state.items() if k not in local_names)
    local = OrderedDict((k, v) for k, v in state.items() if k in local_names)
    return shared, local


def load_shared_state(model: nn.Module, shared: Mapping[str, Tensor], personalization: str = "none") -> None:
    """Load a shared state dict (e.g. the server's) into ``model``, keeping its local entries.

    Raises:
        ValueError: ``shared`` lacks a shared key of ``model``, or holds a key that the model
            does not have or that is local (named); a size mismatch (from ``load_state_dict``).
    """
    local_names = set(local_state_names(model, personalization))
    expected = set(model.state_dict()) - local_names
    leaked = sorted(local_names & set(shared))
    missing, unexpected = sorted(expected - set(shared)), sorted(set(shared) - expected - local_names)
    if leaked or missing or unexpected:
        raise ValueError(f"shared state does not fit {type(model).__name__} (personalization={personalization}): "
                         f"local keys {leaked}, missing {missing}, unexpected {unexpected}")
    model.load_state_dict(shared, strict=False)
