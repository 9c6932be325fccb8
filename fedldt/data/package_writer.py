"""``fedldt partition``: a pilot's whole-network dataset written as one territory data package per territory.

The built-in loaders (:func:`fedldt.data.load_los_loop`, :func:`fedldt.data.load_charged_cities`)
are the converters: the pilot's config is composed, its dataset loaded and partitioned exactly as
a simulation does (:func:`fedldt.config.load_territories`), and each territory is written as a
package (``docs/data-format.md``) that :func:`fedldt.data.load_package` reads back to the same
arrays, bit for bit:

* ``observations.parquet``: long layout, ``timestamp`` (UTC), ``sensor_id`` (text), one float32
  column per channel, empty (null) where the mask is 0 (Parquet keeps float32 exactly);
* ``sensors.csv``: ``sensor_id``, ``latitude``, ``longitude`` (degrees, shortest round-trip text);
* ``edges.csv``: the territory's own edges, ``source``, ``target``, ``weight``, directed, in the
  order of its ``edge_index`` (self-loops included);
* ``covariates.parquet`` when the dataset has territory-level covariates (float32);
* ``territory.yaml``: name, interval, time zone, channels with units and the pilot's valid ranges,
  provenance and licence.

Edges between sensors of different territories cannot be kept (no territory holds both ends):
their count and share per territory are returned and written to ``DIR/partition.json``.
"""

from __future__ import annotations

import json
import os
import re
import zoneinfo
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import yaml

from fedldt.data.package import MANIFEST
from fedldt.data.territory import TerritoryDataset

#: The report written next to the packages; also marks a folder as written by ``fedldt partition``.
REPORT = "partition.json"
WRITTEN_BY = "fedldt partition"
OBSERVATIONS, SENSORS, EDGES, COVARIATES = "observations.parquet", "sensors.csv", "edges.csv", "covariates.parquet"
#: A package sub-folder's name (a territory name of territory.yaml, optionally ``<index>-`` first).
_FOLDER = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9_.-]{1,72}")


class PartitionError(ValueError):
    """``fedldt partition`` cannot write: the message names the folder, option or config value and the fix."""


def _folder_names(names: Sequence[str]) -> list[str]:
    """Sub-folder per territory, so that their name order is the territories' order: the
    territory's name, or ``<index>-<name>`` (zero-padded) when names would sort differently (t10 < t2)."""
    if list(names) == sorted(names):
        return list(names)
    width = len(str(len(names) - 1))
    return [f"{i:0{width}d}-{n}" for i, n in enumerate(names)]


def border_edges(network: TerritoryDataset | Sequence[TerritoryDataset],
                 territories: Sequence[TerritoryDataset]) -> list[dict[str, Any]]:
    """Edges of the whole network that no territory keeps, per territory.

    An edge ``i -> j`` (self-loops excluded; each direction counted) is dropped when ``i`` and
    ``j`` belong to different territories. For each territory: ``edges_kept`` (its own edges
    between two of its sensors, self-loops excluded), ``edges_dropped`` (network edges with one
    end in it and the other outside) and ``share_dropped = dropped / (kept + dropped)`` (0 when it
    has no edge). Territories given by the data (a list of datasets, ``as_given``) drop nothing.

    Returns:
        One ``{"territory", "sensors", "edges_kept", "edges_dropped", "share_dropped"}`` per territory.
    """
    if isinstance(network, TerritoryDataset):
        owner = np.full(network.num_nodes, -1, dtype=np.int64)
        index = pd.Index(network.node_ids)
        for k, t in enumerate(territories):
            owner[index.get_indexer(t.node_ids)] = k
        src, dst = network.edge_index.numpy()
        real = src != dst
        a, b = owner[src[real]], owner[dst[real]]
        cut = a != b
        dropped = np.bincount(a[cut], minlength=len(territories)) + np.bincount(b[cut], minlength=len(territories))
    else:
        dropped = np.zeros(len(territories), dtype=np.int64)
    out = []
    for k, t in enumerate(territories):
        s, d = t.edge_index.numpy()
        kept = int((s != d).sum())
        total = kept + int(dropped[k])
        out.append({"territory": t.name, "sensors": t.num_nodes, "edges_kept": kept, "edges_dropped": int(dropped[k]),
                    "share_dropped": round(int(dropped[k]) / total, 6) if total else 0.0})
    return out


def _utc_stamps(ds: TerritoryDataset, timezone: str) -> pd.DatetimeIndex:
    """The dataset's time stamps in UTC: naive ones are local times of ``timezone``.

    Raises:
        PartitionError: a naive stamp does not exist or is ambiguous in ``timezone`` (a
            daylight-saving change inside the data), or the UTC steps are not regular.
    """
    ts = ds.timestamps
    if ts.tz is not None and timezone != str(ts.tz):
        raise PartitionError(f"--timezone {timezone}: the dataset's time stamps carry their own zone, {ts.tz}; fix: "
                             "leave --timezone out")
    if ts.tz is None:
        try:
            ts = ts.tz_localize(timezone, ambiguous="raise", nonexistent="raise")
        except Exception as e:  # pytz NonExistentTimeError / AmbiguousTimeError
            raise PartitionError(f"--timezone {timezone}: the dataset's time stamps are a regular grid of naive times, "
                                 f"and {e} is not a single local time there (a daylight-saving change); fix: "
                                 "--timezone UTC (time of day then stays as the built-in loader gives it)") from None
    utc = ts.tz_convert("UTC")
    if len(utc) > 1 and (np.diff(utc.asi8) != utc.asi8[1] - utc.asi8[0]).any():
        raise PartitionError(f"--timezone {timezone}: the dataset's stamps are not regular in UTC; fix: --timezone UTC")
    return utc


def _interval(ds: TerritoryDataset) -> str:
    """The interval as ``territory.yaml`` writes it: ``1h``, ``5min`` or ``30s``."""
    s = int(ds.freq / pd.Timedelta("1s"))
    return f"{s // 3600}h" if s % 3600 == 0 else f"{s // 60}min" if s % 60 == 0 else f"{s}s"


def write_package(ds: TerritoryDataset, folder: Path, timezone: str | None, valid_range: dict[str, Any] | None,
                  provenance: str, licence: str) -> list[str]:
    """Write ``ds`` as a territory data package in the new folder ``folder`` (see the module docstring).

    Args:
        ds: one territory (values/mask ``[time, node, channel]`` float32).
        folder: package folder to create (must not exist).
        timezone: IANA zone of naive time stamps (written as UTC, declared in ``territory.yaml``);
            ``None``: the zone of time-zone-aware stamps (a dataset read from a package), else UTC.
        valid_range: channel -> ``{min, max, type}`` (the pilot's ``dataset.valid_range``) or ``None``
            (then the dataset's own, ``ds.extra["valid_range"]``, as a package declares it).
        provenance, licence: text for ``territory.yaml``.

    Returns:
        The files written, relative to ``folder``.

    Raises:
        PartitionError: see :func:`_utc_stamps`; an edge weight that is not positive.
    """
    timezone = str(ds.timestamps.tz) if ds.timestamps.tz is not None and timezone is None else timezone or "UTC"
    utc = _utc_stamps(ds, timezone)
    folder.mkdir(parents=True, exist_ok=False)
    t, n = ds.num_steps, ds.num_nodes
    obs = pd.DataFrame({"timestamp": np.repeat(utc, n), "sensor_id": pd.array(np.tile(ds.node_ids, t), dtype="string")})
    for k, ch in enumerate(ds.channels):
        v = ds.values[:, :, k].reshape(-1)
        obs[ch] = np.where(ds.mask[:, :, k].reshape(-1) > 0, v, np.float32("nan")).astype(np.float32)
    obs.to_parquet(folder / OBSERVATIONS, index=False)
    sensors = pd.DataFrame({"sensor_id": ds.node_ids})
    coords = np.full((n, 2), np.nan) if ds.coords is None else np.asarray(ds.coords, dtype=np.float64)
    sensors["latitude"], sensors["longitude"] = coords[:, 0], coords[:, 1]
    sensors.to_csv(folder / SENSORS, index=False)  # float64 written as shortest round-trip text
    src, dst = ds.edge_index.numpy()
    w = ds.edge_weight.numpy()
    if (w <= 0).any() or not np.isfinite(w).all():
        raise PartitionError(f"territory {ds.name}: {int((w <= 0).sum())} edge weight(s) are not positive; a package's "
                             "edges.csv holds positive weights only")
    pd.DataFrame({"source": ds.node_ids[src], "target": ds.node_ids[dst], "weight": w.astype(np.float64)}).to_csv(
        folder / EDGES, index=False)
    files = [MANIFEST, OBSERVATIONS, SENSORS, EDGES]
    channels = []
    for ch, unit in zip(ds.channels, ds.units):
        r = (valid_range or ds.extra.get("valid_range") or {}).get(ch) or {}
        channels.append({"name": ch, "unit": unit, "min": r.get("min"), "max": r.get("max"), "type": r.get("type", "number")})
    manifest: dict[str, Any] = {
        "name": ds.name, "interval": _interval(ds), "timezone": timezone, "channels": channels,
        "observations": {"file": OBSERVATIONS, "layout": "long"}, "sensors": {"file": SENSORS},
        "graph": {"edges": EDGES, "directed": True}, "missing_values": [], "duplicates": "error",
    }
    if ds.extra.get("outages"):  # the source package's outage rule holds for its territories' packages
        manifest["outages"] = dict(ds.extra["outages"])
    cov = ds.extra.get("covariates")
    if cov is not None:
        names = [str(c) for c in ds.extra["covariate_names"]]
        frame = pd.DataFrame(np.asarray(cov, dtype=np.float32), columns=names)
        frame.insert(0, "timestamp", utc)
        frame.to_parquet(folder / COVARIATES, index=False)
        manifest["covariates"] = {"file": COVARIATES, "columns": names}
        files.append(COVARIATES)
    manifest.update(provenance=provenance, licence=licence)
    (folder / MANIFEST).write_text(yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return files


def _prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty ``out`` unless it is an earlier ``fedldt partition`` output and ``force``:
    then remove exactly the files that output lists (never anything else).

    An earlier output is a folder holding ``partition.json`` (``written_by: fedldt partition``) and
    nothing but the package files it lists (``<folder>/<one of the package file names>``), with no
    symbolic link anywhere."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise PartitionError(f"--out {out}: exists and is not a folder; fix: give a new or empty folder")
    if not any(out.iterdir()):
        return
    report = out / REPORT
    try:
        old = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    except (OSError, ValueError):
        old = {}
    names = {MANIFEST, OBSERVATIONS, SENSORS, EDGES, COVARIATES}
    listed = {REPORT} if isinstance(old, dict) and old.get("written_by") == WRITTEN_BY else set()
    if listed and isinstance(old.get("files"), list):
        listed |= {f for f in old["files"] if isinstance(f, str) and len(Path(f).parts) == 2
                   and Path(f).parts[1] in names and _FOLDER.fullmatch(Path(f).parts[0])}
    dirs = {Path(f).parts[0] for f in listed if f != REPORT}
    files, folders, links = set(), set(), False
    for here, subdirs, leaves in os.walk(out):
        rel = Path(here).relative_to(out)
        for d in subdirs:
            links |= (Path(here) / d).is_symlink()
            folders.add(str(rel / d))
        for f in leaves:
            links |= (Path(here) / f).is_symlink()
            files.add(str(rel / f))
    if not listed or links or not files <= listed or not folders <= dirs:
        raise PartitionError(f"--out {out}: not empty and not (only) an earlier `fedldt partition` output; fix: give a new "
                             "or empty folder (fedldt never overwrites files it did not write)")
    if not force:
        raise PartitionError(f"--out {out}: holds an earlier `fedldt partition` output; fix: --force to replace it, or "
                             "give another folder")
    for f in sorted(files):
        (out / f).unlink()
    for d in sorted(folders):
        (out / d).rmdir()


def _licence(dataset_name: str, declared: Any = None) -> str:
    """The licence note of ``conf/provenance/<dataset>.yaml`` (one line), else ``declared`` (the
    licence a source package states), else a pointer to the source."""
    from fedldt.config import CONF_DIR

    f = CONF_DIR / "provenance" / f"{dataset_name}.yaml"
    if f.is_file():
        text = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}).get("license")
        if isinstance(text, str) and text.strip():
            return " ".join(text.split())
    if isinstance(declared, str) and declared.strip():
        return " ".join(declared.split())
    return f"as the source dataset {dataset_name} (not stated in fedldt; check its provenance)"


def partition_pilot(pilot: str, out: str | Path, timezone: str | None = None, overrides: Sequence[str] = (),
                    force: bool = False) -> dict[str, Any]:
    """Write one territory data package per territory of ``pilot`` into ``out``.

    Composes ``pilot=<pilot>`` plus ``overrides`` (e.g. ``dataset.path=...``), loads the
    whole-network dataset with the pilot's built-in loader, partitions it as the pilot does
    (:func:`fedldt.config.load_territories`) and writes ``out/<territory>/`` per territory (in
    territory order; sub-folder names sort in that order) and ``out/partition.json``.

    Args:
        pilot: a pilot of ``conf/pilot/`` (or of a folder added by a ``hydra.searchpath`` override).
        out: new or empty folder (or an earlier output of this function, with ``force``).
        timezone: IANA zone in which the dataset's naive time stamps are local time (Los-loop:
            ``America/Los_Angeles``); ``UTC`` keeps them as they are; ``None``: the zone of a
            dataset whose stamps carry one (read from a package, e.g. ``montevideo_bus_4``), else UTC.
        overrides: further Hydra overrides.
        force: replace an earlier ``fedldt partition`` output in ``out`` (only the files it lists).

    Returns:
        The report written to ``partition.json``: ``written_by``, ``pilot``, ``overrides``,
        ``dataset``, ``timezone``, ``territories`` (per territory: ``folder`` and
        :func:`border_edges`' counts), ``edges_dropped``/``edges_total``/``share_dropped`` (whole
        network, directed edges without self-loops) and ``files``.

    Raises:
        PartitionError: ``out`` is not empty (see above), ``timezone`` unknown, the pilot already
            reads packages; ConfigError or the loaders' errors for a bad pilot or dataset.
    """
    from fedldt import __version__
    from fedldt.config import DATASET_LOADERS, compose_config, load_territories, registered_call, resolve_config

    try:
        zoneinfo.ZoneInfo(timezone or "UTC")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise PartitionError(f"--timezone {timezone!r} is not an IANA time zone; write it like America/Los_Angeles or UTC") from None
    out = Path(out)
    _prepare_out(out, force)
    args = [f"pilot={pilot}", *overrides]
    from hydra.errors import HydraException

    try:
        cfg = resolve_config(compose_config(args))
    except HydraException as e:  # unknown pilot or bad override: Hydra's message names it
        raise PartitionError(f"{e}") from None
    from fedldt.data.packages import load_packages

    load, load_args = registered_call(cfg["dataset"], DATASET_LOADERS, "dataset")
    if load is load_packages:
        raise PartitionError(f"pilot {pilot} already reads territory data packages (dataset=packages): nothing to convert")
    network = load(**load_args)
    territories = load_territories(cfg)
    counts = border_edges(network, territories)
    folders = _folder_names([t.name for t in territories])
    bad = [t.name for t in territories if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", t.name) or t.name in (".", "..")]
    if bad:
        raise PartitionError(f"territory name {bad[0]!r} of pilot {pilot} cannot name a package (letters, digits, _ . - "
                             "only, at most 64); fix: rename it in the dataset config")
    licence = _licence(str(cfg["dataset"].get("name", "")), territories[0].extra.get("licence"))
    files: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    try:
        for t, folder, c in zip(territories, folders, counts):
            written = write_package(t, out / folder, timezone, cfg["dataset"].get("valid_range"),
                                    f"{t.source}; territory {t.name} of pilot {pilot} ({cfg['partition']['_target_']}), "
                                    f"written by fedldt {__version__} `fedldt partition`", licence)
            files += [f"{folder}/{f}" for f in written]
            c["folder"] = folder
    except Exception:
        for f in files:  # leave no half-written output behind (only what this call wrote)
            (out / f).unlink(missing_ok=True)
        for folder in folders:
            if (out / folder).is_dir() and not any((out / folder).iterdir()):
                (out / folder).rmdir()
        raise
    dropped = sum(c["edges_dropped"] for c in counts) // 2  # each cut edge counted at both ends
    if isinstance(network, TerritoryDataset):
        s, d = network.edge_index.numpy()
        total = int((s != d).sum())
    else:
        total = sum(c["edges_kept"] for c in counts)
    report = {"written_by": WRITTEN_BY, "fedldt_version": __version__, "pilot": pilot, "overrides": list(overrides),
              "dataset": cfg["dataset"].get("name"), "timezone": timezone or str(territories[0].timestamps.tz or "UTC"),
              "territories": counts,
              "edges_dropped": dropped, "edges_total": total, "share_dropped": round(dropped / total, 6) if total else 0.0,
              "files": files}
    (out / REPORT).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return report


def format_partition(report: dict[str, Any]) -> str:
    """The report of :func:`partition_pilot` as lines of text (one per territory, then the total)."""
    lines = [f"pilot {report['pilot']}: {len(report['territories'])} territory data packages"]
    for c in report["territories"]:
        lines.append(f"  {c['folder']}: {c['sensors']} sensors, {c['edges_kept']} edges kept, {c['edges_dropped']} "
                     f"border edges dropped ({100 * c['share_dropped']:.1f} % of its edges)")
    lines.append(f"  border edges dropped: {report['edges_dropped']} of {report['edges_total']} "
                 f"({100 * report['share_dropped']:.1f} % of the network's edges, self-loops not counted)")
    return "\n".join(lines)


__all__ = ["PartitionError", "border_edges", "format_partition", "partition_pilot", "write_package"]
