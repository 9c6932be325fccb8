"""NGSI-LD TrafficFlowObserved: reading observations, unit conversion, and the forecast round trip."""

import json
import random

import numpy as np
import pandas as pd
import pytest

from fedldt.cli import main
from fedldt.delivery import ForecastPackage, InputError
from fedldt.delivery.ngsi import ENTITY_TYPE, mapping_for, table_from_entities
from fedldt.delivery.observations import select_window

SPEED = mapping_for(("speed",), ("mph",))
KMH_PER_MPH = 1.609344


def entity(sensor, time, kmh, unit=None, key_values=False, ref=True):
    """One TrafficFlowObserved observation, normalized (default) or key-values."""
    ent = {"id": f"urn:ngsi-ld:{ENTITY_TYPE}:obs-{sensor}-{time}", "type": ENTITY_TYPE}
    if key_values:
        ent.update(averageVehicleSpeed=kmh, dateObserved=time)
        if ref:
            ent["refRoadSegment"] = f"urn:ngsi-ld:RoadSegment:{sensor}"
        return ent
    speed = {"type": "Property", "value": kmh}
    if unit:
        speed["unitCode"] = unit
    ent.update(averageVehicleSpeed=speed, dateObserved={"type": "Property", "value": {"@type": "DateTime", "@value": time}})
    if ref:
        ent["refRoadSegment"] = {"type": "Relationship", "object": f"urn:ngsi-ld:RoadSegment:{sensor}"}
    return ent


def test_speed_maps_to_average_vehicle_speed_in_kmh():
    assert (SPEED.attribute, SPEED.wire_code, SPEED.package_code) == ("averageVehicleSpeed", "KMH", "HM")
    assert SPEED.to_package(100.0, None, "x") == pytest.approx(100 / KMH_PER_MPH, rel=1e-12)  # default: km/h
    assert SPEED.to_package(100.0, "KMH", "x") == pytest.approx(62.137119223733, rel=1e-12)
    assert SPEED.to_package(60.0, "HM", "x") == 60.0  # mph stays mph
    assert SPEED.from_package(60.0) == pytest.approx(96.56064, rel=1e-12)
    with pytest.raises(InputError, match="unitCode 'XYZ' of averageVehicleSpeed cannot be converted"):
        SPEED.to_package(1.0, "XYZ", "entities[0]")
    with pytest.raises(InputError, match="single-channel"):
        mapping_for(("speed", "flow"), ("mph", "veh"))
    assert mapping_for(("intensity",), ("veh/5min",)).to_package(12.0, None, "x") == 12.0


def test_observation_forms_read_to_the_same_table():
    ids = ["717804", "773869"]
    normalized = [entity("717804", "2012-03-07T18:00:00Z", 96.56064, unit="KMH"),
                  entity("773869", "2012-03-07T18:00:00Z", 80.0),
                  entity("717804", "2012-03-07T18:05:00Z", None)]  # null: missing
    table, refs = table_from_entities(normalized, ids, SPEED)
    assert list(table.columns) == ids and len(table) == 2
    assert table.loc[pd.Timestamp("2012-03-07T18:00:00Z"), "717804"] == pytest.approx(60.0)
    assert np.isnan(table.loc[pd.Timestamp("2012-03-07T18:05:00Z"), "717804"])
    assert np.isnan(table.loc[pd.Timestamp("2012-03-07T18:05:00Z"), "773869"])  # no entity at all
    assert refs == {"717804": "urn:ngsi-ld:RoadSegment:717804", "773869": "urn:ngsi-ld:RoadSegment:773869"}
    # key-values, entity id as the sensor, an ISO interval as dateObserved
    kv = [{"id": "urn:ngsi-ld:TrafficFlowObserved:717804", "type": ENTITY_TYPE, "averageVehicleSpeed": 96.56064,
           "dateObserved": "2012-03-07T18:00:00Z/2012-03-07T18:05:00Z"}]
    t2, refs2 = table_from_entities(kv, ids, SPEED)
    assert t2.iloc[0]["717804"] == pytest.approx(60.0) and refs2 == {}
    # NGSI-LD temporal representation: one entity per sensor, attribute instances with observedAt
    temporal = [{"id": "urn:ngsi-ld:TrafficFlowObserved:773869", "type": ENTITY_TYPE, "averageVehicleSpeed": [
        {"type": "Property", "value": 50.0, "unitCode": "HM", "observedAt": "2012-03-07T18:05:00Z"},
        {"type": "Property", "value": 51.0, "unitCode": "HM", "observedAt": "2012-03-07T18:00:00Z"}]}]
    t3, _ = table_from_entities(temporal, ids, SPEED)
    assert t3["773869"].tolist() == [51.0, 50.0] and list(t3.index) == list(pd.to_datetime(
        ["2012-03-07T18:00:00Z", "2012-03-07T18:05:00Z"]))


def test_bad_entities_are_named():
    ids = ["717804"]
    with pytest.raises(InputError, match=r"unknown sensor id\(s\) 999 \(entities\[0\]"):
        table_from_entities([entity("999", "2012-03-07T18:00:00Z", 90.0)], ids, SPEED)
    with pytest.raises(InputError, match=r"entities\[0\] .*type 'WeatherObserved'; expected TrafficFlowObserved"):
        table_from_entities([{**entity("717804", "2012-03-07T18:00:00Z", 90.0), "type": "WeatherObserved"}], ids, SPEED)
    with pytest.raises(InputError, match="no averageVehicleSpeed attribute"):
        table_from_entities([{"id": "urn:x:717804", "type": ENTITY_TYPE, "intensity": 3, "dateObserved": "2012-03-07"}],
                            ids, SPEED)
    with pytest.raises(InputError, match="no time: give dateObserved"):
        table_from_entities([{"id": "urn:x:717804", "type": ENTITY_TYPE, "averageVehicleSpeed": 90.0}], ids, SPEED)
    fast, _ = table_from_entities([entity("717804", "2012-03-07T18:00:00Z", "fast")], ids, SPEED)
    with pytest.raises(InputError, match=r"sensor 717804 at 2012-03-07 18:00:00\+00:00: 'fast' \(a string, not a number\)"):
        select_window(fast, ids, 1, pd.Timedelta("5min"), timezone="UTC")  # refused (or masked) naming sensor and time
    twice = [entity("717804", "2012-03-07T18:00:00Z", 90.0), entity("717804", "2012-03-07T18:00:00Z", 91.0)]
    with pytest.raises(InputError, match="two observations of sensor 717804 at 2012-03-07 18:00:00"):
        table_from_entities(twice, ids, SPEED)
    with pytest.raises(InputError, match="non-empty list"):
        table_from_entities([], ids, SPEED)


def test_ngsi_ld_round_trip_gives_the_table_forecast(package_dir, in_run, tmp_path):
    pkg = ForecastPackage.load(package_dir)
    ds = in_run.task.dataset
    end = int(ds.timestamps.get_loc(pd.Timestamp("2012-03-07 18:00")))
    rows = range(end - 12, end)
    local = pd.DataFrame(ds.values[end - 12:end, :, 0].astype(np.float64), columns=ds.node_ids.tolist(),
                         index=[ds.timestamps[i].isoformat() for i in rows])
    expected = pkg.forecast(local)  # mph, from the plain table
    utc = pd.DatetimeIndex(ds.timestamps[end - 12:end]).tz_localize("America/Los_Angeles").tz_convert("UTC")
    ents = [entity(s, t.strftime("%Y-%m-%dT%H:%M:%SZ"), float(v) * KMH_PER_MPH, unit="KMH")
            for t, (_, row) in zip(utc, local.iterrows()) for s, v in row.items()]
    random.Random(0).shuffle(ents)
    (tmp_path / "obs.jsonld").write_text(json.dumps(ents))
    assert main(["predict", str(package_dir), "--input", str(tmp_path / "obs.jsonld"),
                 "--output", str(tmp_path / "fc.jsonld")]) == 0
    out = json.loads((tmp_path / "fc.jsonld").read_text())
    n = len(ds.node_ids)
    assert len(out) == 12 * n and len({e["id"] for e in out}) == 12 * n
    first = out[0]
    assert first["type"] == ENTITY_TYPE and first["averageVehicleSpeed"]["unitCode"] == "KMH"
    t_from = pd.Timestamp(first["dateObservedFrom"]["value"]["@value"])
    t_to = pd.Timestamp(first["dateObservedTo"]["value"]["@value"])
    assert t_from == expected.timestamps[0] and t_to - t_from == pd.Timedelta("5min")  # 2012-03-08T02:00:00Z
    assert first["dateObserved"]["value"] == "2012-03-08T02:00:00Z/2012-03-08T02:05:00Z"
    assert first["refRoadSegment"]["object"] == f"urn:ngsi-ld:RoadSegment:{first['name']['value']}"
    lat, lon = pkg.coords[first["name"]["value"]]
    assert first["location"]["value"]["coordinates"] == [lon, lat]
    back, _ = table_from_entities(out, pkg.node_ids, SPEED)  # forecasts read back as observations, in mph
    assert list(back.index) == list(expected.timestamps)
    assert np.abs(back[pkg.node_ids].to_numpy() - expected.values[:, :, 0]).max() <= 1e-4
    # the temporal representation in mph gives the same forecast
    temporal = [{"id": f"urn:ngsi-ld:{ENTITY_TYPE}:{s}", "type": ENTITY_TYPE, "averageVehicleSpeed": [
        {"type": "Property", "value": float(v), "unitCode": "HM", "observedAt": t.strftime("%Y-%m-%dT%H:%M:%SZ")}
        for t, v in zip(utc, local[s])]} for s in reversed(pkg.node_ids)]
    table, _ = table_from_entities(temporal, pkg.node_ids, SPEED)
    assert np.array_equal(pkg.forecast(table).values, expected.values)


def test_implausible_ngsi_ld_values_are_refused_or_masked(package_dir, in_run):
    pkg = ForecastPackage.load(package_dir)
    ds = in_run.task.dataset
    end = int(ds.timestamps.get_loc(pd.Timestamp("2012-03-07 18:00")))
    utc = pd.DatetimeIndex(ds.timestamps[end - 12:end]).tz_localize("America/Los_Angeles").tz_convert("UTC")
    stamps = [t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in utc]

    def entities(**odd):
        """One observation per sensor and step (mph); ``odd`` = {"<node>_<step>": value} replaces values."""
        return [entity(s, t, odd.get(f"{j}_{i}", float(ds.values[end - 12 + i, j, 0])), unit="HM")
                for j, s in enumerate(ds.node_ids) for i, t in enumerate(stamps)]

    ids = ds.node_ids.tolist()
    for value, shown in [(1e300, "1e+300 (beyond float32's range, about 3.4e38)"), (True, "True (a boolean, not a number)"),
                         (-1000, "-1000 (outside the valid range 0 to 120 mph)"), ("fast", "'fast' (a string, not a number)"),
                         (10 ** 400, "an integer of 401 digits (beyond float32's range, about 3.4e38)")]:
        table, _ = table_from_entities(entities(**{"3_5": value}), pkg.node_ids, SPEED)
        with pytest.raises(InputError) as e:
            pkg.forecast(table)
        assert str(e.value).startswith(f"invalid value(s) in the 12 most recent steps: sensor {ids[3]} at "
                                       f"2012-03-07 17:25:00-08:00: {shown}; send plausible observations"), str(e.value)
    # 200 km/h written as 124.27 mph: the range applies in the model's unit, after conversion
    kmh = [entity(s, t, float(ds.values[end - 12 + i, j, 0]) * KMH_PER_MPH, unit="KMH")
           for j, s in enumerate(ds.node_ids) for i, t in enumerate(stamps)]
    kmh[0]["averageVehicleSpeed"]["value"] = 200.0
    with pytest.raises(InputError, match=rf"sensor {ids[0]} at 2012-03-07 17:00:00-08:00: 124.274 \(outside the valid range 0 to 120 mph\)"):
        pkg.forecast(table_from_entities(kmh, pkg.node_ids, SPEED)[0])
    table, _ = table_from_entities(entities(**{"3_5": 1e300, "3_6": "fast", "7_0": -1}), pkg.node_ids, SPEED)
    fc = pkg.forecast(table, invalid="mask")
    assert fc.invalid_inputs == {ids[3]: 2, ids[7]: 1} and fc.missing_inputs == {} and np.isfinite(fc.values).all()
