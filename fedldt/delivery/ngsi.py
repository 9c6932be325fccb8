"""NGSI-LD interoperability: FIWARE Smart Data Models ``TrafficFlowObserved`` in and out.

Observations are read from ``TrafficFlowObserved`` entities (normalized or key-values form,
one entity per observation or the NGSI-LD temporal representation) and forecasts are written
as ``TrafficFlowObserved`` entities whose ``dateObservedFrom``/``dateObservedTo`` mark the
forecast interval. The mapping (attributes, units, sensor ids, time) is documented in
``docs/ngsi_ld.md``; the data model is
https://github.com/smart-data-models/dataModel.Transportation/tree/master/TrafficFlowObserved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from fedldt.delivery.observations import InputError, NotANumber, _json_kind, _listing, _short, cell_value, parse_timestamps

ENTITY_TYPE = "TrafficFlowObserved"
SDM_CONTEXT = "https://raw.githubusercontent.com/smart-data-models/dataModel.Transportation/master/context.jsonld"
CORE_CONTEXT = "https://uri.etsi.org/ngsi-ld/v1/ngsi-ld-core-context.jsonld"

#: fedldt channel name -> (TrafficFlowObserved attribute, the data model's unit code; None = the
#: attribute has no unit of measure to convert, e.g. a vehicle count per observation period).
CHANNEL_ATTRIBUTES: dict[str, tuple[str, str | None]] = {
    "speed": ("averageVehicleSpeed", "KMH"),  # data model: "Kilometer per hour (Km/h)"
    "intensity": ("intensity", None),  # data model: total number of vehicles in the period
    "flow": ("intensity", None),
    "occupancy": ("occupancy", None),  # data model: fraction of the observation time
}

#: UN/CEFACT common codes of speed units (NGSI-LD ``unitCode``) -> metres per second.
SPEED_UNITS_MS: dict[str, float] = {"KMH": 1000.0 / 3600.0, "HM": 0.44704, "MTS": 1.0}
#: fedldt dataset unit names -> UN/CEFACT code.
UNIT_CODES: dict[str, str] = {"mph": "HM", "km/h": "KMH", "kmh": "KMH", "m/s": "MTS"}


@dataclass(frozen=True)
class AttributeMapping:
    """How one model channel maps onto a ``TrafficFlowObserved`` attribute.

    Attributes:
        attribute: the attribute name, e.g. ``"averageVehicleSpeed"``.
        wire_code: unit code assumed when an input property has no ``unitCode`` and written on
            output (the data model's unit), or ``None`` (values pass unchanged).
        package_code: unit code of the model's data (``"HM"`` for mph), or ``None``.
    """

    attribute: str
    wire_code: str | None
    package_code: str | None

    def to_package(self, value: float, code: str | None, where: str) -> float:
        """A value in unit ``code`` (``None`` = the data model's unit) in the model's unit.

        Raises:
            InputError: an unknown or inconvertible ``unitCode`` (named).
        """
        code = code or self.wire_code
        if code == self.package_code:
            return value
        if code in SPEED_UNITS_MS and self.package_code in SPEED_UNITS_MS:
            return value * SPEED_UNITS_MS[code] / SPEED_UNITS_MS[self.package_code]
        raise InputError(f"{where}: unitCode {code!r} of {self.attribute} cannot be converted to the model's "
                         f"unit ({self.package_code}); use one of {sorted(SPEED_UNITS_MS)}")

    def from_package(self, value: float) -> float:
        """A model value in the unit written on output (:attr:`wire_code`)."""
        if self.wire_code is None or self.wire_code == self.package_code:
            return value
        return value * SPEED_UNITS_MS[self.package_code] / SPEED_UNITS_MS[self.wire_code]


def mapping_for(channels: Sequence[str], units: Sequence[str]) -> AttributeMapping:
    """The attribute mapping of a single-channel model (e.g. ``("speed",), ("mph",)``).

    Raises:
        InputError: the model has several channels, or a channel/unit with no mapping.
    """
    if len(channels) != 1:
        raise InputError(f"NGSI-LD input/output supports single-channel models; this one has channels {list(channels)}")
    channel, unit = channels[0], units[0]
    if channel not in CHANNEL_ATTRIBUTES:
        raise InputError(f"model channel {channel!r} has no TrafficFlowObserved attribute (known: {sorted(CHANNEL_ATTRIBUTES)})")
    attribute, wire = CHANNEL_ATTRIBUTES[channel]
    package_code = UNIT_CODES.get(unit)
    if wire is not None and package_code not in SPEED_UNITS_MS:
        raise InputError(f"model unit {unit!r} of channel {channel!r} has no known conversion to {wire}")
    return AttributeMapping(attribute=attribute, wire_code=wire, package_code=package_code if wire else None)


def _value(prop: Any) -> Any:
    """The value of a Property in normalized (``{"type": "Property", "value": ...}``) or
    key-values form, unwrapping JSON-LD typed values (``{"@type": "DateTime", "@value": ...}``)."""
    if isinstance(prop, Mapping):
        if "value" in prop:
            prop = prop["value"]
        elif "@value" not in prop:
            return None
    if isinstance(prop, Mapping) and "@value" in prop:
        prop = prop["@value"]
    return prop


def _object(rel: Any) -> str | None:
    """The target of a Relationship (normalized ``{"object": ...}`` or key-values string)."""
    if isinstance(rel, Mapping):
        rel = rel.get("object")
    if isinstance(rel, list) and len(rel) == 1:
        rel = rel[0]
    return None if rel is None else str(rel)


def _interval_start(text: Any) -> Any:
    """``a/b`` (an ISO 8601 interval) -> ``a``; anything else unchanged."""
    return text.split("/", 1)[0] if isinstance(text, str) and "/" in text else text


def sensor_key(entity: Mapping[str, Any], known: set[str]) -> tuple[str, str | None]:
    """The sensor an entity observes: ``refRoadSegment``'s target if present, else the entity id.

    The key is the whole URI when it is a sensor id of the model, else the text after its last
    ``:`` (``urn:ngsi-ld:RoadSegment:717804`` -> ``717804``).

    Returns:
        ``(sensor_id, ref)`` where ``ref`` is the ``refRoadSegment`` URI or ``None``. The
        sensor id may be unknown to the model: the caller reports it.
    """
    ref = _object(entity.get("refRoadSegment"))
    uri = ref if ref is not None else str(entity.get("id", ""))
    return (uri if uri in known else uri.rsplit(":", 1)[-1]), ref


def table_from_entities(
    entities: Sequence[Any], node_ids: Sequence[str], mapping: AttributeMapping
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Observations table from ``TrafficFlowObserved`` entities.

    Each entity gives one observation (time = ``dateObservedFrom``, else the start of
    ``dateObserved``, else the attribute's ``observedAt``) or, in the temporal representation,
    a list of attribute instances each with ``observedAt``. Values are converted to the model's
    unit (``unitCode``, default the data model's: km/h for ``averageVehicleSpeed``); ``null``
    is a missing value. A value that is not a plausible number (text, a boolean, infinite,
    beyond float32's range) is kept unconverted, so that forecasting refuses (or masks) it
    naming sensor and time (see :func:`fedldt.delivery.observations.select_window`).

    Args:
        entities: NGSI-LD entities (dicts), compacted with the Smart Data Models context.
        node_ids: the model's sensor ids.
        mapping: see :func:`mapping_for`.

    Returns:
        ``(table, refs)``: table index = timestamps, columns = sensor ids, NaN where no value;
        ``refs`` = sensor id -> ``refRoadSegment`` URI (sensors that had one).

    Raises:
        InputError: not an entity list, a wrong type, no time or value, an unknown sensor, or two
            values for the same sensor and time (each named).
    """
    if not isinstance(entities, Sequence) or isinstance(entities, (str, bytes)) or not entities:
        raise InputError("entities: expected a non-empty list of NGSI-LD TrafficFlowObserved entities")
    known = set(node_ids)
    sensors, times, values, origins = [], [], [], []
    refs: dict[str, str] = {}
    unknown: dict[str, str] = {}
    for i, ent in enumerate(entities):
        where = f"entities[{i}]"
        if not isinstance(ent, Mapping):
            raise InputError(f"{where}: expected an NGSI-LD entity (a JSON object), got {type(ent).__name__}")
        where += f" (id {_short(repr(ent.get('id')), 60)})"
        etype = ent.get("type", "")
        if not isinstance(etype, str) or etype.rsplit("/", 1)[-1] != ENTITY_TYPE:
            raise InputError(f"{where}: type {_short(repr(etype), 60)}; expected {ENTITY_TYPE}")
        sensor, ref = sensor_key(ent, known)
        if sensor not in known:
            unknown.setdefault(sensor, where)
            continue
        if ref is not None:
            refs[sensor] = ref
        attr = ent.get(mapping.attribute)
        if attr is None:
            raise InputError(f"{where}: no {mapping.attribute} attribute")
        temporal = isinstance(attr, list)  # NGSI-LD temporal representation: instances with observedAt
        instances = attr if temporal else [attr]
        entity_time = _interval_start(_value(ent.get("dateObservedFrom")) or _value(ent.get("dateObserved")))
        for k, inst in enumerate(instances):
            w = f"{where} {mapping.attribute}[{k}]" if temporal else where
            observed_at = inst.get("observedAt") if isinstance(inst, Mapping) else None
            t = observed_at if temporal else (entity_time or observed_at)
            if t is None:
                raise InputError(f"{w}: no time: give dateObserved, dateObservedFrom or observedAt")
            v = _value(inst)
            code = inst.get("unitCode") if isinstance(inst, Mapping) else None
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                v = NotANumber(_short(repr(v), 40) if isinstance(v, (str, bool)) else _json_kind(v), _json_kind(v))
            elif v is None:
                v = np.nan
            elif cell_value(v)[1] is None:  # a finite number within float32's range, in the model's unit
                v = mapping.to_package(cell_value(v)[0], code, w)
            sensors.append(sensor); times.append(t if isinstance(t, str) else _short(t, 60)); values.append(v)
            origins.append(w)
    if unknown:
        raise InputError(f"unknown sensor id(s) {_listing([f'{s} ({w})' for s, w in unknown.items()])}: not among "
                         f"the model's {len(node_ids)} sensors (sensor = refRoadSegment, else the entity id)")
    stamps = parse_timestamps(times, where="entity times (dateObservedFrom/dateObserved/observedAt)")
    long = pd.DataFrame({"sensor": sensors, "time": stamps, "value": values, "origin": origins})
    dup = long.duplicated(["sensor", "time"], keep=False)
    if dup.any():
        first = long[dup].sort_values(["sensor", "time"]).head(2)
        raise InputError(f"two observations of sensor {first['sensor'].iloc[0]} at {first['time'].iloc[0]} "
                         f"({' and '.join(first['origin'])}); send one per sensor and time (e.g. aggregate lanes)")
    table = long.pivot(index="time", columns="sensor", values="value")
    table.columns = [str(c) for c in table.columns]
    return table, refs


def _iso(ts: pd.Timestamp) -> str:
    """ISO 8601: UTC with ``Z`` for tz-aware times (the data model's convention), else naive."""
    if ts.tzinfo is None:
        return ts.strftime("%Y-%m-%dT%H:%M:%S")
    return ts.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%SZ")


def forecast_entities(
    forecast: Any,
    mapping: AttributeMapping,
    coords: Mapping[str, tuple[float, float]] | None = None,
    refs: Mapping[str, str] | None = None,
    provider: str = "fedldt",
) -> list[dict[str, Any]]:
    """Forecasts as NGSI-LD ``TrafficFlowObserved`` entities (normalized form).

    One entity per sensor and horizon step; the forecast for step time ``t`` covers the
    interval ``[t, t + interval)`` (``dateObservedFrom``/``dateObservedTo``, and ``dateObserved``
    as the ISO 8601 interval ``from/to``). Entity ids are
    ``urn:ngsi-ld:TrafficFlowObserved:fedldt-forecast:<territory>:<sensor>:<from>``, so a newer
    forecast of the same interval updates the same entity.

    Args:
        forecast: a :class:`fedldt.delivery.package.Forecast` (single channel).
        mapping: see :func:`mapping_for`.
        coords: sensor id -> (latitude, longitude) in degrees, written as a GeoJSON ``location``.
        refs: sensor id -> ``refRoadSegment`` URI (echoed from the input entities).
        provider: the ``dataProvider`` text.

    Returns:
        A list of JSON-able entities, each with its ``@context``; sensors in
        ``forecast.unavailable`` have none.
    """
    refs = refs or {}
    out = []
    for h, start in enumerate(forecast.timestamps):
        end = start + forecast.interval
        t_from, t_to = _iso(start), _iso(end)
        for j, sensor in enumerate(forecast.node_ids):
            if sensor in forecast.unavailable:  # no forecast of this sensor (the JSON reply says why)
                continue
            value = mapping.from_package(float(forecast.values[h, j, 0]))
            missing = forecast.missing_inputs.get(sensor, 0)
            invalid = forecast.invalid_inputs.get(sensor, 0)
            note = f"; {missing} missing input value(s) fed to the model as masked entries" if missing else ""
            note += f"; {invalid} invalid input value(s) fed to the model as masked entries" if invalid else ""
            prop: dict[str, Any] = {"type": "Property", "value": value}
            if mapping.wire_code:
                prop["unitCode"] = mapping.wire_code
            ent: dict[str, Any] = {
                "id": f"urn:ngsi-ld:{ENTITY_TYPE}:fedldt-forecast:{forecast.territory}:{sensor}:"
                      + t_from.replace("-", "").replace(":", ""),
                "type": ENTITY_TYPE,
                "dateObserved": {"type": "Property", "value": f"{t_from}/{t_to}"},
                "dateObservedFrom": {"type": "Property", "value": {"@type": "DateTime", "@value": t_from}},
                "dateObservedTo": {"type": "Property", "value": {"@type": "DateTime", "@value": t_to}},
                mapping.attribute: prop,
                "name": {"type": "Property", "value": sensor},
                "description": {"type": "Property", "value": (
                    f"fedldt forecast, step {h + 1} of {len(forecast.timestamps)} after the observation of "
                    f"{_iso(forecast.issued_after)}{note}")},
                "dataProvider": {"type": "Property", "value": provider},
            }
            if sensor in refs:
                ent["refRoadSegment"] = {"type": "Relationship", "object": refs[sensor]}
            if coords and sensor in coords:
                lat, lon = coords[sensor]
                ent["location"] = {"type": "GeoProperty", "value": {"type": "Point", "coordinates": [lon, lat]}}
            ent["@context"] = [SDM_CONTEXT, CORE_CONTEXT]
            out.append(ent)
    return out
