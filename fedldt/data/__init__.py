"""Territory datasets, loaders (built-in datasets and territory data packages), graphs, partitioning,
splits, scaling and windows."""

from fedldt.data.charged_ev import distance_graph, load_charged_cities, load_charged_city
from fedldt.data.graph import complete_self_loops, normalized_adjacency
from fedldt.data.los_loop import load_los_loop
from fedldt.data.package import TerritoryPackageError, load_package
from fedldt.data.packages import load_packages, package_folders
from fedldt.data.partition import as_given, kmeans_node_partition, partition_kmeans
from fedldt.data.territory import TerritoryDataset
from fedldt.data.windows import MaskedStandardScaler, WindowDataset, split_bounds, window_starts

__all__ = [
    "TerritoryDataset",
    "load_los_loop",
    "load_package",
    "load_packages",
    "package_folders",
    "TerritoryPackageError",
    "complete_self_loops",
    "normalized_adjacency",
    "load_charged_city",
    "load_charged_cities",
    "distance_graph",
    "as_given",
    "kmeans_node_partition",
    "partition_kmeans",
    "MaskedStandardScaler",
    "WindowDataset",
    "split_bounds",
    "window_starts",
]
