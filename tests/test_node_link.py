"""Node-link JSON territory data packages (``observations.layout: node_link``) and the
``montevideo_bus_4`` pilot, which reads the shared Montevideo file with a manifest in its pilot
config and no dataset code (issue 12, item 9)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from fedldt.config import compose_config, load_territories, resolve_config
from fedldt.data.package import TerritoryPackageError, load_package
from fedldt.data.package_writer import write_package
from fedldt.schema import PackageDataset


def node_link(root: Path, nodes: list[dict], links: list[dict], **manifest) -> Path:
    """A package folder with ``network.json`` (networkx node_link_data layout) and territory.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "network.json").write_text(json.dumps({"directed": True, "multigraph": False, "graph": {},
                                                   "nodes": nodes, "links": links}))
    spec = {"name": "nl", "interval": "1h", "timezone": "Europe/Madrid",
            "channels": [{"name": "boardings", "unit": "passengers/h", "min": 0, "type": "integer"}],
            "observations": {"file": "network.json", "layout": "node_link", "start": "2020-10-25 01:00",
                             "node_link": {"id": "id", "series": "y", "x": "e", "y": "n"}},
            "sensors": {"crs": "EPSG:32721"},
            "graph": {"directed": True, "weight_kind": "distance", "distance_unit": "m", "sigma_km": 1.0,
                      "threshold": 0.01},
            "provenance": "test", "licence": "CC0-1.0"}
    for k, v in manifest.items():
        spec[k] = {**spec[k], **v} if isinstance(v, dict) and isinstance(spec.get(k), dict) else v
    (root / "territory.yaml").write_text(yaml.safe_dump(spec))
    return root


NODES = [{"id": "007", "y": [1, 0, None, 3], "e": 500000, "n": 10000000},
         {"id": 8, "y": [0, 0, 2, 5], "e": 500000, "n": 9000000},
         {"id": "9", "y": [4, 4, 4, 4], "e": 600000, "n": 10000000}]
LINKS = [{"source": "007", "target": 8, "weight": 500.0}, {"source": 8, "target": "9", "weight": 2000.0}]


def test_node_link_package_known_answer(tmp_path):
    ds = load_package(node_link(tmp_path, NODES, LINKS))
    assert list(ds.node_ids) == ["007", "8", "9"]  # ids as text, leading zeros kept
    np.testing.assert_array_equal(ds.values[:, :, 0], [[1, 0, 4], [0, 0, 4], [0, 2, 4], [3, 5, 4]])
    np.testing.assert_array_equal(ds.mask[:, :, 0], [[1, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1]])  # null = missing
    # 2020-10-25 01:00 Madrid is summer time (UTC+2); 02:00 occurs twice, the clock goes back at 03:00
    assert [str(t) for t in ds.timestamps] == ["2020-10-25 01:00:00+02:00", "2020-10-25 02:00:00+02:00",
                                               "2020-10-25 02:00:00+01:00", "2020-10-25 03:00:00+01:00"]
    # UTM 21S: the false origin (500000 E, 10000000 N) is the equator on the zone's meridian, 57 W
    np.testing.assert_allclose(ds.coords[0], [0.0, -57.0], atol=1e-9)
    # 1000 km of northing on the central meridian = 1000 / 0.9996 km of meridian arc, about 9.0466 degrees
    assert ds.coords[1, 0] == pytest.approx(-9.0466, abs=1e-3)
    # directed links kept as given, distances in metres through exp(-(d / 1 km)^2), one self-loop per node
    edges = {(int(s), int(d)): float(w) for (s, d), w in zip(ds.edge_index.t().tolist(), ds.edge_weight)}
    assert edges == pytest.approx({(0, 1): np.exp(-0.25), (1, 2): np.exp(-4.0), (0, 0): 1.0, (1, 1): 1.0, (2, 2): 1.0})


def test_node_link_faults_name_the_node_and_the_fix(tmp_path):
    short = [dict(NODES[0]), {**NODES[1], "y": [0, 0, 2]}, NODES[2]]
    with pytest.raises(TerritoryPackageError, match=r"network.json: node '8' has 3 values in 'y', the first node 4"):
        load_package(node_link(tmp_path / "a", short, LINKS))
    text = [NODES[0], {**NODES[1], "y": [0, "x", 2, 1]}, NODES[2]]
    with pytest.raises(TerritoryPackageError, match=r"node '8': 'y' holds 1 value\(s\) that are not numbers, e.g. 'x'"):
        load_package(node_link(tmp_path / "b", text, LINKS))
    with pytest.raises(TerritoryPackageError, match=r"node '007' has no list 'flow'"):
        load_package(node_link(tmp_path / "c", NODES, LINKS, observations={"node_link": {"series": "flow", "x": "e", "y": "n"}}))
    with pytest.raises(TerritoryPackageError, match=r"field 'observations': .*needs \['start'\]"):
        load_package(node_link(tmp_path / "d", NODES, LINKS, observations={"start": None}))
    with pytest.raises(TerritoryPackageError, match=r"\['sensors.file'\] would be ignored"):
        load_package(node_link(tmp_path / "e", NODES, LINKS, sensors={"file": "sensors.csv"}))
    (node_link(tmp_path / "f", NODES, LINKS) / "network.json").write_text("{not json")
    with pytest.raises(TerritoryPackageError, match=r"network.json: not a UTF-8 JSON file"):
        load_package(tmp_path / "f")
    (tmp_path / "g" / "network.json").parent.mkdir()
    node_link(tmp_path / "g", NODES, LINKS)
    (tmp_path / "g" / "network.json").write_text(json.dumps({"nodes": [{"y": [1]}], "links": []}))
    with pytest.raises(TerritoryPackageError, match=r"node 1 of 'nodes' has no text or integer 'id'"):
        load_package(tmp_path / "g")
    (tmp_path / "g" / "network.json").write_text(json.dumps({"nodes": NODES, "links": [{"source": "7", "target": 8}]}))
    with pytest.raises(TerritoryPackageError, match=r"link 1 of 'links' does not join two listed nodes \(source '7'"):
        load_package(tmp_path / "g")



def test_node_link_hostile_documents_are_refused_with_the_fix(tmp_path):
    """Documents networkx or Python's json would take silently (merged duplicates, NaN/Infinity,
    1e999) or crash on (deep nesting, 10**400, a start the clock skips, a grid past 2262)."""
    def refused(name: str, raw: str, match: str, **manifest) -> None:
        root = node_link(tmp_path / name, NODES, LINKS, **manifest)
        (root / "network.json").write_text(raw)
        with pytest.raises(TerritoryPackageError, match=match):
            load_package(root)

    doc = lambda nodes, links=LINKS: json.dumps({"nodes": nodes, "links": links})  # noqa: E731
    # a second node "007" would replace the first one's series (networkx merges nodes by id)
    refused("dup", doc([NODES[0], {**NODES[0], "y": [9, 9, 9, 9]}, NODES[1], NODES[2]]),
            r"network.json: node ids '007' are listed more than once")
    refused("dup_text", doc([*NODES, {**NODES[1], "id": "8"}]), r"node ids '8' are listed more than once")
    # a second link 007 -> 8 would replace the first one's weight
    refused("dup_link", doc(NODES, [*LINKS, {"source": "007", "target": 8, "weight": 9000.0}]),
            r"link 3 of 'links' joins '007' to '8' again; fix: one link per")
    refused("nan", doc(NODES).replace('"y": [4, 4, 4, 4]', '"y": [4, NaN, 4, 4]'), r"not a UTF-8 JSON file \(NaN is not a JSON number")
    refused("inf", doc([{**NODES[0], "y": [1, 1e999, 2, 3]}, *NODES[1:]]).replace("Infinity", "1e999"),
            r"node '007': 'y' holds 1 value\(s\) that are not numbers, e.g. 'inf'")
    refused("big", doc([{**NODES[0], "y": [10**400, 1, 2, 3]}, *NODES[1:]]), r"node '007': 'y' holds 1 value\(s\) that are not numbers")
    refused("coord", doc([{**NODES[0], "e": 10**400}, *NODES[1:]]), r"node attribute 'e' holds values that are not numbers")
    refused("deep", "[" * 100_000 + "]" * 100_000, r"not a UTF-8 JSON file")
    refused("gap", doc(NODES), r"field 'observations.start' '2020-03-29 02:30' does not exist in Europe/Madrid",
            observations={"start": "2020-03-29 02:30"})
    refused("long", doc([{**n, "y": [1] * 200_000} for n in NODES]), r"200000 steps of 1h from 2250-01-01 00:00 run past the year 2262",
            observations={"start": "2250-01-01 00:00"})


# ---------------------------------------------------------------------------- montevideo_bus_4
@pytest.fixture(scope="module")
def montevideo(data_root):
    cfg = resolve_config(compose_config(["pilot=montevideo_bus_4"]))
    return cfg, load_package(cfg["dataset"]["path"], cfg["dataset"]["manifest"])


def test_montevideo_pilot_reads_the_shared_file(montevideo):
    cfg, ds = montevideo
    assert (ds.num_nodes, ds.num_steps, ds.channels, ds.units) == (675, 744, ("boardings",), ("passengers/h",))
    assert str(ds.timestamps[0]) == "2020-10-01 00:00:00-03:00" and str(ds.timestamps[-1]) == "2020-10-31 23:00:00-03:00"
    assert float(ds.values.sum()) == 374595.0 and float(ds.mask.min()) == 1.0  # every count kept, zeros included
    assert float((ds.values == 0).mean()) == pytest.approx(0.804130, abs=1e-6)
    assert int(ds.edge_index.shape[1]) == 675 + 690  # every link kept, plus one self-loop per stop
    lat, lon = ds.coords[:, 0], ds.coords[:, 1]
    assert (-35.0 < lat.min() < lat.max() < -34.7) and (-56.5 < lon.min() < lon.max() < -55.9)  # Montevideo
    assert [p["code"] for p in ds.extra["problems"]] == ["suspected_outage"]
    assert len(ds.extra["problems"][0]["sensors"]) == 8  # listed (164 sensors in all, see the pilot file)
    assert "164 sensor(s)" in ds.extra["problems"][0]["message"]
    territories = load_territories(cfg)
    assert [t.num_nodes for t in territories] == [253, 187, 183, 52]


def test_montevideo_territory_package_round_trip(montevideo, tmp_path):
    cfg, _ = montevideo
    t3 = load_territories(cfg)[3]
    write_package(t3, tmp_path / "t3", None, None, "test", "test")
    spec = yaml.safe_load((tmp_path / "t3" / "territory.yaml").read_text())
    assert spec["timezone"] == "America/Montevideo"
    assert spec["channels"] == [{"name": "boardings", "unit": "passengers/h", "min": 0.0, "max": None, "type": "integer"}]
    assert spec["outages"] == {"max_constant": "4D", "mask": False}
    back = load_package(tmp_path / "t3")
    np.testing.assert_array_equal(back.values, t3.values)
    np.testing.assert_array_equal(back.mask, t3.mask)
    assert list(back.timestamps) == list(t3.timestamps) and list(back.node_ids) == list(t3.node_ids)
    assert torch.equal(back.edge_index, t3.edge_index)
    torch.testing.assert_close(back.edge_weight, t3.edge_weight, rtol=0, atol=1e-7)


def test_manifest_in_config_is_checked_before_loading():
    with pytest.raises(ValueError, match="timezone"):
        PackageDataset.model_validate({"_target_": "fedldt.data.load_package", "path": "/nowhere",
                                       "manifest": {"name": "x", "interval": "1h", "timezone": "Mars/Olympus",
                                                    "channels": [{"name": "c", "unit": "u"}], "provenance": "p",
                                                    "licence": "l"}})
