"""The territory dataset: one sensor network's series, mask, time index and graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch_geometric.utils import subgraph

from fedldt.data.graph import complete_self_loops


def _fixed(ns: np.ndarray, calendar: bool = False) -> bool:
    """Whether ``ns`` (int64 ns) increases by one fixed step (``calendar``: a whole number of days)."""
    steps = np.diff(ns)
    day = pd.Timedelta("1D").value
    return bool((steps == steps[0]).all() and steps[0] > 0 and (not calendar or steps[0] % day == 0))


@dataclass
class TerritoryDataset:
    """Spatio-temporal data of one territory (or of a whole network before partitioning).

    Attributes:
        name: dataset or territory identifier, e.g. ``"los_loop"`` or ``"t0"``.
        values: ``[time, node, channel]`` float32 observations in data units (e.g. mph).
            Entries whose mask is 0 hold an arbitrary finite filler (0).
        mask: ``[time, node, channel]`` float32, 1 = valid observation, 0 = missing.
        timestamps: pandas ``DatetimeIndex`` of length ``time`` with a fixed interval: naive
            (built-in datasets) or tz-aware in the territory's IANA time zone (territory data
            packages), whose ``hour``/``day_of_week`` are local wall-clock time. A tz-aware
            interval of whole days is fixed in local calendar time (local midnights: 23- or
            25-hour steps across daylight-saving changes).
        node_ids: ``[node]`` sensor identifiers (strings), in the order of the node axis.
        edge_index: ``[2, num_edges]`` int64 sensor graph, source row 0, target row 1; on
            construction it gets exactly one self-loop per node (added with weight 1 where
            missing, never doubled: :func:`fedldt.data.graph.complete_self_loops`).
        edge_weight: ``[num_edges]`` float32 positive edge weights.
        coords: ``[node, 2]`` float64 (latitude, longitude) in degrees, or ``None`` if unknown.
        units: units of each channel, e.g. ``("mph",)``.
        channels: channel names, e.g. ``("speed",)``.
        source: provenance line (file and origin) for results and model cards.

    Raises:
        ValueError: on construction, when shapes, dtypes or the time index are inconsistent
            (see :meth:`validate`).
    """

    name: str
    values: np.ndarray
    mask: np.ndarray
    timestamps: pd.DatetimeIndex
    node_ids: np.ndarray
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    coords: np.ndarray | None = None
    units: tuple[str, ...] = ("",)
    channels: tuple[str, ...] = ("value",)
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = np.ascontiguousarray(self.values, dtype=np.float32)
        self.mask = np.ascontiguousarray(self.mask, dtype=np.float32)
        self.node_ids = np.asarray(self.node_ids).astype(str)
        self.edge_index = torch.as_tensor(self.edge_index, dtype=torch.long)
        self.edge_weight = torch.as_tensor(self.edge_weight, dtype=torch.float32)
        self.validate()
        self.edge_index, self.edge_weight = complete_self_loops(self.edge_index, self.edge_weight, self.num_nodes)

    # ------------------------------------------------------------------ properties
    @property
    def num_steps(self) -> int:
        return int(self.values.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_channels(self) -> int:
        return int(self.values.shape[2])

    @property
    def freq(self) -> pd.Timedelta:
        """The fixed sampling interval; for tz-aware timestamps on local calendar days (a day or a week,
        23 or 25 hours across a daylight-saving change) the nominal one, e.g. ``1D``."""
        if self.timestamps.tz is not None:
            local = pd.Timedelta(self.timestamps[1].tz_localize(None) - self.timestamps[0].tz_localize(None))
            if local > pd.Timedelta(0) and local % pd.Timedelta("1D") == pd.Timedelta(0):
                return local
        return pd.Timedelta(self.timestamps[1] - self.timestamps[0])

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Check shapes, dtypes, the fixed interval and the graph.

        Raises:
            ValueError: naming the field that is wrong.
        """
        where = f"territory dataset '{self.name}'"
        if self.values.ndim != 3:
            raise ValueError(f"{where}: values must be [time, node, channel], got shape {self.values.shape}")
        if self.mask.shape != self.values.shape:
            raise ValueError(f"{where}: mask shape {self.mask.shape} != values shape {self.values.shape}")
        if not np.isin(self.mask, (0.0, 1.0)).all():
            raise ValueError(f"{where}: mask must hold only 0 (missing) and 1 (valid)")
        if not np.isfinite(self.values[self.mask > 0]).all():
            raise ValueError(f"{where}: valid (mask=1) values contain NaN or inf")
        if not np.isfinite(self.values).all():  # a NaN filler would reach the model inputs and persistence
            raise ValueError(f"{where}: missing (mask=0) values must hold a finite filler, not NaN or inf; fill them "
                             "with 0 (np.where(mask > 0, values, 0))")
        if len(self.timestamps) != self.num_steps:
            raise ValueError(f"{where}: {len(self.timestamps)} timestamps for {self.num_steps} steps")
        if not isinstance(self.timestamps, pd.DatetimeIndex):
            raise ValueError(f"{where}: timestamps must be a pandas DatetimeIndex")
        if self.num_steps >= 2 and not (_fixed(self.timestamps.asi8) or (
                self.timestamps.tz is not None and _fixed(self.timestamps.tz_localize(None).asi8, calendar=True))):
            raise ValueError(f"{where}: timestamps must be increasing with a fixed interval (in local calendar days "
                             "when the interval is whole days)")
        if self.node_ids.shape != (self.num_nodes,):
            raise ValueError(f"{where}: {self.node_ids.shape[0]} node ids for {self.num_nodes} nodes")
        if len(set(self.node_ids.tolist())) != self.num_nodes:
            raise ValueError(f"{where}: node ids are not unique")
        if self.edge_index.ndim != 2 or self.edge_index.shape[0] != 2:
            raise ValueError(f"{where}: edge_index must be [2, num_edges], got {tuple(self.edge_index.shape)}")
        if self.edge_weight.shape != (self.edge_index.shape[1],):
            raise ValueError(f"{where}: edge_weight must have one weight per edge")
        if self.edge_index.numel() and (self.edge_index.min() < 0 or self.edge_index.max() >= self.num_nodes):
            raise ValueError(f"{where}: edge_index refers to nodes outside 0..{self.num_nodes - 1}")
        if self.coords is not None and np.asarray(self.coords).shape != (self.num_nodes, 2):
            raise ValueError(f"{where}: coords must be [node, 2], got {np.asarray(self.coords).shape}")
        if len(self.units) != self.num_channels or len(self.channels) != self.num_channels:
            raise ValueError(f"{where}: units/channels must name each of the {self.num_channels} channels")

    # ------------------------------------------------------------------ graph ops
    def subset(self, nodes: np.ndarray | list[int], name: str) -> "TerritoryDataset":
        """The territory made of ``nodes`` with its induced subgraph (PyG ``subgraph``).

        Args:
            nodes: indices into this dataset's node axis, in the order they will take.
            name: identifier of the new territory.

        Raises:
            ValueError: ``nodes`` is empty, has duplicates or is out of range.
        """
        idx = np.asarray(nodes, dtype=np.int64)
        if idx.size == 0:
            raise ValueError(f"territory '{name}' has no nodes")
        if len(np.unique(idx)) != idx.size:
            raise ValueError(f"territory '{name}': duplicate node indices")
        if idx.min() < 0 or idx.max() >= self.num_nodes:
            raise ValueError(f"territory '{name}': node index outside 0..{self.num_nodes - 1}")
        ei, ew = subgraph(
            torch.from_numpy(idx), self.edge_index, self.edge_weight,
            relabel_nodes=True, num_nodes=self.num_nodes,
        )
        return TerritoryDataset(
            name=name,
            values=self.values[:, idx],
            mask=self.mask[:, idx],
            timestamps=self.timestamps,
            node_ids=self.node_ids[idx],
            edge_index=ei,
            edge_weight=ew,
            coords=None if self.coords is None else np.asarray(self.coords)[idx],
            units=self.units,
            channels=self.channels,
            source=self.source,
            extra=dict(self.extra),
        )

    def adjacency(self) -> np.ndarray:
        """Dense ``[node, node]`` float32 adjacency, ``A[src, dst] = edge_weight``."""
        a = np.zeros((self.num_nodes, self.num_nodes), dtype=np.float32)
        src, dst = self.edge_index.numpy()
        a[src, dst] = self.edge_weight.numpy()
        return a
