"""A model package: one territory's trained forecaster as a self-contained folder, and forecasting with it.

Layout (written by :func:`fedldt.deploy.export.export_package`)::

    package.json        manifest: format, model config, task (window, horizon, interval, time zone,
                        covariates, channels, units), graph hash, ONNX info, sha256 of every file
    weights/global.pt   the global model's state dict (torch.save of tensors; loads with weights_only)
    weights/local.pt    optional: the territory's personalized parameters, overriding global keys
    scaler.json         the territory's z-score statistics ``mean``/``std`` ``[1, node, channel]``
    nodes.csv           ``index,sensor_id[,latitude,longitude]``: the node order of the model
    edges.csv           ``source,target,weight``: the territory's graph (indices into nodes.csv)
    model.onnx          the forecaster for this graph (fixed nodes, dynamic batch), data units
    model_card.json     what the model was trained on and how well it did; MODEL_CARD.md the same
                        for people

:class:`ForecastPackage` loads such a folder (checking every file against the manifest) and
turns the latest observations into forecasts exactly as the training code computes its
predictions (:meth:`fedldt.engine.TerritoryTask.predict`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from fedldt.data.ranges import ValidRange, parse_valid_ranges
from fedldt.data.windows import MaskedStandardScaler, model_inputs, time_features
from fedldt.deploy.observations import InputError, InputWindow, _listing, select_window, wall_clock
from fedldt.models import build_model

PACKAGE_FORMAT = "fedldt-model-package/1"
MANIFEST = "package.json"
GLOBAL_WEIGHTS = "weights/global.pt"
LOCAL_WEIGHTS = "weights/local.pt"
SCALER = "scaler.json"
NODES = "nodes.csv"
EDGES = "edges.csv"
ONNX = "model.onnx"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
ENGINES = ("torch", "onnx")


class PackageError(ValueError):
    """A model package folder is incomplete, altered or inconsistent; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def graph_hash(node_ids: Sequence[str], edge_index: torch.Tensor, edge_weight: torch.Tensor) -> str:
    """A fingerprint of a territory's sensors, their order and its graph.

    ``sha256`` of ``"fedldt-graph/1\\n"``, the node ids joined by ``"\\n"``, a ``"\\n"``, then the
    edges as little-endian int64 ``[2, E]`` (row-major) and the weights as little-endian float32
    ``[E]``. Two packages with the same hash read the same sensors in the same order on the same
    weighted graph.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    h = hashlib.sha256(b"fedldt-graph/1\n")
    h.update("\n".join(str(s) for s in node_ids).encode("utf-8") + b"\n")
    h.update(np.ascontiguousarray(edge_index.numpy(), dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(edge_weight.numpy(), dtype="<f4").tobytes())
    return "sha256:" + h.hexdigest()


@dataclass
class Forecast:
    """Forecasts of every sensor of a territory for the ``horizon`` steps after the last observation.

    Attributes:
        values: ``[horizon, node, channel]`` float32 forecasts in data units (e.g. mph).
        timestamps: ``[horizon]`` times of the forecast steps (step ``h`` = last observation
            time + ``h`` x ``interval``), tz-aware when the package has a time zone.
        node_ids: sensor ids in node order.
        channels, units: channel names and units, e.g. ``("speed",)``, ``("mph",)``.
        interval: the data's sampling interval.
        issued_after: time of the last observation used.
        territory: the territory id.
        missing_inputs: sensor id -> missing values fed as masked entries (``allow_missing``).
        invalid_inputs: sensor id -> implausible values fed as masked entries (``invalid="mask"``).
        unavailable: sensor id -> why it has no forecast (no valid input, or a non-finite model
            output); such sensors are left out of :meth:`to_frame` and :meth:`to_json`.
    """

    values: np.ndarray
    timestamps: pd.DatetimeIndex
    node_ids: list[str]
    channels: tuple[str, ...]
    units: tuple[str, ...]
    interval: pd.Timedelta
    issued_after: pd.Timestamp
    territory: str
    missing_inputs: dict[str, int] = field(default_factory=dict)
    invalid_inputs: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Wide table: ``timestamp``, ``horizon_step`` (1..H), then one column per sensor with a
        forecast (channel 0, data units, float64 so that text output round-trips the float32 values)."""
        frame = pd.DataFrame(self.values[:, :, 0].astype(np.float64), columns=self.node_ids)
        frame = frame.drop(columns=list(self.unavailable))
        frame.insert(0, "horizon_step", np.arange(1, len(self.timestamps) + 1))
        frame.insert(0, "timestamp", [t.isoformat() for t in self.timestamps])
        return frame

    def to_json(self) -> dict[str, Any]:
        """JSON-able forecast: metadata, ``timestamps`` and ``forecasts`` (sensor -> values per step)."""
        out: dict[str, Any] = {
            "territory": self.territory,
            "channel": self.channels[0],
            "unit": self.units[0],
            "interval_s": int(self.interval.total_seconds()),
            "issued_after": self.issued_after.isoformat(),
            "timestamps": [t.isoformat() for t in self.timestamps],
            "forecasts": {s: self.values[:, j, 0].astype(np.float64).tolist() for j, s in enumerate(self.node_ids)
                          if s not in self.unavailable},
        }
        if self.unavailable:
            out["unavailable"] = dict(self.unavailable)
        if self.invalid_inputs:
            out["invalid_inputs"] = dict(self.invalid_inputs)
        if self.missing_inputs:
            out["missing_inputs"] = dict(self.missing_inputs)
        if self.missing_inputs or self.invalid_inputs:
            out["note"] = ("some inputs were missing or invalid and entered the model as masked values "
                           "(value x mask = 0); the model was trained on complete data, so these forecasts are less reliable")
        return out


class ForecastPackage:
    """A loaded model package (see the module docstring for the folder layout).

    Use :meth:`load`; then :meth:`forecast` turns an observations table into a :class:`Forecast`.

    Attributes:
        root: the package folder.
        manifest: ``package.json``.
        model: the forecaster (global weights, overridden by ``weights/local.pt`` if present), eval mode.
        scaler: the territory's fitted scaler.
        node_ids: ``[node]`` sensor ids in model order.
        edge_index: ``[2, E]`` int64, edge_weight ``[E]`` float32: the territory's graph.
        coords: sensor id -> (latitude, longitude), empty if unknown.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], model: torch.nn.Module, scaler: MaskedStandardScaler,
                 node_ids: list[str], edge_index: torch.Tensor, edge_weight: torch.Tensor,
                 coords: dict[str, tuple[float, float]]) -> None:
        self.root, self.manifest, self.model, self.scaler = root, manifest, model, scaler
        self.node_ids, self.edge_index, self.edge_weight, self.coords = node_ids, edge_index, edge_weight, coords
        self._onnx_session = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> "ForecastPackage":
        """Load and check a package folder.

        Args:
            path: the package folder.
            verify: check each file's sha256 and the graph hash against ``package.json``.

        Raises:
            PackageError: a file is missing or altered, the format is unknown, or the graph,
                scaler and model disagree (the file and the fix are named).
        """
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise PackageError(f"{root} is not a fedldt model package: {MANIFEST} not found (create one with `fedldt export`)")
        try:
            manifest = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise PackageError(f"{mpath}: not valid JSON ({e}); re-export the package") from None
        if manifest.get("format") != PACKAGE_FORMAT:
            raise PackageError(f"{mpath}: format {manifest.get('format')!r}; this fedldt reads {PACKAGE_FORMAT!r}")
        for rel, digest in manifest["files"].items():
            f = root / rel
            if not f.is_file():
                raise PackageError(f"{f}: missing from the package (listed in {MANIFEST}); re-export the package")
            if verify and sha256_file(f) != digest:
                raise PackageError(f"{f}: sha256 differs from {MANIFEST}: the file was altered; re-export the package")
        nodes = pd.read_csv(root / NODES, dtype={"sensor_id": str})
        node_ids = nodes["sensor_id"].tolist()
        edges = pd.read_csv(root / EDGES)
        edge_index = torch.as_tensor(edges[["source", "target"]].to_numpy(dtype=np.int64).T.copy())
        edge_weight = torch.as_tensor(edges["weight"].to_numpy(dtype=np.float32))
        if verify and graph_hash(node_ids, edge_index, edge_weight) != manifest["graph_hash"]:
            raise PackageError(f"{root / NODES} / {root / EDGES}: graph hash differs from {MANIFEST}; re-export the package")
        coords = {}
        if {"latitude", "longitude"} <= set(nodes.columns):
            coords = {s: (float(a), float(b)) for s, a, b in zip(node_ids, nodes["latitude"], nodes["longitude"])}
        sc = json.loads((root / SCALER).read_text())
        scaler = MaskedStandardScaler(per_node=bool(sc["per_node"]))
        scaler.mean = np.asarray(sc["mean"], dtype=np.float32)
        scaler.std = np.asarray(sc["std"], dtype=np.float32)
        n, c = len(node_ids), len(manifest["task"]["channels"])
        if scaler.mean.shape[-1] != c or scaler.mean.shape[1] not in (1, n) or scaler.std.shape != scaler.mean.shape:
            raise PackageError(f"{root / SCALER}: statistics of shape {scaler.mean.shape} do not fit {n} nodes x {c} channels")
        model = build_model(manifest["model_config"])
        state = torch.load(root / GLOBAL_WEIGHTS, map_location="cpu", weights_only=True)
        if manifest["weights"].get("local"):
            local = torch.load(root / manifest["weights"]["local"], map_location="cpu", weights_only=True)
            extra = sorted(set(local) - set(state))
            if extra:
                raise PackageError(f"{root / manifest['weights']['local']}: parameters {extra} are not in the model")
            state = {**state, **local}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PackageError(f"{root / GLOBAL_WEIGHTS}: weights do not fit model_config of {MANIFEST}: {e}") from None
        model.eval()
        return cls(root, manifest, model, scaler, node_ids, edge_index, edge_weight, coords)

    # ------------------------------------------------------------------ facts
    @property
    def territory(self) -> str:
        return str(self.manifest["territory"])

    @property
    def window(self) -> int:
        return int(self.manifest["task"]["window"])

    @property
    def horizon(self) -> int:
        return int(self.manifest["task"]["horizon"])

    @property
    def interval(self) -> pd.Timedelta:
        return pd.Timedelta(seconds=int(self.manifest["task"]["interval_s"]))

    @property
    def timezone(self) -> str | None:
        return self.manifest["task"].get("timezone")

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.manifest["task"]["channels"])

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.manifest["task"]["units"])

    @property
    def valid_range(self) -> dict[str, ValidRange]:
        """Channel -> plausible observations (``task.valid_range`` of the manifest; empty for
        packages exported before ranges were recorded: then only float32's range applies).

        Raises:
            PackageError: the recorded ranges are malformed.
        """
        try:
            return parse_valid_ranges(self.manifest["task"].get("valid_range"), f"{MANIFEST} task.valid_range")
        except ValueError as e:
            raise PackageError(f"{self.root / MANIFEST}: {e}; re-export the package") from None

    def card(self) -> dict[str, Any]:
        """The model card (``model_card.json``)."""
        return json.loads((self.root / CARD_JSON).read_text())

    # ------------------------------------------------------------------ forecasting
    def input_window(self, table: pd.DataFrame, allow_missing: bool = False, invalid: str = "error") -> InputWindow:
        """Check an observations table and take its ``window`` most recent steps (see
        :func:`fedldt.deploy.observations.select_window`).

        Raises:
            InputError: see :func:`~fedldt.deploy.observations.select_window`; also for a
                package with several channels (tables carry one value per sensor and step).
        """
        if len(self.channels) != 1:
            raise InputError(f"this package forecasts {len(self.channels)} channels {list(self.channels)}; "
                             "observation tables carry one value per sensor and step")
        return select_window(table, self.node_ids, self.window, self.interval, self.timezone, allow_missing,
                             self.territory, self.valid_range.get(self.channels[0]), self.units[0], invalid)

    def calendar(self, times: pd.DatetimeIndex) -> np.ndarray:
        """``[time, k]`` float32 calendar covariates of (local wall-clock) ``times``, as in training."""
        task = self.manifest["task"]
        return time_features(wall_clock(times), task["time_of_day"], task["day_of_week"])

    def predict_window(self, win: InputWindow, engine: str = "torch") -> np.ndarray:
        """Forecast ``[horizon, node, channel]`` float32 in data units from one input window.

        ``engine="torch"`` runs the PyTorch model exactly as
        :meth:`fedldt.engine.TerritoryTask.predict` does (same features, same sparse graph
        products, same inverse scaling); ``engine="onnx"`` runs ``model.onnx`` with ONNX Runtime
        (equal within the parity error recorded in ``package.json``).

        Raises:
            ValueError: unknown engine; PackageError: ``engine="onnx"`` without ``model.onnx``.
        """
        if engine == "torch":
            task = self.manifest["task"]
            _, features = model_inputs(  # [W, N, F]
                win.values, win.mask, wall_clock(win.times), self.scaler, task["time_of_day"], task["day_of_week"]
            )
            x = torch.from_numpy(features).unsqueeze(0)  # [1, W, N, F]
            with torch.no_grad():
                y = self.scaler.inverse_transform(self.model(x, self.edge_index, self.edge_weight))  # [1, H, N, C]
            return y[0].numpy()
        if engine == "onnx":
            feeds = {"values": win.values[None], "mask": win.mask[None], "calendar": self.calendar(win.times)[None]}
            return self.onnx_session().run(["forecast"], feeds)[0][0]
        raise ValueError(f"engine={engine!r} must be one of {ENGINES}")

    def onnx_session(self):
        """The ONNX Runtime session of ``model.onnx`` (created on first use, CPU provider)."""
        if self._onnx_session is None:
            if not self.manifest.get("onnx"):
                raise PackageError(f"{self.root}: the package has no {ONNX} (exported with --no-onnx); use the torch engine")
            import onnxruntime as ort

            self._onnx_session = ort.InferenceSession(str(self.root / ONNX), providers=["CPUExecutionProvider"])
        return self._onnx_session

    def forecast(self, table: pd.DataFrame, allow_missing: bool = False, engine: str = "torch",
                 invalid: str = "error") -> Forecast:
        """Forecast every sensor for the ``horizon`` steps after the table's last time step.

        Args:
            table: observations, index = timestamps, columns = sensor ids (any order), data units.
            allow_missing: feed NaN values in the window as masked entries instead of refusing them.
            engine: ``"torch"`` or ``"onnx"``.
            invalid: ``"error"`` refuses implausible values, ``"mask"`` masks them (see
                :func:`~fedldt.deploy.observations.select_window`).

        Returns:
            The forecast; a sensor whose forecast cannot be made (no valid input in the window, or
            a non-finite model output) is in :attr:`Forecast.unavailable` with the reason.

        Raises:
            InputError: the observations cannot give a correct forecast, or no sensor has one
                (the message says why).
        """
        win = self.input_window(table, allow_missing, invalid)
        values = self.predict_window(win, engine)
        unavailable = dict(win.unavailable)
        for j in np.flatnonzero(~np.isfinite(values).all(axis=(0, 2))):
            unavailable.setdefault(self.node_ids[j], "the model gave no finite forecast (NaN or infinity)")
        if len(unavailable) == len(self.node_ids):
            raise InputError(f"no forecast can be made: {_listing([f'{s}: {r}' for s, r in unavailable.items()], 2)}")
        last = win.times[-1]
        steps = pd.DatetimeIndex([last + h * self.interval for h in range(1, self.horizon + 1)])
        return Forecast(values=values, timestamps=steps, node_ids=list(self.node_ids), channels=self.channels,
                        units=self.units, interval=self.interval, issued_after=last, territory=self.territory,
                        missing_inputs=win.missing, invalid_inputs=win.invalid, unavailable=unavailable)
