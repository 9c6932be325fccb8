"""Territory data packages: one folder of plain files per territory, loaded without per-dataset code.

A package (format: ``docs/data-format.md``; example: ``tests/data/territory_example/``) holds

* ``territory.yaml``: name, sampling interval, IANA time zone, channels with units and valid
  ranges, missing-value markers, the duplicate-timestamp rule, the graph, optional covariates,
  provenance and licence (schema: :class:`TerritorySpec`, unknown keys refused);
* observations: CSV or Parquet, long (``timestamp``, ``sensor_id``, one column per channel) or
  wide (``timestamp`` plus one column per sensor, one channel);
* ``sensors.csv``: ``sensor_id`` (text, kept exactly as written), ``latitude``/``longitude`` in
  degrees or projected ``x``/``y`` with an EPSG code (converted with pyproj);
* optional ``edges.csv`` (``source``, ``target``, ``weight``), else a graph built from the
  coordinates (k nearest neighbours or a thresholded Gaussian kernel on geodesic distances).

:func:`load_package` turns it into a :class:`~fedldt.data.territory.TerritoryDataset`: time stamps
are localised in the package's time zone and put on a regular UTC grid at the interval; missing
steps and missing, non-finite or out-of-range values get mask 0 (never dropped, never
interpolated), and every such fact is listed in ``dataset.extra["problems"]``.
"""

from __future__ import annotations

import csv
import difflib
import io
import re
import zoneinfo
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedldt.data.charged_ev import distance_graph
from fedldt.data.checks import MAX_LISTED, dataset_problems, history_problems, is_usable, outage_problems, problem
from fedldt.data.ranges import ValidRange
from fedldt.data.territory import TerritoryDataset

#: The manifest's file name inside a package folder.
MANIFEST = "territory.yaml"
#: Largest ``steps x sensors x channels`` a package may expand to (a mistyped date could ask for more).
MAX_CELLS = 200_000_000
DOC = "docs/data-format.md"
#: ``fedldt validate``: a package with a smaller fraction of valid values is not usable (``low_coverage`` error) ...
MIN_COVERAGE = 0.10
#: ... and one below this fraction gets a ``low_coverage`` warning.
LOW_COVERAGE = 0.50


class TerritoryPackageError(ValueError):
    """A territory data package that cannot be loaded; the message names the file, the field and the fix.

    ``messages``: one or more such messages (the observations' independent faults come together, one
    line each); ``str()`` joins them with newlines."""

    def __init__(self, message: str | list[str]):
        self.messages = [message] if isinstance(message, str) else list(message)
        super().__init__("\n".join(self.messages))


def _listing(items: list, limit: int = MAX_LISTED) -> str:
    shown = ", ".join(repr(str(x))[:60] for x in items[:limit])
    return f"{shown} and {len(items) - limit} more" if len(items) > limit else shown


def _rows(index: np.ndarray, limit: int = MAX_LISTED) -> str:
    """Data-row numbers (1 = the first row after the header) of 0-based ``index``, unquoted."""
    rows = [str(int(i) + 1) for i in index]
    return ", ".join(rows[:limit]) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


# ---------------------------------------------------------------------------------- the schema
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ChannelSpec(_Strict):
    """One observed quantity: ``name``, ``unit`` and its valid range (``min``/``max`` inclusive,
    ``null`` = unbounded; ``type`` ``integer`` for counts). Values outside get mask 0."""

    name: str = Field(min_length=1)
    unit: str
    min: float | None = None
    max: float | None = None
    type: Literal["number", "integer"] = "number"
    non_negative: bool = False

    @model_validator(mode="after")
    def _bounds(self) -> "ChannelSpec":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} > max {self.max:g}")
        return self

    def valid_range(self) -> ValidRange:
        low = self.min if not self.non_negative else max(self.min or 0.0, 0.0)
        return ValidRange(low, self.max, self.type)


class NodeLinkSpec(_Strict):
    """Where a node-link JSON file keeps each sensor's fields: node attribute names of the sensor
    id, the series (a list of numbers, ``null`` = missing, one per step from ``observations.start``)
    and the two coordinates (``x``/``y`` in ``sensors.crs``, longitude/latitude for EPSG:4326), and
    the link attribute holding the edge weight."""

    id: str = "id"
    series: str
    x: str
    y: str
    weight: str = "weight"


class ObservationsSpec(_Strict):
    """The observations file and its layout: ``long`` or ``wide`` (``.csv`` or ``.parquet``), or
    ``node_link`` (a networkx node-link JSON graph holding sensors, series and links in one file;
    see :class:`NodeLinkSpec`): then ``start`` (the first step's time stamp) and ``node_link`` are
    required, and ``sensors.file``/``graph.edges`` are not used."""

    file: str = "observations.csv"
    layout: Literal["long", "wide", "node_link"] = "long"
    timestamp_column: str = "timestamp"
    sensor_column: str = "sensor_id"
    start: str | None = None
    node_link: NodeLinkSpec | None = None

    @model_validator(mode="after")
    def _node_link_fields(self) -> "ObservationsSpec":
        if self.layout == "node_link":
            missing = [k for k in ("start", "node_link") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"layout 'node_link' needs {missing} (the first step's time stamp, the node attribute "
                                 "names)")
            try:
                pd.Timestamp(self.start)
            except (ValueError, TypeError):
                raise ValueError(f"start {self.start!r} is not a time stamp; write it like 2020-10-01 00:00") from None
        else:
            extra = sorted({"start", "node_link"} & self.model_fields_set)
            if extra:
                raise ValueError(f"{extra} only apply to layout 'node_link'; remove them or set layout: node_link")
        return self


class SensorsSpec(_Strict):
    """The sensors file: ``sensor_id`` plus ``latitude``/``longitude`` (``crs: EPSG:4326``, the
    default) or projected ``x``/``y`` in the given ``crs`` (e.g. ``EPSG:32721``)."""

    file: str = "sensors.csv"
    crs: str = "EPSG:4326"

    @field_validator("crs")
    @classmethod
    def _crs(cls, v: str) -> str:
        if not re.fullmatch(r"EPSG:[0-9]{4,6}", v):
            raise ValueError(f"{v!r} is not an EPSG code; write it like EPSG:4326 or EPSG:32721")
        return v


class GraphSpec(_Strict):
    """The sensor graph: ``edges`` (a CSV file of ``source,target,weight``) or, when absent, a graph
    built from the coordinates by ``method`` (``knn``: ``k`` nearest sensors, made symmetric;
    ``gaussian``: ``exp(-(d/sigma_km)^2) >= threshold``), see :func:`fedldt.data.distance_graph`.
    ``weight_kind``: ``similarity`` (default; larger = stronger link) or ``distance`` (km, turned into
    ``exp(-(d/sigma_km)^2)``, edges below ``threshold`` left out; ``distance_unit: m`` for metres).
    ``edges`` with ``method``/``k`` is
    refused (one of them would be ignored)."""

    edges: str | None = None
    directed: bool = False
    method: Literal["knn", "gaussian"] = "knn"
    k: int = Field(default=8, ge=1)
    sigma_km: float | None = Field(default=None, gt=0)
    threshold: float = Field(default=0.1, gt=0, le=1)
    weight_kind: Literal["similarity", "distance"] = "similarity"
    distance_unit: Literal["km", "m"] = "km"

    @model_validator(mode="after")
    def _one_source(self) -> "GraphSpec":
        both = sorted({"method", "k"} & self.model_fields_set) if self.edges is not None else []
        if both:
            raise ValueError(f"edges is set, so {both} would be ignored: give edges, or {both} (a graph built "
                             "from the coordinates), not both")
        return self


class CovariatesSpec(_Strict):
    """Territory-level series (e.g. weather): a CSV or Parquet file with the timestamp column and
    the named ``columns``; it must give a finite value for every step of the grid."""

    file: str
    columns: list[str] = Field(min_length=1)
    timestamp_column: str = "timestamp"


def _positive_duration(v: str, example: str, most: str | None = None) -> str:
    """``v`` if it is a positive duration (at most ``most``), else a ValueError with an example."""
    try:
        td = pd.Timedelta(v)
    except (ValueError, TypeError):
        raise ValueError(f"{v!r} is not a duration; write it like {example}") from None
    if td <= pd.Timedelta(0) or (most is not None and td > pd.Timedelta(most)):
        raise ValueError(f"{v!r} must be a positive duration" + (f" of at most {pd.Timedelta(most).days} days" if most else ""))
    return v


class OutagesSpec(_Strict):
    """Suspected outages: runs of one repeated value (zeros included) longer than
    ``max_constant`` (a duration such as ``6h``) are reported; ``mask: true`` also masks them."""

    max_constant: str
    mask: bool = False

    @field_validator("max_constant")
    @classmethod
    def _duration(cls, v: str) -> str:
        return _positive_duration(v, "6h or 2D")


class TerritorySpec(_Strict):
    """``territory.yaml`` (see ``docs/data-format.md``)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    interval: str
    timezone: str
    channels: list[ChannelSpec] = Field(min_length=1)
    observations: ObservationsSpec = ObservationsSpec()
    sensors: SensorsSpec = SensorsSpec()
    graph: GraphSpec = GraphSpec()
    missing_values: list[float | str] = []
    duplicates: Literal["mean", "first", "error"] = "error"
    covariates: CovariatesSpec | None = None
    outages: OutagesSpec | None = None
    provenance: str = Field(min_length=1)
    licence: str = Field(min_length=1)

    @field_validator("interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        _positive_duration(v, "5min, 15min or 1h", most="7D")
        return v

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{v!r} is not an IANA time zone; write it like Europe/Madrid or UTC") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "TerritorySpec":
        names = [c.name for c in self.channels]
        if len(set(names)) != len(names):
            raise ValueError(f"channels: names {names} repeat; give each channel its own name")
        if self.observations.layout in ("wide", "node_link") and len(self.channels) != 1:
            raise ValueError(f"observations.layout {self.observations.layout!r} holds one channel; declare exactly one "
                             "channel, or use 'long'")
        g = self.graph
        if self.observations.layout != "node_link" and g.edges is None and {"weight_kind", "distance_unit"} & g.model_fields_set:
            raise ValueError("graph.weight_kind and graph.distance_unit describe the weights of an edges file: set "
                             "graph.edges, or remove them")
        if g.weight_kind != "distance" and "distance_unit" in g.model_fields_set:
            raise ValueError("graph.distance_unit applies to weight_kind: distance only; remove it")
        ignored = sorted({"method", "k"} & g.model_fields_set)
        if self.observations.layout == "node_link" and ignored:
            raise ValueError(f"observations.layout 'node_link' holds the links, so graph {ignored} would be ignored; "
                             "remove them")
        if self.observations.layout == "node_link":
            both = sorted(k for k, block in (("sensors.file", self.sensors), ("graph.edges", self.graph))
                          if k.split(".")[1] in block.model_fields_set)
            if both:
                raise ValueError(f"observations.layout 'node_link' holds the sensors and the links, so {both} would be "
                                 "ignored; remove them")
        return self

    @property
    def step(self) -> pd.Timedelta:
        return pd.Timedelta(self.interval)


def _pydantic_message(path: Path, err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:MAX_LISTED]:
        field = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(e["loc"][-1]), list(TerritorySpec.model_fields), n=1) \
                if len(e["loc"]) == 1 else []
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            parts.append(f"field '{field}': unknown key{hint}; fix: remove it or correct its spelling ({DOC} lists the keys)")
        elif e["type"] == "string_pattern_mismatch" and field == "name":
            parts.append("field 'name': letters, digits, '_', '.' and '-' only (no spaces), at most 64 characters; fix: "
                         "e.g. pedalme_london")
        elif e["type"] == "missing":
            parts.append(f"field '{field}': required; fix: add it ({DOC})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            parts.append(f"field '{field}': {msg}; fix: correct it ({DOC})")
    return f"{path}: " + "; ".join(parts)


def _yaml_message(path: Path, e: yaml.YAMLError) -> str:
    """A YAML error with its line and column (1-based) and a fix."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = str(getattr(e, "problem", None) or e).splitlines()[0][:200]
    if isinstance(e, yaml.constructor.ConstructorError):
        return f"{path}: {where}YAML tags (!!...) are not allowed ({what}); fix: remove the tag, write plain values"
    hint = " (tabs are not allowed in YAML indentation: use spaces)" if "\\t" in what or "\t" in what else ""
    return f"{path}: {where}not valid YAML: {what}{hint}; fix: correct the syntax at that place"


def read_spec(root: str | Path) -> TerritorySpec:
    """Read and check ``territory.yaml`` of the package folder ``root`` (``yaml.safe_load``).

    Raises:
        TerritoryPackageError: the file is missing, not YAML, or breaks the schema (each faulty field is
            named with its fix).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise TerritoryPackageError(f"{path}: not found; fix: a territory data package is a folder holding {MANIFEST} ({DOC})")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise TerritoryPackageError(f"{path}: not UTF-8 (byte {e.start}); fix: save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise TerritoryPackageError(_yaml_message(path, e)) from None
    if not isinstance(raw, dict):
        raise TerritoryPackageError(f"{path}: expected a mapping of keys (name, interval, timezone, ...); fix: see {DOC}")
    try:
        return TerritorySpec.model_validate(raw)
    except ValidationError as e:
        raise TerritoryPackageError(_pydantic_message(path, e)) from None


def _member(root: Path, name: str, field: str) -> Path:
    """The file ``name`` inside the package folder (no absolute path, no way out of the folder)."""
    p = Path(name)
    where = f"{root / MANIFEST}: field '{field}'"
    if p.is_absolute() or ".." in p.parts or not name.strip():
        raise TerritoryPackageError(f"{where}: {name!r} must be a file name inside the package folder; fix: move the file into {root}")
    f = root / p
    if not f.is_file():
        raise TerritoryPackageError(f"{where}: file {f} not found; fix: add it or correct the name")
    return f


def _read_table(path: Path, text_columns: tuple[str, ...]) -> pd.DataFrame:
    """A CSV (every cell as text, nothing read as NaN) or Parquet file; ``text_columns`` must be text."""
    if path.suffix.lower() == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises many kinds
            raise TerritoryPackageError(f"{path}: not a readable Parquet file ({str(e)[:200]})") from None
        for c in text_columns:
            if c in df.columns and not (pd.api.types.is_string_dtype(df[c]) or pd.api.types.is_datetime64_any_dtype(df[c])):
                raise TerritoryPackageError(f"{path}: column '{c}' is {df[c].dtype}, not text; fix: store it as a string column "
                                   "(ids such as 0717804 lose their leading zeros as numbers)")
        return df
    if path.suffix.lower() != ".csv":
        raise TerritoryPackageError(f"{path}: unknown file type; fix: use .csv or .parquet")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise TerritoryPackageError(f"{path}: not UTF-8 (line {line} of the file holds byte 0x{data[e.start]:02x}, e.g. an "
                                    "accented letter in another encoding); fix: save the file as UTF-8 (in a spreadsheet: "
                                    "'CSV UTF-8')") from None
    header = text.split("\n", 1)[0]
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        if sep in header and "," not in header:
            raise TerritoryPackageError(f"{path}: the header is separated by {name}, not commas; fix: save it as a "
                                        "comma-separated CSV with '.' as the decimal point (e.g. 12.5, not 12,5)")
    try:
        names = next(csv.reader([header]), [])
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as e:
        raise TerritoryPackageError(f"{path}: not a readable CSV file ({str(e).splitlines()[0][:200]}); fix: comma-separated, "
                                    "one header row, the same number of cells in every row, '.' as the decimal point") from None
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise TerritoryPackageError(f"{path}: column(s) {_listing(twice)} appear more than once in the header; fix: keep one "
                                    "column per name (in the wide layout, one column per sensor)")
    return df


def _id_key(x: str) -> str:
    """An id with surrounding spaces and leading zeros removed: two ids with the same key differ only
    by what a spreadsheet or a careless export adds or drops."""
    return x.strip().lstrip("0") or ("0" if x.strip() else "")


def _unknown_ids(unknown: list[str], ids: np.ndarray) -> str:
    """``unknown`` ids listed, each with a ``did you mean`` hint when a listed id differs from it only by
    spaces around it or leading zeros."""
    near: dict[str, str] = {}
    for i in ids:
        near.setdefault(_id_key(str(i)), str(i))
    out = [f"{x!r} (did you mean {near[_id_key(x)]!r}?)" if _id_key(x) in near else repr(x) for x in unknown[:MAX_LISTED]]
    more = f" and {len(unknown) - MAX_LISTED} more" if len(unknown) > MAX_LISTED else ""
    return ", ".join(out) + more


def _require(df: pd.DataFrame, columns: list[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TerritoryPackageError(f"{path}: column(s) {missing} missing (has {_listing(list(df.columns))}); fix: add them "
                           f"or name the right columns in {MANIFEST}")


def _numbers(col: pd.Series, markers: list, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Float64 values and a boolean "missing" array: empty cells, text markers and numeric markers
    are missing; any other text that is not a number is refused."""
    text_markers = {str(m) for m in markers if isinstance(m, str)}
    num_markers = np.array([float(m) for m in markers if not isinstance(m, str)], dtype=np.float64)
    if pd.api.types.is_numeric_dtype(col):
        v = col.to_numpy(dtype=np.float64)
        missing = np.isnan(v)
    else:
        s = col.astype(str).str.strip()
        missing = (s == "").to_numpy() | s.isin(text_markers).to_numpy()
        v = pd.to_numeric(s.where(~missing, None), errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(v) & ~missing & ~s.str.lower().isin({"nan", "na"}).to_numpy()
        if bad.any():
            rows = np.flatnonzero(bad)
            raise TerritoryPackageError(f"{where}: {int(bad.sum())} cell(s) are not numbers, e.g. {_listing(s.iloc[rows].tolist())} "
                               f"(data rows {_rows(rows)}); fix: write numbers, leave the cell empty, or "
                               "declare the text in missing_values")
        missing = missing | np.isnan(v)
    if num_markers.size:
        missing = missing | np.isin(v, num_markers)
    return v, missing


def _utc_times(raw: pd.Series, tz: str, groups: pd.Series | None, where: str) -> pd.DatetimeIndex:
    """Row timestamps in UTC.

    Stamps with a UTC offset (``Z``, ``+01:00``, mixed offsets allowed) are converted to UTC; naive
    stamps are local times of ``tz``. A local time that occurs twice (the autumn hour) is resolved
    by order: its first occurrence (per sensor, in file order) is daylight time, the next standard
    time. A local time that does not exist (the spring gap) is refused.
    """
    from fedldt.delivery.observations import parse_timestamps  # lazy: fedldt.delivery imports fedldt.data

    if pd.api.types.is_datetime64_any_dtype(raw):
        times = pd.DatetimeIndex(raw)
    else:
        text = raw.astype(str).str.strip()
        codes, uniq = pd.factorize(text)
        try:
            parsed = parse_timestamps(list(uniq), where)
        except ValueError as e:
            raise TerritoryPackageError(f"{e}; fix: ISO 8601 stamps, all with a UTC offset or all local times ({DOC})") from None
        times = pd.DatetimeIndex(parsed[codes])
    times = times.as_unit("ns")
    if times.tz is not None:
        return times.tz_convert("UTC")
    key = pd.DataFrame({"t": times.asi8})
    if groups is not None:
        key["g"] = groups.to_numpy()
    first = key.groupby(list(key.columns), sort=False).cumcount().to_numpy() == 0
    local = times.tz_localize(tz, ambiguous=first, nonexistent="NaT")
    gap = np.asarray(local.isna())
    if gap.any():
        rows = np.flatnonzero(gap)
        who = f" of sensor {str(groups.iloc[rows[0]])!r}" if groups is not None else ""
        raise TerritoryPackageError(f"{where}: local time {str(raw.iloc[rows[0]]).strip()!r}{who} (data row {rows[0] + 1}; "
                                    f"{len(rows)} such row(s)) does not exist in {tz}: the clock skips that hour when summer "
                                    "time starts; fix: correct the stamp (e.g. an hour later), or write every stamp with its "
                                    "UTC offset")
    return local.tz_convert("UTC").as_unit("ns")


# ---------------------------------------------------------------------------------- the loader
def _read_sensors(root: Path, spec: TerritorySpec, problems: list,
                  table: tuple[pd.DataFrame, Path] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Sensor ids (text) and ``[node, 2]`` (latitude, longitude) from ``sensors.file`` (or ``table``:
    the sensors of a node-link file, with its path)."""
    df, path = table if table is not None else (None, _member(root, spec.sensors.file, "sensors.file"))
    if df is None:
        df = _read_table(path, ("sensor_id",))
    geo = spec.sensors.crs == "EPSG:4326"
    xy = ["longitude", "latitude"] if geo else ["x", "y"]
    _require(df, ["sensor_id", *xy], path)
    ids = df["sensor_id"].astype(str).to_numpy()
    empty = [i + 1 for i, s in enumerate(ids) if s.strip() == ""]
    if empty:
        raise TerritoryPackageError(f"{path}: column 'sensor_id' is empty in data row(s) {_rows(np.array(empty) - 1)}; fix: give every sensor an id")
    spaced = [i + 1 for i, s in enumerate(ids) if s != s.strip()]
    if spaced:
        raise TerritoryPackageError(f"{path}: column 'sensor_id' has spaces around the id in data row(s) {_rows(np.array(spaced) - 1)}, "
                                    f"e.g. {ids[spaced[0] - 1]!r}; fix: remove the spaces")
    dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique().tolist()
    if dup:
        raise TerritoryPackageError(f"{path}: column 'sensor_id' repeats {_listing(dup)}; fix: list each sensor once")
    a, a_missing = _numbers(df[xy[0]], [], f"{path}: column '{xy[0]}'")
    b, b_missing = _numbers(df[xy[1]], [], f"{path}: column '{xy[1]}'")
    missing = a_missing | b_missing
    if missing.any():
        problem(problems, "no_coordinates", "warning", f"{int(missing.sum())} sensor(s) of {path.name} have no coordinates",
                 sensors=ids[missing])
        return ids, None
    if not geo:
        from pyproj import Transformer
        from pyproj.exceptions import CRSError

        try:
            tr = Transformer.from_crs(spec.sensors.crs, "EPSG:4326", always_xy=True)
        except CRSError:
            raise TerritoryPackageError(f"{root / MANIFEST}: field 'sensors.crs': {spec.sensors.crs} is unknown to pyproj; "
                               "fix: give the EPSG code of the projected x/y") from None
        a, b = tr.transform(a, b)
    lon, lat = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    bad = ~np.isfinite(lat) | ~np.isfinite(lon) | (np.abs(lat) > 90) | (np.abs(lon) > 180)
    if bad.any():
        raise TerritoryPackageError(f"{path}: sensor(s) {_listing(ids[bad].tolist())} have coordinates outside the globe "
                           f"(latitude -90..90, longitude -180..180 after {spec.sensors.crs}); fix: correct them or sensors.crs")
    return ids, np.stack([lat, lon], axis=1)


def distances_km(coords: np.ndarray) -> np.ndarray:
    """``[node, node]`` float64 geodesic distances in km on the WGS84 ellipsoid (pyproj ``Geod``)
    between ``coords`` ``[node, 2]`` (latitude, longitude in degrees)."""
    from pyproj import Geod

    n = coords.shape[0]
    i, j = np.triu_indices(n, k=1)
    _, _, d = Geod(ellps="WGS84").inv(coords[i, 1], coords[i, 0], coords[j, 1], coords[j, 0])
    out = np.zeros((n, n), dtype=np.float64)
    out[i, j] = out[j, i] = np.asarray(d) / 1000.0
    return out


def _graph(root: Path, spec: TerritorySpec, ids: np.ndarray, coords: np.ndarray | None,
           problems: list, table: tuple[pd.DataFrame, Path] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``edge_index``/``edge_weight`` from ``graph.edges`` (or ``table``: the links of a node-link
    file, with its path), else built from the coordinates."""
    g = spec.graph
    n = len(ids)
    if g.edges is None and table is None:
        if coords is None:
            raise TerritoryPackageError(f"{root / MANIFEST}: field 'graph.edges' is not set and some sensors lack coordinates; "
                               f"fix: give every sensor coordinates in {spec.sensors.file}, or an edges file")
        return distance_graph(distances_km(coords), method=g.method, sigma_km=g.sigma_km, threshold=g.threshold, k=g.k)
    df, path = table if table is not None else (None, _member(root, g.edges, "graph.edges"))
    if df is None:
        df = _read_table(path, ("source", "target"))
    _require(df, ["source", "target"], path)
    src, dst = df["source"].astype(str).to_numpy(), df["target"].astype(str).to_numpy()
    distance = g.weight_kind == "distance"
    if distance and "weight" not in df.columns:
        raise TerritoryPackageError(f"{path}: column 'weight' missing, but weight_kind is distance; fix: add the distances "
                                    "(km) or remove weight_kind")
    if "weight" in df.columns:
        w, w_missing = _numbers(df["weight"], [], f"{path}: column 'weight'")
        bad = w_missing | ~np.isfinite(w) | ((w < 0) if distance else (w <= 0))
        if bad.any():
            kind = "a distance >= 0 (km)" if distance else "a positive number"
            raise TerritoryPackageError(f"{path}: column 'weight' must be {kind}; data row(s) "
                                        f"{_rows(np.flatnonzero(bad))} are not; fix: correct them or drop "
                                        "those edges")
    else:
        w = np.ones(len(df), dtype=np.float64)
    if distance:  # DCRNN's thresholded Gaussian kernel, as for a graph built from coordinates
        w = w / 1000.0 if g.distance_unit == "m" else w
        off = src != dst
        sigma = g.sigma_km or (float(w[off].std()) if off.sum() > 1 else 0.0) or 1.0
        w = np.where(off, np.exp(-((w / sigma) ** 2)), 1.0)
        keep = ~off | (w >= g.threshold)
        src, dst, w = src[keep], dst[keep], w[keep]
    elif (w > 1).any():
        problem(problems, "weights_above_one", "warning",
                f"{int((w > 1).sum())} of {len(w)} edge weight(s) of {path.name} exceed 1, the weight of every "
                "self-loop: weights are similarities (larger = stronger link); if these are distances, set "
                "graph.weight_kind: distance (km)")
    index = pd.Index(ids)
    s_i, d_i = index.get_indexer(src), index.get_indexer(dst)
    unknown = (s_i < 0) | (d_i < 0)
    if unknown.any():
        names = sorted({x for x, k in zip(src, s_i) if k < 0} | {x for x, k in zip(dst, d_i) if k < 0})
        raise TerritoryPackageError(f"{path}: {int(unknown.sum())} of {len(df)} edge(s) name sensor(s) not in "
                                    f"{spec.sensors.file}: {_unknown_ids(names, ids)} (data row(s) "
                                    f"{_rows(np.flatnonzero(unknown))}); fix: write the ids exactly as in "
                                    f"{spec.sensors.file} (as text, leading zeros kept), or remove those edges")
    pairs = pd.Series(s_i * max(n, 1) + d_i)
    if pairs.duplicated().any():
        raise TerritoryPackageError(f"{path}: edge(s) listed twice, e.g. {ids[s_i[pairs.duplicated().to_numpy()][0]]!r} -> "
                           f"{ids[d_i[pairs.duplicated().to_numpy()][0]]!r}; fix: list each edge once")
    ei = torch.as_tensor(np.stack([s_i, d_i]).astype(np.int64))
    ew = torch.as_tensor(w.astype(np.float32))
    if not g.directed:
        from torch_geometric.utils import to_undirected

        ei, ew = to_undirected(ei, ew, num_nodes=n, reduce="mean")
    return ei, ew


#: Largest node-link JSON file read (bytes): it is read into memory whole.
MAX_NODE_LINK_BYTES = 2 * 1024**3


def _finite_number(x: Any) -> bool:
    """A JSON number (not a boolean) that is a finite float64 (``1e999`` and ``10**400`` are not)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return bool(np.isfinite(float(x)))
    except OverflowError:
        return False


def _node_link_tables(root: Path, spec: TerritorySpec) -> tuple[dict[str, pd.DataFrame], Path]:
    """The three tables of a networkx node-link JSON file (``observations.layout: node_link``).

    Parsed with :func:`networkx.node_link_graph` (the format of ``networkx.node_link_data``; links
    under ``links`` or ``edges``). Node ids become text (``str``); each node's series (attribute
    ``node_link.series``) is one value per step from ``observations.start`` at ``interval``.

    Returns:
        ``{"sensors": sensor_id + x/y (or longitude/latitude), "observations": time (UTC) + sensor
        + the channel, "edges": source/target (+ weight)}`` and the file's path.

    Raises:
        TerritoryPackageError: not JSON, not a node-link graph, a node without the series or with a
            series of another length or with a value that is not a number, two nodes with one id.
    """
    import json

    import networkx as nx

    o, nl = spec.observations, spec.observations.node_link
    path = _member(root, o.file, "observations.file")
    if path.stat().st_size > MAX_NODE_LINK_BYTES:
        raise TerritoryPackageError(f"{path}: larger than {MAX_NODE_LINK_BYTES} bytes; fix: split the network, or use "
                                    "the long layout in Parquet")
    def constant(name: str) -> float:  # NaN, Infinity: not JSON (RFC 8259), Python's json reads them
        raise ValueError(f"{name} is not a JSON number")

    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"), parse_constant=constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep
        raise TerritoryPackageError(f"{path}: not a UTF-8 JSON file ({str(e)[:200]}); fix: write networkx "
                                    "node_link_data as JSON (null where a value is missing)") from None
    links = "links" if isinstance(data, dict) and "links" in data else "edges"
    shape = f"fix: a JSON object with 'nodes' (each with '{nl.id}') and '{links}' (each with 'source' and 'target')"
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list) or not isinstance(data.get(links, []), list):
        raise TerritoryPackageError(f"{path}: not a networkx node-link graph (no list 'nodes' or '{links}'); {shape}")
    plain = (str, int)
    for i, v in enumerate(nodes):
        if not isinstance(v, dict) or not isinstance(v.get(nl.id), plain) or isinstance(v.get(nl.id), bool):
            raise TerritoryPackageError(f"{path}: node {i + 1} of 'nodes' has no text or integer '{nl.id}'; {shape} (or name "
                                        f"the id attribute in {root / MANIFEST} field 'observations.node_link.id')")
    listed = [str(v[nl.id]) for v in nodes]
    known = set(listed)
    if len(known) != len(listed):  # networkx would merge them silently, the last one's series kept
        twice = sorted({i for i in listed if listed.count(i) > 1})
        raise TerritoryPackageError(f"{path}: node ids {_listing(twice)} are listed more than once (as text); fix: give "
                                    "each node its own id")
    pairs: set[tuple[str, str]] = set()
    for i, e in enumerate(data.get(links, [])):
        ends = [e.get(k) if isinstance(e, dict) else None for k in ("source", "target")]
        if not all(isinstance(x, plain) and not isinstance(x, bool) and str(x) in known for x in ends):
            raise TerritoryPackageError(f"{path}: link {i + 1} of '{links}' does not join two listed nodes (source "
                                        f"{str(ends[0])[:40]!r}, target {str(ends[1])[:40]!r}); {shape}")
        pair = (str(ends[0]), str(ends[1]))
        if pair in pairs:  # networkx would keep the last one's weight silently
            raise TerritoryPackageError(f"{path}: link {i + 1} of '{links}' joins {pair[0][:40]!r} to {pair[1][:40]!r} "
                                        "again; fix: one link per (source, target) pair")
        pairs.add(pair)
    try:
        graph = nx.node_link_graph(data, directed=True, multigraph=False, edges=links, name=nl.id)
    except Exception as e:  # networkx raises KeyError/TypeError/NetworkXError on a malformed document
        raise TerritoryPackageError(f"{path}: not a networkx node-link graph ({type(e).__name__}: {str(e)[:200]}); fix: "
                                    f"a JSON object with 'nodes' (each with '{nl.id}') and 'links' (each with 'source' "
                                    "and 'target')") from None
    if graph.is_multigraph():
        raise TerritoryPackageError(f"{path}: a multigraph (two links may join the same sensors); fix: one link per pair")
    ids = [str(v) for v in graph.nodes]  # distinct: checked on the listed nodes above
    if not ids:
        raise TerritoryPackageError(f"{path}: no nodes; fix: add the sensors")
    where = f"{root / MANIFEST}: field 'observations.node_link"
    series, length = [], None
    for v, attrs in graph.nodes(data=True):
        y = attrs.get(nl.series)
        if not isinstance(y, list):
            raise TerritoryPackageError(f"{path}: node {str(v)!r} has no list '{nl.series}'; fix: give every node its series, "
                                        f"or name the attribute in {where}.series'")
        if length is None:
            length = len(y)
        if len(y) != length:
            raise TerritoryPackageError(f"{path}: node {str(v)!r} has {len(y)} values in '{nl.series}', the first node "
                                        f"{length}; fix: one value per step for every node (null where missing)")
        bad = [x for x in y if x is not None and not _finite_number(x)]
        if bad:
            raise TerritoryPackageError(f"{path}: node {str(v)!r}: '{nl.series}' holds {len(bad)} value(s) that are not "
                                        f"numbers, e.g. {_listing([str(b)[:40] for b in bad])}; fix: finite numbers, or "
                                        "null where missing")
        series.append(np.array([np.nan if x is None else float(x) for x in y], dtype=np.float64))
    if not length:
        raise TerritoryPackageError(f"{path}: the series '{nl.series}' are empty; fix: add the observations")
    geo = spec.sensors.crs == "EPSG:4326"
    xy = ["longitude", "latitude"] if geo else ["x", "y"]
    coords = {c: [attrs.get(a) for _, attrs in graph.nodes(data=True)] for c, a in zip(xy, (nl.x, nl.y))}
    for c, a in zip(xy, (nl.x, nl.y)):
        if any(x is not None and not _finite_number(x) for x in coords[c]):
            raise TerritoryPackageError(f"{path}: node attribute '{a}' holds values that are not numbers; fix: numbers "
                                        f"(in {spec.sensors.crs}), or name the right attribute in {where}.{'x' if c in ('x', 'longitude') else 'y'}'")
    sensors = pd.DataFrame({"sensor_id": ids, **{c: pd.array(v, dtype="Float64").astype("float64") for c, v in coords.items()}})
    start = pd.Timestamp(o.start)
    calendar = _calendar(spec)
    if start.tzinfo is not None:  # an offset given: the grid's first step in UTC (or local wall clock)
        start = start.tz_convert(spec.timezone).tz_localize(None) if calendar else start.tz_convert("UTC").tz_localize(None)
    elif not calendar:
        try:
            local = pd.DatetimeIndex([start]).tz_localize(spec.timezone, ambiguous=True, nonexistent="raise")
        except ValueError:  # pandas/pytz NonExistentTimeError: the clock jumps over it
            raise TerritoryPackageError(f"{root / MANIFEST}: field 'observations.start' {o.start!r} does not exist in "
                                        f"{spec.timezone} (the clock jumps over it); fix: the first step as a time that "
                                        "exists, or with its UTC offset") from None
        start = local.tz_convert("UTC").tz_localize(None)[0]
    try:
        grid = _grid(int(start.as_unit("ns").value), length, spec, calendar)
    except (OverflowError, pd.errors.OutOfBoundsDatetime):
        raise TerritoryPackageError(f"{path}: {length} steps of {spec.interval} from {o.start} run past the year 2262 "
                                    f"(pandas' time range); fix: fewer values per series, or check '{nl.series}'") from None
    channel = spec.channels[0].name
    observations = pd.DataFrame({"time": pd.DatetimeIndex(np.tile(grid.asi8, len(ids))).tz_localize("UTC"),
                                 "sensor": np.repeat(np.array(ids, dtype=object), length), channel: np.concatenate(series)})
    rows = [(str(a), str(b), d.get(nl.weight)) for a, b, d in graph.edges(data=True)]
    edges = pd.DataFrame(rows, columns=["source", "target", "weight"])
    if edges["weight"].isna().all():
        edges = edges.drop(columns="weight")
    else:
        edges["weight"] = pd.to_numeric(edges["weight"], errors="coerce")
    return {"sensors": sensors, "observations": observations, "edges": edges}, path


def _long_table(root: Path, spec: TerritorySpec) -> tuple[pd.DataFrame, Path]:
    """Observations as a long table: ``time`` (raw), ``sensor`` (text), one column per channel (raw)."""
    o = spec.observations
    path = _member(root, o.file, "observations.file")
    df = _read_table(path, (o.timestamp_column, o.sensor_column))
    if o.layout == "long":
        channels = [c.name for c in spec.channels]
        _require(df, [o.timestamp_column, o.sensor_column, *channels], path)
        out = pd.DataFrame({"time": df[o.timestamp_column], "sensor": df[o.sensor_column].astype(str)})
        for c in channels:
            out[c] = df[c]
        return out, path
    _require(df, [o.timestamp_column], path)
    sensors = [c for c in df.columns if c != o.timestamp_column]
    if not sensors:
        raise TerritoryPackageError(f"{path}: no sensor columns besides '{o.timestamp_column}'; fix: one column per sensor id")
    channel = spec.channels[0].name
    long = df.melt(id_vars=[o.timestamp_column], value_vars=sensors, var_name="sensor", value_name=channel,
                   ignore_index=True)
    return pd.DataFrame({"time": long[o.timestamp_column], "sensor": long["sensor"].astype(str), channel: long[channel]}), path


DAY = pd.Timedelta("1D")


def _calendar(spec: TerritorySpec) -> bool:
    """Whether the grid follows the local calendar: ``interval`` a whole number of days."""
    return spec.step % DAY == pd.Timedelta(0)


def _grid(t0: int, num_steps: int, spec: TerritorySpec, calendar: bool) -> pd.DatetimeIndex:
    """The grid in UTC: ``num_steps`` steps from ``t0`` (ns; local wall-clock time when ``calendar``,
    else UTC). Calendar steps are local midnights (or the same local time each day): a step across a
    daylight-saving change lasts 23 or 25 hours; a grid time that does not exist locally moves
    forward to the first one that does, one that occurs twice is the first (summer-time) one."""
    if not calendar:
        return pd.date_range(pd.Timestamp(t0, tz="UTC"), periods=num_steps, freq=spec.step)
    local = pd.date_range(pd.Timestamp(t0), periods=num_steps, freq=spec.step)
    return local.tz_localize(spec.timezone, ambiguous=np.ones(num_steps, dtype=bool),
                             nonexistent="shift_forward").tz_convert("UTC")


def _off_grid_message(path: Path, spec: TerritorySpec, raw: pd.Series, off: np.ndarray, t0: int, calendar: bool,
                      times: pd.DatetimeIndex) -> str:
    """Stamps off the grid, quoted as written in the file, with a fix that fits the case."""
    written = pd.unique(raw[off].astype(str).str.strip())
    if calendar:
        grid = (f"the {spec.interval} grid of local calendar days in {spec.timezone} that starts at "
                f"{pd.Timestamp(t0):%Y-%m-%d %H:%M} local time")
        utc = times.asi8
        if ((utc - utc.min()) % spec.step.value == 0).all():
            fix = (f"the stamps are regular in UTC but not in {spec.timezone} local time: if the days are UTC days, "
                   "set timezone: UTC; else write local times (without offset)")
        else:
            fix = "give every stamp the same local time of day (e.g. 00:00), or correct 'interval'"
    else:
        grid = f"the {spec.interval} grid that starts at {pd.Timestamp(t0, tz='UTC').tz_convert(spec.timezone)}"
        fix = "resample to the interval or correct 'interval'"
    return (f"{path}: {int(off.sum())} row(s) with {len(written)} distinct timestamp(s) are off {grid}, e.g. "
            f"{_listing(list(written))}; fix: {fix}")


def spec_from_config(manifest: Any, root: Path) -> TerritorySpec:
    """A package manifest given in a config (``dataset.manifest`` of :func:`load_package`) instead of
    ``territory.yaml``: same schema, errors named ``dataset.manifest``.

    Raises:
        TerritoryPackageError: not a mapping, or breaks the schema.
    """
    where = f"dataset.manifest (data folder {root})"
    if not isinstance(manifest, dict):
        raise TerritoryPackageError(f"{where}: expected a mapping with the keys of {MANIFEST}; fix: see {DOC}")
    try:
        return TerritorySpec.model_validate(manifest)
    except ValidationError as e:
        raise TerritoryPackageError(_pydantic_message(Path(where), e)) from None


def load_package(path: str | Path, manifest: dict[str, Any] | None = None, name: str | None = None) -> TerritoryDataset:
    """Load a territory data package (format: ``docs/data-format.md``).

    ``manifest``: the package's ``territory.yaml`` given as a mapping (a dataset config's
    ``manifest``, e.g. a whole-network pilot such as ``conf/pilot/montevideo_bus_4.yaml``); then
    ``path`` is the folder of the data files and needs no ``territory.yaml``. ``name``: the
    dataset name carried into results (``extra["dataset"]``), default the manifest's name.

    Time: stamps become UTC (see :func:`_utc_times`); the grid runs from the first to the last
    stamp at ``interval``; a stamp off that grid is refused. Every grid step is kept: a step with
    no row is masked (mask 0), never dropped or interpolated. ``dataset.timestamps`` is tz-aware in
    the package's time zone, so time of day and day of week are local wall-clock time.

    Values: empty cells, ``missing_values`` markers, NaN/inf and values outside the channel's
    valid range get mask 0 (counted in ``extra["problems"]``). Rows repeating a (time, sensor)
    pair follow ``duplicates``: ``mean`` of their valid values, ``first`` valid value in file
    order, or ``error``.

    Sensors: the node set and its order are those of ``sensors.csv``. Observations of a sensor not
    listed there are refused; a listed sensor without observations is kept with mask 0 and
    reported; edges naming unlisted sensors are left out and reported; every node ends with one
    self-loop (:func:`fedldt.data.graph.complete_self_loops`).

    The data-quality checks of :func:`fedldt.data.checks.dataset_problems` (all-zero and constant
    sensors, ...) are run too, so ``extra["problems"]`` is what ``fedldt validate`` reports.

    Returns:
        A :class:`TerritoryDataset`: values/mask ``[time, node, channel]`` float32, node_ids as
        written, coords ``[node, 2]`` (latitude, longitude) or ``None``, ``extra`` with
        ``problems`` (list of ``{code, severity, message, sensors, timestamps}``), ``timezone``,
        ``interval``, ``provenance``, ``licence``, ``valid_range`` and optional ``covariates``
        ``[time, k]`` float32 with ``covariate_names``.

    Raises:
        TerritoryPackageError: (a ``ValueError``) naming the file, the field and the fix.
    """
    root = Path(path)
    if not root.is_dir():
        raise TerritoryPackageError(f"{root}: not a folder; fix: give the folder of a territory data package ({DOC})")
    spec = read_spec(root) if manifest is None else spec_from_config(manifest, root)
    problems: list[dict[str, Any]] = []
    node_link, edges_table = None, None
    if spec.observations.layout == "node_link":
        node_link, obs_path = _node_link_tables(root, spec)
        edges_table = (node_link["edges"], obs_path)
    ids, coords = _read_sensors(root, spec, problems, (node_link["sensors"], obs_path) if node_link else None)
    table, obs_path = (node_link["observations"], obs_path) if node_link else _long_table(root, spec)
    if table.empty:
        raise TerritoryPackageError(f"{obs_path}: no observations; fix: add rows")
    times = _utc_times(table["time"], spec.timezone, table["sensor"],
                       f"{obs_path}: column '{spec.observations.timestamp_column}'")
    node = pd.Index(ids).get_indexer(table["sensor"])
    # the observations' faults are collected, so that one run reports them all (a fault of the
    # time grid stops the checks that need the grid: duplicates)
    errors: list[str] = []
    unknown = sorted(set(table["sensor"][node < 0]))
    if unknown:
        errors.append(f"{obs_path}: sensor(s) {_unknown_ids(unknown, ids)} are not in {spec.sensors.file}; fix: "
                      "write the ids exactly as there (as text, leading zeros kept), add the sensors (with "
                      "coordinates) to it, or remove their rows")
    step_ns = spec.step.value
    # intervals of whole days follow the local calendar (local midnight each day or week, a 23- or
    # 25-hour day across a daylight-saving change); shorter intervals are exact durations in UTC
    calendar = _calendar(spec)
    axis = times.tz_convert(spec.timezone).tz_localize(None) if calendar else times
    t_ns = axis.asi8
    t0, t1 = int(t_ns.min()), int(t_ns.max())
    off = (t_ns - t0) % step_ns != 0
    if off.any():
        raise TerritoryPackageError(errors + [_off_grid_message(obs_path, spec, table["time"], off, t0, calendar, times)])
    num_steps = (t1 - t0) // step_ns + 1
    if num_steps * len(ids) * len(spec.channels) > MAX_CELLS:
        raise TerritoryPackageError(errors + [f"{obs_path}: {num_steps} steps x {len(ids)} sensors is more than {MAX_CELLS} "
                                              "values; fix: check the timestamps for a wrong date, or split the period"])
    step = ((t_ns - t0) // step_ns).astype(np.int64)
    grid = _grid(t0, num_steps, spec, calendar)

    # one (step, node) key per row (rows of unknown sensors: a key of their own); values and missing flags per channel
    key = np.where(node >= 0, step * len(ids) + node, -1 - np.arange(len(table)))
    names = [c.name for c in spec.channels]
    vals = np.zeros((len(table), len(names)), dtype=np.float64)
    valid = np.zeros((len(table), len(names)), dtype=bool)
    for k, ch in enumerate(spec.channels):
        try:
            v, missing = _numbers(table[ch.name], spec.missing_values, f"{obs_path}: column '{ch.name}'")
        except TerritoryPackageError as e:
            errors += e.messages
            continue
        finite = np.isfinite(v) & ~missing
        if (~np.isfinite(v) & ~np.isnan(v)).any():
            problem(problems, "infinite", "warning", f"{int((~np.isfinite(v) & ~np.isnan(v)).sum())} infinite "
                     f"{ch.name} value(s) masked")
        if missing.any():
            problem(problems, "missing_values", "info", f"{int(missing.sum())} {ch.name} cell(s) empty, NaN or a "
                     "missing-value marker: masked", sensors=pd.unique(table["sensor"][missing]))
        bad = finite & ch.valid_range().violations(np.where(finite, v, 0.0))
        if bad.any():
            problem(problems, "out_of_range", "warning", f"{int(bad.sum())} {ch.name} value(s) outside the valid range "
                     f"{ch.valid_range().describe(ch.unit)}: masked", sensors=pd.unique(table["sensor"][bad]),
                     timestamps=times[bad].unique())
        vals[:, k] = np.where(finite & ~bad, v, 0.0)
        valid[:, k] = finite & ~bad

    dup = pd.Series(key).duplicated(keep=False).to_numpy()
    if dup.any():
        n_dup = int(pd.Series(key[dup]).nunique())
        where = dict(sensors=pd.unique(table["sensor"][dup]), timestamps=times[dup].unique())
        if spec.duplicates == "error":
            rows = np.flatnonzero(key == key[dup][0])
            errors.append(f"{obs_path}: {n_dup} (timestamp, sensor) pair(s) occur more than once, e.g. sensor "
                          f"{str(table['sensor'].iloc[rows[0]])!r} at {str(table['time'].iloc[rows[0]]).strip()!r} "
                          f"in data rows {_rows(rows)}; fix: remove them, or set duplicates: mean|first in {MANIFEST}")
    if errors:  # the graph's own faults join them
        try:
            _graph(root, spec, ids, coords, [], edges_table)
        except TerritoryPackageError as e:
            errors += e.messages
        raise TerritoryPackageError(errors)
    if dup.any():
        frame = pd.DataFrame(np.where(valid, vals, np.nan), columns=names)
        frame["key"] = key
        agg = frame.groupby("key", sort=False).agg(spec.duplicates)  # NaN (invalid) ignored; first = file order
        key = agg.index.to_numpy()
        vals = np.nan_to_num(agg[names].to_numpy(dtype=np.float64), nan=0.0)
        valid = agg[names].notna().to_numpy()
        problem(problems, "duplicates", "warning", f"{n_dup} (timestamp, sensor) pair(s) occurred more than once: "
                 f"resolved by '{spec.duplicates}'", **where)

    values = np.zeros((num_steps, len(ids), len(names)), dtype=np.float32)
    mask = np.zeros_like(values)
    s_idx, n_idx = np.divmod(key, len(ids))
    values[s_idx, n_idx] = vals.astype(np.float32)
    mask[s_idx, n_idx] = valid.astype(np.float32)
    if spec.outages is not None:
        found, runs = outage_problems(values, mask, ids, names, pd.Timedelta(spec.interval),
                                      pd.Timedelta(spec.outages.max_constant), spec.outages.mask)
        problems += found
        if spec.outages.mask:
            mask[runs] = 0.0
    present = np.zeros(num_steps, dtype=bool)
    present[s_idx] = True
    if not present.all():
        problem(problems, "gaps", "warning", f"{int((~present).sum())} of {num_steps} step(s) have no row at all: masked",
                 timestamps=grid[~present].tz_convert(spec.timezone))
    no_data = mask.sum(axis=(0, 2)) == 0
    if no_data.any():
        problem(problems, "sensor_without_data", "warning", f"{int(no_data.sum())} sensor(s) of {spec.sensors.file} have "
                 "no valid observation: kept with mask 0", sensors=ids[no_data])

    edge_index, edge_weight = _graph(root, spec, ids, coords, problems, edges_table)
    ei = edge_index.numpy()
    linked = np.zeros(len(ids), dtype=bool)
    linked[ei[0][ei[0] != ei[1]]] = True
    linked[ei[1][ei[0] != ei[1]]] = True
    if len(ids) > 1 and not linked.all():
        problem(problems, "isolated_sensor", "warning", f"{int((~linked).sum())} sensor(s) have no edge to another sensor",
                 sensors=ids[~linked])
    extra: dict[str, Any] = {
        "problems": problems, "timezone": spec.timezone, "interval": spec.interval,
        "provenance": spec.provenance, "licence": spec.licence,
        "valid_range": {c.name: c.valid_range().to_json() for c in spec.channels},
        "min_declared": [c.name for c in spec.channels if "min" in c.model_fields_set or c.non_negative],
    }
    if spec.outages is not None:
        extra["outages"] = spec.outages.model_dump()
    if spec.covariates is not None:
        extra["covariates"], extra["covariate_names"] = _covariates(root, spec, grid)
    ds = TerritoryDataset(
        name=spec.name, values=values, mask=mask, timestamps=grid.tz_convert(spec.timezone), node_ids=ids,
        edge_index=edge_index, edge_weight=edge_weight, coords=coords,
        units=tuple(c.unit for c in spec.channels), channels=tuple(names),
        source=f"territory data package {spec.name} ({spec.provenance}; licence {spec.licence})", extra=extra,
    )
    problems += dataset_problems(ds)
    ds.extra["dataset"] = name or spec.name
    return ds


def _covariates(root: Path, spec: TerritorySpec, grid: pd.DatetimeIndex) -> tuple[np.ndarray, list[str]]:
    c = spec.covariates
    path = _member(root, c.file, "covariates.file")
    df = _read_table(path, (c.timestamp_column,))
    _require(df, [c.timestamp_column, *c.columns], path)
    times = _utc_times(df[c.timestamp_column], spec.timezone, None, f"{path}: column '{c.timestamp_column}'")
    if times.duplicated().any():
        raise TerritoryPackageError(f"{path}: timestamp(s) {_listing(times[times.duplicated()].astype(str).tolist())} repeat; "
                           "fix: one row per step")
    pos = pd.Index(times).get_indexer(grid)
    if (pos < 0).any():
        raise TerritoryPackageError(f"{path}: no row for {int((pos < 0).sum())} step(s) of the observations' grid, e.g. "
                           f"{_listing(grid[pos < 0].astype(str).tolist())}; fix: covariates need a value at every step")
    out = np.zeros((len(grid), len(c.columns)), dtype=np.float64)
    for k, name in enumerate(c.columns):
        v, missing = _numbers(df[name], spec.missing_values, f"{path}: column '{name}'")
        v = v[pos]
        bad = missing[pos] | ~np.isfinite(v)
        if bad.any():
            raise TerritoryPackageError(f"{path}: column '{name}' is missing or not finite at {int(bad.sum())} step(s), e.g. "
                                        f"{_listing(grid[bad].tz_convert(spec.timezone).astype(str).tolist())} (data row(s) "
                                        f"{_rows(pos[bad])}); fix: covariates must be complete (the model "
                                        "reads them without a mask)")
        out[:, k] = v
    return out.astype(np.float32), list(c.columns)


# ---------------------------------------------------------------------------------- validate
def validate_package(path: str | Path, window: int = 12, horizon: int = 12,
                     split: tuple[float, float, float] = (0.7, 0.1, 0.2)) -> dict[str, Any]:
    """The report of ``fedldt validate``: load the package (:func:`load_package`, its checks
    included) and check that each train/val/test part holds one window.

    ``low_coverage``: an error when under :data:`MIN_COVERAGE` of the values are valid, a warning
    under :data:`LOW_COVERAGE`.

    Returns:
        JSON-able ``{"package", "usable", "num_sensors", "num_steps", "interval", "coverage",
        "problems"}``: ``coverage`` the fraction of valid (mask 1) entries, ``problems`` as in
        :mod:`fedldt.data.checks`. A package that cannot be loaded gives ``usable: false`` and an
        ``unreadable`` error per fault found (the first fatal one, with the observations' independent
        faults and the graph's), whose message names the file, field and fix; sizes are then ``null``.
    """
    report: dict[str, Any] = {"package": str(path), "usable": False, "num_sensors": None, "num_steps": None,
                              "interval": None, "coverage": None, "problems": []}
    try:
        ds = load_package(path)
    except TerritoryPackageError as e:
        for message in e.messages:
            problem(report["problems"], "unreadable", "error", message)
        return report
    problems = list(ds.extra["problems"]) + history_problems(ds.num_steps, window, horizon, split)
    coverage = float(ds.mask.mean())
    if 0 < coverage < LOW_COVERAGE:
        severity = "error" if coverage < MIN_COVERAGE else "warning"
        problem(problems, "low_coverage", severity, f"only {100 * coverage:.2f} % of the values are valid (mask 1); "
                f"below {100 * MIN_COVERAGE:g} % the package is not usable, below {100 * LOW_COVERAGE:g} % it is "
                "reported; fix: check missing_values, the channels' min/max/type and the interval")
    report.update(usable=is_usable(problems), num_sensors=ds.num_nodes, num_steps=ds.num_steps,
                  interval=ds.extra["interval"], coverage=round(coverage, 6), problems=problems)
    return report


def format_report(report: dict[str, Any]) -> str:
    """``report`` (:func:`validate_package`) as readable text, one line per problem."""
    head = "usable" if report["usable"] else "NOT usable"
    lines = [f"{report['package']}: {head}"]
    if report["num_steps"] is not None:
        lines.append(f"  {report['num_sensors']} sensors, {report['num_steps']} steps of {report['interval']}, "
                     f"coverage {100 * report['coverage']:.2f} % of values valid")
    for p in report["problems"]:
        lines.append(f"  [{p['severity']}] {p['code']}: {p['message']}")
        if p["sensors"]:
            lines.append(f"      sensors: {', '.join(p['sensors'])}")
        if p["timestamps"]:
            lines.append(f"      timestamps: {', '.join(p['timestamps'])}")
    if not report["problems"]:
        lines.append("  no problems found")
    return "\n".join(lines)
