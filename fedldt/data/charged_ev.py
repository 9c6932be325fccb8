"""Loader for CHARGED EV charging demand (hourly kWh per charging site), one city at a time.

Source: Guo et al., "CHARGED: A City-scale and Harmonized Dataset for Global Electric Vehicle
Charging Demand Analysis", Scientific Data 12, 1254 (2025), doi:10.1038/s41597-025-05584-7;
files of ``IntelligentSystemsLab/CHARGED`` (see ``../shared/data/README.md`` §2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from fedldt.data.ranges import check_data, parse_valid_ranges
from fedldt.data.territory import TerritoryDataset

#: Weather columns usable as territory-level covariates (hourly, no NaN in the shared files).
WEATHER_COLUMNS = ("temp", "humidity", "precip", "windspeed", "cloudcover", "solarradiation")


def distance_graph(dist_km: np.ndarray, method: str = "gaussian", sigma_km: float | None = None,
                   threshold: float = 0.1, k: int = 8, self_loops: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sensor graph from a distance matrix.

    ``gaussian``: ``w_ij = exp(-(d_ij / sigma)^2)`` kept where ``w_ij >= threshold`` (DCRNN's
    thresholded Gaussian kernel, Li et al. 2018; ``sigma`` defaults to the std of the
    off-diagonal distances). ``knn``: each node linked to its ``k`` nearest others, made
    symmetric, weighted with the same kernel.

    Args:
        dist_km: ``[node, node]`` symmetric distances in km, zero diagonal.
        method: ``"gaussian"`` or ``"knn"``.
        sigma_km: kernel width in km (``None`` = std of distances).
        threshold: minimum Gaussian weight kept (gaussian only).
        k: neighbours per node (knn only).
        self_loops: add weight-1 self-loops.

    Returns:
        ``edge_index`` ``[2, E]`` int64 and ``edge_weight`` ``[E]`` float32.

    Raises:
        ValueError: unknown method or a bad distance matrix.
    """
    d = np.asarray(dist_km, dtype=np.float64)
    n = d.shape[0]
    if d.shape != (n, n) or not np.isfinite(d).all() or (d < 0).any():
        raise ValueError(f"distance matrix must be a finite non-negative square array, got shape {d.shape}")
    off = ~np.eye(n, dtype=bool)
    sigma = float(sigma_km) if sigma_km else float(d[off].std()) if n > 1 else 1.0
    w = np.exp(-((d / max(sigma, 1e-9)) ** 2))
    if method == "gaussian":
        keep = (w >= threshold) & off
    elif method == "knn":
        kk = min(int(k), n - 1)
        order = np.argsort(np.where(off, d, np.inf), axis=1)[:, :kk]
        keep = np.zeros((n, n), dtype=bool)
        keep[np.repeat(np.arange(n), kk), order.ravel()] = True
        keep = keep | keep.T
    else:
        raise ValueError(f"graph method {method!r} must be 'gaussian' or 'knn'")
    if self_loops:
        keep = keep | ~off
        w = np.where(off, w, 1.0)
    src, dst = np.nonzero(keep)
    return torch.from_numpy(np.stack([src, dst]).astype(np.int64)), torch.from_numpy(w[src, dst].astype(np.float32))


def load_charged_city(path: str | Path, city: str, graph: dict | None = None, weather: bool = True) -> TerritoryDataset:
    """One CHARGED city as a territory: values ``[4392, sites, 1]`` kWh per hour.

    The site columns of ``volume.csv`` are in string order (0, 1, 10, 11, ...); they are
    re-sorted numerically so node ``i`` is row/column ``i`` of ``distance.csv`` and
    ``station_id`` ``i`` of ``stations.csv``. Sites whose volume is zero over the whole series
    get mask 0 everywhere (they carry no signal and are excluded from metrics); every other
    value, zeros included, is valid (MAPE ignores zero targets).

    Args:
        path: folder holding the city folders (``JHB/``, ``MEL/``, ``SPO/``).
        city: city code, e.g. ``"MEL"``.
        graph: options of :func:`distance_graph` (``method``, ``sigma_km``, ``threshold``, ``k``).
        weather: attach hourly weather covariates (``extra["covariates"]`` ``[time, 6]`` float32,
            names in ``extra["covariate_names"]``).

    Raises:
        FileNotFoundError: a file is missing (path named).
        ValueError: files disagree (site ids, sizes, timestamps), naming the file.
    """
    root = Path(path) / city
    files = {k: root / f"{k}.csv" for k in ("volume", "distance", "stations", "weather")}
    for f in files.values():
        if not f.is_file():
            raise FileNotFoundError(
                f"CHARGED file not found: {f}. Set dataset.path to the charged_ev folder and dataset.cities to its city codes."
            )
    vol = pd.read_csv(files["volume"], index_col=0)
    try:
        site_ids = [int(c) for c in vol.columns]
    except ValueError as e:
        raise ValueError(f"{files['volume']}: site columns must be integer ids: {e}") from e
    order = np.argsort(site_ids, kind="stable")
    vol = vol.iloc[:, order]
    sorted_ids = np.asarray(site_ids)[order]
    n = len(sorted_ids)
    if not np.array_equal(sorted_ids, np.arange(n)):
        raise ValueError(f"{files['volume']}: site ids must be 0..{n - 1}, got {sorted_ids[:5]}...")
    timestamps = pd.DatetimeIndex(pd.to_datetime(vol.index))
    dist = pd.read_csv(files["distance"], index_col=0).to_numpy(dtype=np.float64)
    if dist.shape != (n, n):
        raise ValueError(f"{files['distance']}: shape {dist.shape}, expected ({n}, {n}) to match {files['volume']}")
    stations = pd.read_csv(files["stations"])
    if stations["station_id"].tolist() != list(range(n)):
        raise ValueError(f"{files['stations']}: station_id must be 0..{n - 1} in order")
    values = vol.to_numpy(dtype=np.float64)
    mask = np.isfinite(values)
    all_zero = np.nansum(np.abs(values), axis=0) == 0
    mask[:, all_zero] = False
    values = np.where(mask, values, 0.0)
    edge_index, edge_weight = distance_graph(dist, **(graph or {}))
    extra: dict = {"all_zero_sites": np.flatnonzero(all_zero).tolist()}
    if weather:
        w = pd.read_csv(files["weather"])
        wt = pd.DatetimeIndex(pd.to_datetime(w["time"]))
        if len(wt) != len(timestamps) or not (wt == timestamps).all():
            raise ValueError(f"{files['weather']}: timestamps do not match {files['volume']}")
        cov = w[list(WEATHER_COLUMNS)].to_numpy(dtype=np.float64)
        if not np.isfinite(cov).all():
            raise ValueError(f"{files['weather']}: NaN in weather columns {WEATHER_COLUMNS}; set dataset.weather=false")
        extra["covariates"] = cov.astype(np.float32)
        extra["covariate_names"] = list(WEATHER_COLUMNS)
    return TerritoryDataset(
        name=city,
        values=values[:, :, None],
        mask=mask[:, :, None],
        timestamps=timestamps,
        node_ids=[str(i) for i in sorted_ids],
        edge_index=edge_index,
        edge_weight=edge_weight,
        coords=stations[["latitude", "longitude"]].to_numpy(dtype=np.float64),
        units=("kWh",),
        channels=("energy",),
        source=f"CHARGED (Guo et al., Sci. Data 2025) city {city} from {root}",
        extra=extra,
    )


def load_charged_cities(path: str | Path, cities: Sequence[str], graph: dict | None = None, weather: bool = True,
                        name: str = "charged_ev", valid_range: dict | None = None) -> list[TerritoryDataset]:
    """Several CHARGED cities, one territory each (see :func:`load_charged_city`).

    ``valid_range`` declares plausible values of ``energy`` and of the weather covariates (see
    :mod:`fedldt.data.ranges`); each city's data is checked against it, and ``fedldt export``
    writes the channel's range into model packages.

    Raises:
        ValueError: no city given, the cities' time axes differ, ``valid_range`` names something
            that is neither ``energy`` nor a weather column, or a value is outside its range.
    """
    if not cities:
        raise ValueError("dataset.cities is empty: name at least one CHARGED city (JHB, MEL, SPO)")
    ranges = parse_valid_ranges(valid_range, "dataset.valid_range")
    unknown = sorted(set(ranges) - {"energy", *WEATHER_COLUMNS})
    if unknown:
        raise ValueError(f"dataset.valid_range: {unknown} are neither the channel (energy) nor weather columns "
                         f"{list(WEATHER_COLUMNS)} of CHARGED")
    out = [load_charged_city(path, c, graph, weather) for c in cities]
    for t in out:
        check_data(t.values, t.mask, t.channels, ranges, f"CHARGED city {t.name}", t.units)
        if "covariates" in t.extra:
            check_data(t.extra["covariates"], None, t.extra["covariate_names"], ranges, f"CHARGED city {t.name} weather")
    for t in out[1:]:
        if not t.timestamps.equals(out[0].timestamps):
            raise ValueError(f"CHARGED cities {out[0].name} and {t.name} cover different hours")
    return out
