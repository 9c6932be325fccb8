"""Splitting one sensor network into territories (federated clients)."""

from __future__ import annotations

import numpy as np

from fedldt.data.territory import TerritoryDataset


def kmeans_node_partition(coords: np.ndarray, num_territories: int, seed: int, n_init: int = 10) -> list[np.ndarray]:
    """Cluster node coordinates with k-means (scikit-learn, Lloyd) into disjoint territories.

    Territories are ordered by decreasing size, ties broken by their smallest node index, so
    the order does not depend on k-means' arbitrary label numbering.

    Args:
        coords: ``[node, 2]`` coordinates (latitude, longitude in degrees, or projected metres).
        num_territories: K, the number of territories (1 <= K <= number of nodes).
        seed: random state of k-means.
        n_init: k-means restarts.

    Returns:
        K sorted int64 arrays of node indices; disjoint, covering ``0..node-1``, none empty.

    Raises:
        ValueError: K out of range or coordinates not finite.
    """
    coords = np.asarray(coords, dtype=np.float64)
    n = coords.shape[0]
    if not 1 <= num_territories <= n:
        raise ValueError(f"partition.num_territories={num_territories} must be between 1 and {n} (nodes)")
    if coords.ndim != 2 or not np.isfinite(coords).all():
        raise ValueError("node coordinates must be a finite [node, 2] array to partition by k-means")
    if num_territories == 1:
        return [np.arange(n, dtype=np.int64)]
    from sklearn.cluster import KMeans  # here, not at import: a config check must not wait for scikit-learn

    labels = KMeans(n_clusters=num_territories, n_init=n_init, random_state=seed).fit_predict(coords)
    parts = [np.flatnonzero(labels == k).astype(np.int64) for k in range(num_territories)]
    if any(p.size == 0 for p in parts):
        raise ValueError(f"k-means gave an empty territory for K={num_territories}; use a smaller K")
    parts.sort(key=lambda p: (-p.size, int(p[0])))
    return parts


def partition_kmeans(dataset: TerritoryDataset, num_territories: int, seed: int, n_init: int = 10) -> list[TerritoryDataset]:
    """Territories ``t0..t{K-1}`` of ``dataset``, each with its induced subgraph.

    Raises:
        ValueError: the dataset has no coordinates, or see :func:`kmeans_node_partition`.
    """
    if dataset.coords is None:
        raise ValueError(f"dataset '{dataset.name}' has no node coordinates: k-means partitioning needs them")
    parts = kmeans_node_partition(dataset.coords, num_territories, seed, n_init)
    return [dataset.subset(p, name=f"t{i}") for i, p in enumerate(parts)]


def as_given(datasets: list[TerritoryDataset], num_territories: int) -> list[TerritoryDataset]:
    """Territories that are given by the data itself (e.g. one per city), in the given order.

    Raises:
        ValueError: the data holds a different number of territories than the config says.
    """
    if not isinstance(datasets, (list, tuple)):
        raise ValueError("partition 'as_given' needs a dataset loader that returns one dataset per territory")
    if len(datasets) != num_territories:
        raise ValueError(f"partition.num_territories={num_territories} but the dataset holds {len(datasets)} territories")
    return list(datasets)
