"""Loader for the Los-loop road-speed dataset (T-GCN's subset of METR-LA).

Source: Zhao et al., "T-GCN: A Temporal Graph Convolutional Network for Traffic Prediction",
IEEE T-ITS 2019 (files ``los_speed.csv``, ``los_adj.csv`` of ``lehaifeng/T-GCN``), with
sensor coordinates from DCRNN (Li et al., ICLR 2018, ``liyaguang/DCRNN``). See the data README.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_geometric.utils import dense_to_sparse

from fedldt.data.ranges import check_data, parse_valid_ranges
from fedldt.data.territory import TerritoryDataset


def load_los_loop(
    path: str | Path,
    start: str = "2012-03-01 00:00",
    freq: str = "5min",
    zero_is_missing: bool = False,
    self_loops: bool = True,
    name: str = "los_loop",
    valid_range: dict | None = None,
) -> TerritoryDataset:
    """Load Los-loop speeds (mph, 5-min), its 207x207 adjacency and the sensor coordinates.

    Args:
        path: folder holding ``los_speed.csv``, ``los_adj.csv`` and
            ``metr_la_sensor_graph/graph_sensor_locations.csv``.
        start: timestamp of row 0 (2012-03-01 00:00 per T-GCN; the file has no time column).
        freq: sampling interval (pandas offset alias).
        zero_is_missing: treat speed 0 as missing (METR-LA's convention; Los-loop is already
            interpolated and has no zeros, so the default is False).
        self_loops: must be True (kept for old configs): every dataset has exactly one
            self-loop per node (:func:`fedldt.data.graph.complete_self_loops`); the diagonal of
            ``los_adj.csv`` is 1 for every sensor.
        name: dataset name carried into results.
        valid_range: plausible speeds, ``{"speed": {"min": 0, "max": 120}}`` (see
            :mod:`fedldt.data.ranges`); the data is checked against it and ``fedldt export``
            writes it into model packages. ``None`` = not declared.

    Returns:
        A :class:`TerritoryDataset` with values ``[2016, 207, 1]``.

    Raises:
        FileNotFoundError: a file is missing (its path is named).
        ValueError: the files disagree (sizes, sensor ids), naming the file, or a speed is
            outside ``valid_range``.
    """
    if not self_loops:
        raise ValueError("dataset.self_loops=false is no longer possible: every sensor graph has exactly one "
                         "self-loop per node (fedldt/data/graph.py); remove dataset.self_loops")
    ranges = parse_valid_ranges(valid_range, "dataset.valid_range")
    unknown = sorted(set(ranges) - {"speed"})
    if unknown:
        raise ValueError(f"dataset.valid_range: {unknown} are not channels of Los-loop (its channel: speed)")
    root = Path(path)
    speed_f, adj_f = root / "los_speed.csv", root / "los_adj.csv"
    loc_f = root / "metr_la_sensor_graph" / "graph_sensor_locations.csv"
    for f in (speed_f, adj_f, loc_f):
        if not f.is_file():
            raise FileNotFoundError(
                f"Los-loop file not found: {f}. Set dataset.path (config) to the folder of the "
                "Los-loop files (../shared/data/los_loop in a fedldt checkout)."
            )
    speed = pd.read_csv(speed_f, dtype=np.float64)
    node_ids = np.array([c.strip() for c in speed.columns])
    values = speed.to_numpy()
    adj = pd.read_csv(adj_f, header=None, dtype=np.float64).to_numpy()
    n = values.shape[1]
    if adj.shape != (n, n):
        raise ValueError(f"{adj_f}: adjacency is {adj.shape}, expected ({n}, {n}) to match {speed_f}")
    if (adj < 0).any():
        raise ValueError(f"{adj_f}: negative edge weights")
    loc = pd.read_csv(loc_f, dtype={"sensor_id": str})
    loc = loc.set_index(loc["sensor_id"].str.strip())
    missing = [s for s in node_ids if s not in loc.index]
    if missing:
        raise ValueError(f"{loc_f}: no coordinates for sensors {missing[:5]} of {speed_f}")
    coords = loc.loc[node_ids, ["latitude", "longitude"]].to_numpy(dtype=np.float64)

    finite = np.isfinite(values)
    mask = finite.copy()
    if zero_is_missing:
        mask &= values != 0
    values = np.where(mask, values, 0.0)
    check_data(values[:, :, None], mask[:, :, None], ("speed",), ranges, str(speed_f), ("mph",))
    edge_index, edge_weight = dense_to_sparse(torch.from_numpy(adj).float())
    timestamps = pd.date_range(start=start, periods=values.shape[0], freq=freq)
    return TerritoryDataset(
        name=name,
        values=values[:, :, None].astype(np.float32),
        mask=mask[:, :, None].astype(np.float32),
        timestamps=timestamps,
        node_ids=node_ids,
        edge_index=edge_index,
        edge_weight=edge_weight,
        coords=coords,
        units=("mph",),
        channels=("speed",),
        source=f"Los-loop (T-GCN, Zhao et al. 2019; METR-LA subset) from {root}",
    )
