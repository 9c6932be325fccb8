"""The Los-loop loader (real shared data), territories by k-means, the dataset checks."""

import numpy as np
import pandas as pd
import pytest
import torch

from fedldt.data import TerritoryDataset, kmeans_node_partition, load_los_loop, partition_kmeans


@pytest.fixture(scope="module")
def los(data_root):
    return load_los_loop(data_root / "los_loop")


def test_los_loop_loader_shapes_time_and_graph(los):
    assert los.values.shape == (2016, 207, 1) and los.values.dtype == np.float32
    assert los.mask.shape == los.values.shape and los.mask.min() == 1.0  # no missing values in Los-loop
    assert los.timestamps[0] == pd.Timestamp("2012-03-01 00:00")
    assert los.timestamps[-1] == pd.Timestamp("2012-03-07 23:55")
    assert los.freq == pd.Timedelta(minutes=5)
    assert los.node_ids[0] == "773869" and los.node_ids[26] == "717804"
    assert los.coords.shape == (207, 2) and 34.0 < los.coords[:, 0].min() < los.coords[:, 0].max() < 34.3
    assert los.edge_index.shape[1] == 2626 + 207  # off-diagonal non-zeros + self-loops
    assert los.units == ("mph",)
    assert float(los.values.min()) == 1.0 and float(los.values.max()) == 70.0
    a = los.adjacency()
    np.testing.assert_allclose(a, a.T)  # los_adj.csv is symmetric


def test_los_loop_missing_folder_names_the_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"los_speed.csv.*dataset.path"):
        load_los_loop(tmp_path)


def test_kmeans_partition_disjoint_covering_and_seeded(los):
    parts = kmeans_node_partition(los.coords, 3, seed=0)
    allnodes = np.concatenate(parts)
    assert sorted(allnodes.tolist()) == list(range(207))  # covering and disjoint
    assert [len(p) for p in parts] == sorted((len(p) for p in parts), reverse=True)
    again = kmeans_node_partition(los.coords, 3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_territories_keep_their_induced_subgraph(los):
    territories = partition_kmeans(los, 3, seed=0)
    full = los.adjacency()
    assert sum(t.num_nodes for t in territories) == 207
    cut = 0
    for t in territories:
        idx = np.array([np.flatnonzero(los.node_ids == nid)[0] for nid in t.node_ids])
        np.testing.assert_array_equal(t.adjacency(), full[np.ix_(idx, idx)])
        np.testing.assert_array_equal(t.values, los.values[:, idx])
        cut += t.edge_index.shape[1]
    assert cut < los.edge_index.shape[1]  # edges between territories are dropped


def test_dataset_rejects_bad_input():
    ok = dict(name="x", values=np.zeros((4, 2, 1)), mask=np.ones((4, 2, 1)),
              timestamps=pd.date_range("2020", periods=4, freq="h"), node_ids=["a", "b"],
              edge_index=torch.tensor([[0], [1]]), edge_weight=torch.ones(1))
    TerritoryDataset(**ok)
    with pytest.raises(ValueError, match="fixed interval"):
        TerritoryDataset(**{**ok, "timestamps": pd.DatetimeIndex(["2020-01-01 00:00", "2020-01-01 01:00", "2020-01-01 03:00", "2020-01-01 04:00"])})
    with pytest.raises(ValueError, match="outside 0..1"):
        TerritoryDataset(**{**ok, "edge_index": torch.tensor([[0], [2]])})
    with pytest.raises(ValueError, match="node ids are not unique"):
        TerritoryDataset(**{**ok, "node_ids": ["a", "a"]})
    bad = np.zeros((4, 2, 1)); bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        TerritoryDataset(**{**ok, "values": bad})
    with pytest.raises(ValueError, match="num_territories=5"):
        kmeans_node_partition(np.zeros((3, 2)), 5, seed=0)
