"""ONNX export of a territory's forecaster: fixed graph, dynamic batch, data units in and out.

The models propagate over the graph with sparse products (``torch.sparse.mm``), which the ONNX
exporters do not support. Every fedldt model
therefore offers a fixed-graph path: ``graph_operators(edge_index, edge_weight, num_nodes)``
returns the territory's graph as dense ``[node, node]`` matrices (DCRNN and Graph WaveNet: the
random-walk transitions; STGCN: the scaled Laplacian), and ``forward_dense(x, *operators)`` runs
the same layers with dense products. :class:`FixedGraphForecaster` stores those matrices as
buffers and bakes in the territory's scaler, so the ONNX model reads raw observations and
returns data units. The PyTorch model used for training is unchanged; :func:`parity_error`
measures how far ONNX Runtime is from it, and :func:`parity_tolerance` says how far is too far.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fedldt.data.ranges import clip_forecast
from fedldt.data.windows import MaskedStandardScaler

#: ONNX opset of exported models (ONNX Runtime >= 1.14 runs it).
OPSET = 17
INPUT_NAMES = ("values", "mask", "calendar")
OUTPUT_NAME = "forecast"
#: Relative parity tolerance, see :func:`parity_tolerance`.
PARITY_RTOL = 1e-4


class NotExportable(ValueError):
    """The model has no fixed-graph path (``graph_operators``/``forward_dense``); the message
    names the model and the fix (``--no-onnx``)."""


def parity_tolerance(targets: np.ndarray) -> float:
    """Largest accepted ``max |ONNX Runtime - PyTorch|``, in data units:
    ``PARITY_RTOL * max(1, mean |targets|)`` = ``1e-4 * max(1, mean |y|)``.

    float32 rounding grows with the values' magnitude, so a fixed absolute tolerance fails for
    counts in the thousands; relative to the data's scale it is 1e-4 mph for speeds around
    50 mph (floor 1e-4 for data below 1 in magnitude) and 0.2 for counts around 2000.

    Args:
        targets: data-unit values of the data (e.g. the observed inputs of the parity windows),
            any shape; non-finite entries are ignored.
    """
    a = np.abs(np.asarray(targets, dtype=np.float64))
    a = a[np.isfinite(a)]
    scale = float(a.mean()) if a.size else 0.0
    return PARITY_RTOL * max(1.0, scale)


class FixedGraphForecaster(nn.Module):
    """A trained forecaster bound to one territory's graph and scaler, for export.

    Args:
        model: a fedldt model with ``graph_operators(edge_index, edge_weight, num_nodes)`` and
            ``forward_dense(x, *operators)`` (DCRNN, STGCN, Graph WaveNet).
        edge_index: ``[2, E]`` int64 graph of the territory; edge_weight ``[E]`` float32.
        num_nodes: N, the territory's number of sensors.
        scaler: the territory's fitted scaler (``mean``/``std`` ``[1, N or 1, C]``).
        limits: ``[2, C]`` lowest/highest forecast per channel
            (:func:`fedldt.data.ranges.forecast_limits`); the output is clipped to them as
            :meth:`fedldt.engine.TerritoryTask.predict` does. ``None``: not clipped.

    Shapes:
        values ``[batch, window, N, C]`` float32 observations in data units (missing entries
        any finite number, e.g. 0); mask ``[batch, window, N, C]`` float32 (1 = observed);
        calendar ``[batch, window, k]`` float32 covariates of each step
        (:func:`fedldt.data.windows.time_features`) -> forecast ``[batch, horizon, N, C]``
        float32 in data units.

    Raises:
        NotExportable: ``model`` has no fixed-graph path.
    """

    def __init__(self, model: nn.Module, edge_index: Tensor, edge_weight: Tensor, num_nodes: int,
                 scaler: MaskedStandardScaler, limits: Tensor | np.ndarray | None = None) -> None:
        super().__init__()
        if not (callable(getattr(model, "graph_operators", None)) and callable(getattr(model, "forward_dense", None))):
            name = getattr(model, "name", type(model).__name__)
            raise NotExportable(f"model '{name}' cannot be exported to ONNX (it has no fixed-graph path: "
                                "graph_operators/forward_dense); export with --no-onnx and use the torch engine")
        self.model = model
        self.num_nodes = int(num_nodes)
        ops = model.graph_operators(edge_index, edge_weight.float(), self.num_nodes)
        self.num_operators = len(ops)
        for i, op in enumerate(ops):
            self.register_buffer(f"op{i}", op.to_dense().float())  # [N, N]
        self.register_buffer("mean", torch.as_tensor(scaler.mean[0], dtype=torch.float32))  # [N or 1, C]
        self.register_buffer("std", torch.as_tensor(scaler.std[0], dtype=torch.float32))  # [N or 1, C]
        self.clip = limits is not None
        if self.clip:
            self.register_buffer("limits", torch.as_tensor(limits, dtype=torch.float32))  # [2, C]

    def forward(self, values: Tensor, mask: Tensor, calendar: Tensor) -> Tensor:
        scaled = (values - self.mean) / self.std * mask  # [B, W, N, C], as MaskedStandardScaler.transform * mask
        cal = calendar.unsqueeze(2).expand(-1, -1, self.num_nodes, -1)  # [B, W, N, k]
        x = torch.cat([scaled, cal], dim=-1)  # [B, W, N, C+k]
        ops = [getattr(self, f"op{i}") for i in range(self.num_operators)]
        y = self.model.forward_dense(x, *ops)  # [B, H, N, C] scaled
        y = y * self.std + self.mean  # data units
        return clip_forecast(y, self.limits) if self.clip else y


def export_onnx(wrapper: FixedGraphForecaster, example: tuple[Tensor, Tensor, Tensor], path: str | Path) -> Path:
    """Write ``wrapper`` as an ONNX model with a dynamic batch axis.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no ``onnxscript``.

    Args:
        wrapper: the module to export (eval mode is set here).
        example: example ``(values, mask, calendar)`` inputs (any batch size).
        path: output ``.onnx`` file.

    Returns:
        ``path``.
    """
    path = Path(path)
    wrapper.eval()
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its deprecation
        torch.onnx.export(wrapper, example, str(path), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    import onnx

    onnx.checker.check_model(str(path))
    return path


def run_onnx(path: str | Path, values: np.ndarray, mask: np.ndarray, calendar: np.ndarray) -> np.ndarray:
    """Run an exported model with ONNX Runtime (CPU) -> ``[batch, horizon, N, C]`` float32."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {"values": values, "mask": mask, "calendar": calendar})[0]


def parity_error(path: str | Path, reference: np.ndarray, values: np.ndarray, mask: np.ndarray,
                 calendar: np.ndarray) -> float:
    """Largest absolute difference (data units) between ONNX Runtime and ``reference`` outputs.

    Args:
        path: the ``.onnx`` file.
        reference: ``[batch, horizon, N, C]`` forecasts of the PyTorch model on the same inputs.
        values, mask, calendar: the inputs (see :class:`FixedGraphForecaster`).
    """
    out = run_onnx(path, values, mask, calendar)
    if out.shape != reference.shape:
        raise ValueError(f"ONNX output shape {out.shape} != PyTorch output shape {reference.shape}")
    return float(np.abs(out.astype(np.float64) - reference.astype(np.float64)).max())
