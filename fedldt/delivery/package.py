"""A model package: one territory's trained forecaster as a self-contained folder, and forecasting with it.

Layout (written by :func:`fedldt.delivery.export.export_package`)::

    package.json        manifest: format, model config, task (window, horizon, interval, time zone,
                        covariates, channels, units), graph hash, ONNX info, sha256 of every other
                        file, ``field_sha256`` (one hash per field) and ``digest`` (over all of it)
    package.sig         optional: Ed25519 signature of the digest (:mod:`fedldt.delivery.signing`)
    weights/global.pt   the global model's state dict (torch.save of tensors; loads with weights_only)
    scaler.json         the territory's z-score statistics ``mean``/``std`` ``[1, node, channel]``
    nodes.csv           ``index,sensor_id[,latitude,longitude]``: the node order of the model
    edges.csv           ``source,target,weight``: the territory's graph (indices into nodes.csv)
    model.onnx          the forecaster for this graph (fixed nodes, dynamic batch), data units
    model_card.json     what the model was trained on and how well it did; MODEL_CARD.md the same
                        for people

:class:`ForecastPackage` loads such a folder and turns the latest observations into forecasts
exactly as the training code computes its predictions (:meth:`fedldt.engine.TerritoryTask.predict`).
Loading refuses a package that is not exactly what export wrote (:func:`check_package`): every
file is listed and hashed, nothing else is in the folder, no name leaves it, and no manifest field
was edited; with a public key it also requires a valid signature.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from fedldt.data.ranges import ValidRange, clip_forecast, forecast_limits, parse_valid_ranges
from fedldt.data.windows import MaskedStandardScaler, model_inputs, time_features
from fedldt.delivery.observations import InputError, InputWindow, _listing, select_window, unique_keys, wall_clock
from fedldt.models import build_model

#: Version 2 added ``field_sha256``, ``digest`` and complete file lists; version 1 packages are refused (re-export).
PACKAGE_FORMAT = "fedldt-model-package/2"
MANIFEST = "package.json"
SIGNATURE = "package.sig"
GLOBAL_WEIGHTS = "weights/global.pt"
SCALER = "scaler.json"
NODES = "nodes.csv"
EDGES = "edges.csv"
ONNX = "model.onnx"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
ENGINES = ("torch", "onnx")
#: Largest ``package.json`` read, bytes.
MAX_MANIFEST_BYTES = 1 << 20
#: Manifest fields that hold the integrity data (not covered by ``field_sha256`` themselves).
DIGEST_FIELD, FIELD_DIGESTS = "digest", "field_sha256"


class PackageError(ValueError):
    """A model package folder is incomplete, altered or inconsistent; the message names the file."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON bytes of ``obj``: sorted keys, no spaces, ASCII, no NaN/Infinity."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _sha256_json(obj: Any) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(obj)).hexdigest()


def manifest_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's fields, two levels deep: ``"pilot"``, ``"task.units"``, ``"files.scaler.json"``, ...

    Top-level objects are split into their entries (``task``, ``model_config``, ``weights``,
    ``onnx``, ``files``); everything else is one field. ``digest`` and ``field_sha256`` are left out.
    """
    out: dict[str, Any] = {}
    for key, value in manifest.items():
        if key in (DIGEST_FIELD, FIELD_DIGESTS):
            continue
        if isinstance(value, dict) and value:
            out.update({f"{key}.{sub}": v for sub, v in value.items()})
        else:
            out[key] = value
    return out


def manifest_digest(manifest: dict[str, Any]) -> str:
    """``"sha256:<hex>"`` of the canonical JSON (:func:`canonical_json`) of the manifest without
    its ``digest`` field. It covers every file's sha256 and every field, ``field_sha256`` included;
    it is what ``package.sig`` signs."""
    return _sha256_json({k: v for k, v in manifest.items() if k != DIGEST_FIELD})


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with ``field_sha256`` (field -> sha256 of its canonical JSON value, see
    :func:`manifest_fields`) and ``digest`` (:func:`manifest_digest`) added."""
    body = {k: v for k, v in manifest.items() if k not in (DIGEST_FIELD, FIELD_DIGESTS)}
    body[FIELD_DIGESTS] = {name: _sha256_json(v) for name, v in sorted(manifest_fields(body).items())}
    body[DIGEST_FIELD] = manifest_digest(body)
    return body


def write_manifest(root: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``package.json`` for the files now under ``root``: ``fields`` (format, task, ...) plus
    ``files`` (every file's relative POSIX path -> sha256), sealed by :func:`seal_manifest`.

    Returns:
        The manifest written.
    """
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    files = {f: sha256_file(root / f) for f in names if f not in (MANIFEST, SIGNATURE)}
    manifest = seal_manifest({**fields, "files": files})
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return manifest


def sign_package(root: Path, key: Any) -> Path:
    """Write ``package.sig``: the Ed25519 signature (``key``, an ``Ed25519PrivateKey``) of the
    ``digest`` of ``root/package.json`` (see :mod:`fedldt.delivery.signing`). Returns its path."""
    from fedldt.delivery import signing

    digest = _read_manifest(root)[DIGEST_FIELD]
    path = root / SIGNATURE
    path.write_text(json.dumps(signing.sign_digest(key, digest), indent=2) + "\n")
    return path


def _strict_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _member(root: Path, rel: Any) -> Path:
    """The path of a file listed in the manifest; refuses names that could leave ``root``."""
    where = root / MANIFEST
    if (not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel or PurePosixPath(rel).is_absolute()
            or any(part in ("", ".", "..") for part in rel.split("/")) or ":" in rel.split("/")[0]):
        raise PackageError(f"{where}: file name {rel!r} in 'files' is not a plain relative path inside the package "
                           "(absolute, '..', '.', empty or backslash parts); the package was altered: re-export it")
    if rel in (MANIFEST, SIGNATURE):
        raise PackageError(f"{where}: 'files' lists {rel!r}, which cannot be listed; the package was altered")
    return root.joinpath(*rel.split("/"))


def _read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    if not root.is_dir():
        raise PackageError(f"{root} is not a folder; a fedldt model package is a folder (create one with `fedldt export`)")
    if mpath.is_symlink() or not mpath.is_file():
        raise PackageError(f"{root} is not a fedldt model package: {MANIFEST} not found or not a regular file "
                           "(create one with `fedldt export`)")
    with open(mpath, "rb") as f:
        data = f.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise PackageError(f"{mpath}: larger than {MAX_MANIFEST_BYTES} bytes; not a fedldt manifest")
    try:
        manifest = json.loads(data, parse_constant=_strict_constant, object_pairs_hook=unique_keys)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise PackageError(f"{mpath}: not valid JSON ({e}); re-export the package") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"{mpath}: not a JSON object; re-export the package")
    if manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"{mpath}: format {manifest.get('format')!r}; this fedldt reads {PACKAGE_FORMAT!r} "
                           "(re-export the package with this fedldt)")
    for key, kind in (("files", dict), ("task", dict), ("weights", dict), ("model_config", dict),
                      (FIELD_DIGESTS, dict), (DIGEST_FIELD, str), ("graph_hash", str), ("territory", str)):
        if not isinstance(manifest.get(key), kind):
            raise PackageError(f"{mpath}: field {key!r} missing or not a {kind.__name__}; re-export the package")
    return manifest


def _check_fields(manifest: dict[str, Any], mpath: Path) -> None:
    """Each field against ``field_sha256`` (names the edited field), then the whole ``digest``."""
    recorded = manifest[FIELD_DIGESTS]
    fields = manifest_fields(manifest)
    for name in sorted(set(recorded) | set(fields)):
        if name not in fields:
            raise PackageError(f"{mpath}: field {name!r} was removed after export; re-export the package")
        if name not in recorded:
            raise PackageError(f"{mpath}: field {name!r} was added after export; re-export the package")
        if _sha256_json(fields[name]) != recorded[name]:
            raise PackageError(f"{mpath}: field {name!r} was edited after export (its sha256 differs from "
                               f"{FIELD_DIGESTS}); forecasts or their labels would change: re-export the package")
    if manifest_digest(manifest) != manifest[DIGEST_FIELD]:
        raise PackageError(f"{mpath}: {DIGEST_FIELD!r} does not match the manifest's content ({FIELD_DIGESTS} or "
                           f"{DIGEST_FIELD} was edited); re-export the package")


#: Largest ``window`` / ``horizon`` (steps) and ``interval_s`` (seconds, one year) a manifest may
#: declare: a re-sealed manifest with ``horizon`` 10**12 would make every forecast exhaust memory.
MAX_TASK_STEPS = 100_000
MAX_INTERVAL_S = 366 * 86400


def _check_task(task: dict[str, Any], mpath: Path) -> None:
    """The task fields a forecast reads have the types and ranges ``fedldt export`` writes.

    Raises:
        PackageError: naming the field: ``window``/``horizon`` not an integer in
            1..:data:`MAX_TASK_STEPS`, ``interval_s`` not an integer in 1..:data:`MAX_INTERVAL_S`,
            ``timezone`` neither null nor an IANA time zone name, ``channels``/``units`` not
            non-empty lists of text of the same length.
    """
    from zoneinfo import ZoneInfo

    for key, top in (("window", MAX_TASK_STEPS), ("horizon", MAX_TASK_STEPS), ("interval_s", MAX_INTERVAL_S)):
        v = task.get(key)
        if type(v) is not int or not 1 <= v <= top:
            raise PackageError(f"{mpath}: task.{key} = {str(v)[:40]!r} is not a whole number from 1 to {top}; "
                               "re-export the package")
    tz = task.get("timezone")
    if tz is not None:
        try:
            ok = isinstance(tz, str) and ZoneInfo(tz) is not None
        except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError; "../x" a ValueError
            ok = False
        if not ok:
            raise PackageError(f"{mpath}: task.timezone = {str(tz)[:60]!r} is not an IANA time zone name; "
                               "re-export the package")
    channels, units = task.get("channels"), task.get("units")
    if not (isinstance(channels, list) and channels and all(isinstance(c, str) for c in channels)
            and isinstance(units, list) and len(units) == len(channels) and all(isinstance(u, str) for u in units)):
        raise PackageError(f"{mpath}: task.channels and task.units must be lists of names of the same length; "
                           "re-export the package")


def expected_files(manifest: dict[str, Any]) -> set[str]:
    """The files a package with this manifest holds besides ``package.json`` (and ``package.sig``)."""
    names = {GLOBAL_WEIGHTS, SCALER, NODES, EDGES, CARD_JSON, CARD_MD}
    if manifest.get("onnx"):
        names.add(ONNX)
    return names


def check_package(path: str | Path, verify_key: str | Path | None = None) -> dict[str, Any]:
    """Check that a folder is exactly a package written by ``fedldt export`` (without loading the model).

    Checks, in order: ``package.json`` is a JSON object (no key repeated) of format ``fedldt-model-package/2``;
    every name in its ``files`` is a plain relative path (no absolute path, ``..``, ``.``,
    backslash); no field was edited (``field_sha256``) and ``digest`` matches; the task's
    window, horizon, interval, time zone, channels and units are well-formed
    (:func:`_check_task`); with
    ``verify_key``, ``package.sig`` is a valid Ed25519 signature of ``digest`` by that key (an
    unsigned package is refused); the folder holds no symbolic link, special file, unlisted
    file or folder (only ``package.json``, ``package.sig`` and the listed files); the listed
    files are exactly those of the manifest (weights, scaler, nodes, edges, card, ONNX when
    recorded); each file's sha256 matches.

    Args:
        path: the package folder.
        verify_key: an Ed25519 public key file (PEM) the package must be signed with.

    Returns:
        The manifest.

    Raises:
        PackageError: the first failed check; the message names the file or field and the fix.
    """
    from fedldt.delivery import signing

    root = Path(path)
    manifest = _read_manifest(root)
    mpath = root / MANIFEST
    files = manifest["files"]
    members = {rel: _member(root, rel) for rel in files}
    _check_fields(manifest, mpath)
    _check_task(manifest["task"], mpath)
    sig = root / SIGNATURE
    if verify_key is not None:
        try:
            pub = signing.load_public_key(verify_key)
        except signing.SignatureError as e:
            raise PackageError(f"--verify-key: {e}") from None
        if not sig.exists() and not sig.is_symlink():
            raise PackageError(f"{root}: the package is not signed ({SIGNATURE} not found) but --verify-key "
                               f"{verify_key} requires a signature; sign it with `fedldt export --sign-key`")
        if sig.is_symlink() or not sig.is_file():
            raise PackageError(f"{sig}: not a regular file")
        try:
            signing.verify_signature(sig, manifest[DIGEST_FIELD], pub, verify_key)
        except signing.SignatureError as e:
            raise PackageError(str(e)) from None
    # the folder: only regular files and folders, each listed (or the manifest / signature)
    present, folders = set(), set()
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        for name in dirnames + filenames:
            p = here / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise PackageError(f"{p}: a symbolic link; a package holds regular files only (the package was "
                                   "altered: re-export it)")
            if name in dirnames:
                folders.add(rel)
            elif not p.is_file():
                raise PackageError(f"{p}: not a regular file; the package was altered: re-export it")
            else:
                present.add(rel)
    unlisted = sorted(present - set(files) - {MANIFEST, SIGNATURE})
    if unlisted:
        raise PackageError(f"{root}: file(s) {unlisted} are not listed in {MANIFEST}: the package was altered or "
                           "something else was put in its folder; remove them or re-export the package")
    needed_folders = {"/".join(rel.split("/")[:i]) for rel in files for i in range(1, rel.count("/") + 1)}
    extra = sorted(folders - needed_folders)
    if extra:
        raise PackageError(f"{root}: folder(s) {extra} are not part of the package; remove them or re-export")
    missing = sorted(set(files) - present)
    if missing:
        raise PackageError(f"{members[missing[0]]}: missing from the package (listed in {MANIFEST}); re-export the package")
    want = expected_files(manifest)
    if set(files) != want:
        raise PackageError(f"{mpath}: 'files' lists {sorted(files)}, a package of this manifest has {sorted(want)}; "
                           "re-export the package")
    if manifest["weights"].get("global") != GLOBAL_WEIGHTS or manifest["weights"].get("local") is not None:
        raise PackageError(f"{mpath}: 'weights' must be {{'global': '{GLOBAL_WEIGHTS}', 'local': null}} (packages "
                           "carry the global model only); re-export the package")
    real_root = root.resolve()
    for rel, f in members.items():
        if not f.resolve().is_relative_to(real_root):
            raise PackageError(f"{f}: resolves outside the package folder; the package was altered")
        if sha256_file(f) != files[rel]:
            raise PackageError(f"{f}: sha256 differs from {MANIFEST}: the file was altered; re-export the package")
    if sig.exists() and verify_key is None:  # unverified, but it must at least belong to this manifest
        try:
            doc = signing.read_signature(sig)
        except signing.SignatureError as e:
            raise PackageError(str(e)) from None
        if doc["digest"] != manifest[DIGEST_FIELD]:
            raise PackageError(f"{sig}: signs another manifest digest than package.json's: the package was altered "
                               "after signing")
    return manifest


def graph_hash(node_ids: Sequence[str], edge_index: torch.Tensor, edge_weight: torch.Tensor) -> str:
    """A fingerprint of a territory's sensors, their order and its graph.

    ``sha256`` of ``"fedldt-graph/1\\n"``, the node ids joined by ``"\\n"``, a ``"\\n"``, then the
    edges as little-endian int64 ``[2, E]`` (row-major) and the weights as little-endian float32
    ``[E]``. Two packages with the same hash read the same sensors in the same order on the same
    weighted graph.

    Returns:
        ``"sha256:<64 hex digits>"``.
    """
    h = hashlib.sha256(b"fedldt-graph/1\n")
    h.update("\n".join(str(s) for s in node_ids).encode("utf-8") + b"\n")
    h.update(np.ascontiguousarray(edge_index.numpy(), dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(edge_weight.numpy(), dtype="<f4").tobytes())
    return "sha256:" + h.hexdigest()


def load_weights_only(path: Path, error: type[ValueError] | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain containers only, no
    code runs while unpickling.

    Raises:
        ``error`` (default :class:`PackageError`): the file cannot be loaded that way (a pickle
        that needs code, a corrupt file); the message names the file.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise (error or PackageError)(f"{path}: cannot be loaded with weights_only=True ({type(e).__name__}): not a "
                                      "file fedldt wrote (fedldt never loads pickles that can run code)") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors (:func:`load_weights_only`)."""
    state = load_weights_only(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PackageError(f"{path}: not a state dict of tensors; re-export the package")
    return state


@dataclass
class Forecast:
    """Forecasts of every sensor of a territory for the ``horizon`` steps after the last observation.

    Attributes:
        values: ``[horizon, node, channel]`` float32 forecasts in data units (e.g. mph).
        timestamps: ``[horizon]`` times of the forecast steps (step ``h`` = last observation
            time + ``h`` x ``interval``), tz-aware when the package has a time zone.
        node_ids: sensor ids in node order.
        channels, units: channel names and units, e.g. ``("speed",)``, ``("mph",)``.
        interval: the data's sampling interval.
        issued_after: time of the last observation used.
        territory: the territory id.
        missing_inputs: sensor id -> missing values fed as masked entries (``allow_missing``).
        invalid_inputs: sensor id -> implausible values fed as masked entries (``invalid="mask"``).
        unavailable: sensor id -> why it has no forecast (no valid input, or a non-finite model
            output); such sensors are left out of :meth:`to_frame` and :meth:`to_json`.
    """

    values: np.ndarray
    timestamps: pd.DatetimeIndex
    node_ids: list[str]
    channels: tuple[str, ...]
    units: tuple[str, ...]
    interval: pd.Timedelta
    issued_after: pd.Timestamp
    territory: str
    missing_inputs: dict[str, int] = field(default_factory=dict)
    invalid_inputs: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """Wide table: ``timestamp``, ``horizon_step`` (1..H), then one column per sensor with a
        forecast (channel 0, data units, float64 so that text output round-trips the float32 values)."""
        frame = pd.DataFrame(self.values[:, :, 0].astype(np.float64), columns=self.node_ids)
        frame = frame.drop(columns=list(self.unavailable))
        frame.insert(0, "horizon_step", np.arange(1, len(self.timestamps) + 1))
        frame.insert(0, "timestamp", [t.isoformat() for t in self.timestamps])
        return frame

    def to_json(self) -> dict[str, Any]:
        """JSON-able forecast: metadata, ``timestamps`` and ``forecasts`` (sensor -> values per step)."""
        out: dict[str, Any] = {
            "territory": self.territory,
            "channel": self.channels[0],
            "unit": self.units[0],
            "interval_s": int(self.interval.total_seconds()),
            "issued_after": self.issued_after.isoformat(),
            "timestamps": [t.isoformat() for t in self.timestamps],
            "forecasts": {s: self.values[:, j, 0].astype(np.float64).tolist() for j, s in enumerate(self.node_ids)
                          if s not in self.unavailable},
        }
        if self.unavailable:
            out["unavailable"] = dict(self.unavailable)
        if self.invalid_inputs:
            out["invalid_inputs"] = dict(self.invalid_inputs)
        if self.missing_inputs:
            out["missing_inputs"] = dict(self.missing_inputs)
        if self.missing_inputs or self.invalid_inputs:
            out["note"] = ("some inputs were missing or invalid and entered the model as masked values "
                           "(value x mask = 0); the model was trained on complete data, so these forecasts are less reliable")
        return out


class ForecastPackage:
    """A loaded model package (see the module docstring for the folder layout).

    Use :meth:`load`; then :meth:`forecast` turns an observations table into a :class:`Forecast`.

    Attributes:
        root: the package folder.
        manifest: ``package.json``.
        model: the forecaster (the global weights), eval mode.
        scaler: the territory's fitted scaler.
        node_ids: ``[node]`` sensor ids in model order.
        edge_index: ``[2, E]`` int64, edge_weight ``[E]`` float32: the territory's graph.
        coords: sensor id -> (latitude, longitude), empty if unknown.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], model: torch.nn.Module, scaler: MaskedStandardScaler,
                 node_ids: list[str], edge_index: torch.Tensor, edge_weight: torch.Tensor,
                 coords: dict[str, tuple[float, float]]) -> None:
        self.root, self.manifest, self.model, self.scaler = root, manifest, model, scaler
        self.node_ids, self.edge_index, self.edge_weight, self.coords = node_ids, edge_index, edge_weight, coords
        self._onnx_session = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, verify_key: str | Path | None = None) -> "ForecastPackage":
        """Load and check a package folder.

        Args:
            path: the package folder.
            verify_key: Ed25519 public key file (PEM, from ``fedldt keygen``): require a valid
                ``package.sig`` made with its private key; ``None`` = signature not required.

        Raises:
            PackageError: the folder is not exactly what ``fedldt export`` wrote (see
                :func:`check_package`: unlisted, missing or altered file, a name leaving the
                folder, an edited field, a missing or invalid signature), or the graph, scaler
                and model disagree (the file or field and the fix are named).
        """
        root = Path(path)
        manifest = check_package(root, verify_key)
        # bytes, not a path: pandas expands a leading "~" of a path itself, so a package folder
        # named "~" would have been checked here but read from the home folder
        nodes = pd.read_csv(io.BytesIO((root / NODES).read_bytes()), dtype={"sensor_id": str})
        node_ids = nodes["sensor_id"].tolist()
        edges = pd.read_csv(io.BytesIO((root / EDGES).read_bytes()))
        edge_index = torch.as_tensor(edges[["source", "target"]].to_numpy(dtype=np.int64).T.copy())
        edge_weight = torch.as_tensor(edges["weight"].to_numpy(dtype=np.float32))
        if graph_hash(node_ids, edge_index, edge_weight) != manifest["graph_hash"]:
            raise PackageError(f"{root / NODES} / {root / EDGES}: graph hash differs from {MANIFEST}; re-export the package")
        coords = {}
        if {"latitude", "longitude"} <= set(nodes.columns):
            coords = {s: (float(a), float(b)) for s, a, b in zip(node_ids, nodes["latitude"], nodes["longitude"])}
        sc = json.loads((root / SCALER).read_text())
        scaler = MaskedStandardScaler(per_node=bool(sc["per_node"]))
        scaler.mean = np.asarray(sc["mean"], dtype=np.float32)
        scaler.std = np.asarray(sc["std"], dtype=np.float32)
        n, c = len(node_ids), len(manifest["task"]["channels"])
        if scaler.mean.shape[-1] != c or scaler.mean.shape[1] not in (1, n) or scaler.std.shape != scaler.mean.shape:
            raise PackageError(f"{root / SCALER}: statistics of shape {scaler.mean.shape} do not fit {n} nodes x {c} channels")
        try:
            model = build_model(manifest["model_config"])
        except (ValueError, TypeError) as e:
            raise PackageError(f"{root / MANIFEST}: model_config: {e}") from None
        state = _load_tensors(root / GLOBAL_WEIGHTS)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise PackageError(f"{root / GLOBAL_WEIGHTS}: weights do not fit model_config of {MANIFEST}: {e}") from None
        model.eval()
        return cls(root, manifest, model, scaler, node_ids, edge_index, edge_weight, coords)

    # ------------------------------------------------------------------ facts
    @property
    def territory(self) -> str:
        return str(self.manifest["territory"])

    @property
    def window(self) -> int:
        return int(self.manifest["task"]["window"])

    @property
    def horizon(self) -> int:
        return int(self.manifest["task"]["horizon"])

    @property
    def interval(self) -> pd.Timedelta:
        return pd.Timedelta(seconds=int(self.manifest["task"]["interval_s"]))

    @property
    def timezone(self) -> str | None:
        return self.manifest["task"].get("timezone")

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(self.manifest["task"]["channels"])

    @property
    def units(self) -> tuple[str, ...]:
        return tuple(self.manifest["task"]["units"])

    @property
    def valid_range(self) -> dict[str, ValidRange]:
        """Channel -> plausible observations (``task.valid_range`` of the manifest; empty for
        packages exported before ranges were recorded: then only float32's range applies).

        Raises:
            PackageError: the recorded ranges are malformed.
        """
        try:
            return parse_valid_ranges(self.manifest["task"].get("valid_range"), f"{MANIFEST} task.valid_range")
        except ValueError as e:
            raise PackageError(f"{self.root / MANIFEST}: {e}; re-export the package") from None

    def card(self) -> dict[str, Any]:
        """The model card (``model_card.json``)."""
        return json.loads((self.root / CARD_JSON).read_text())

    # ------------------------------------------------------------------ forecasting
    def input_window(self, table: pd.DataFrame, allow_missing: bool = False, invalid: str = "error") -> InputWindow:
        """Check an observations table and take its ``window`` most recent steps (see
        :func:`fedldt.delivery.observations.select_window`).

        Raises:
            InputError: see :func:`~fedldt.delivery.observations.select_window`; also for a
                package with several channels (tables carry one value per sensor and step).
        """
        if len(self.channels) != 1:
            raise InputError(f"this package forecasts {len(self.channels)} channels {list(self.channels)}; "
                             "observation tables carry one value per sensor and step")
        return select_window(table, self.node_ids, self.window, self.interval, self.timezone, allow_missing,
                             self.territory, self.valid_range.get(self.channels[0]), self.units[0], invalid)

    def calendar(self, times: pd.DatetimeIndex) -> np.ndarray:
        """``[time, k]`` float32 calendar covariates of (local wall-clock) ``times``, as in training."""
        task = self.manifest["task"]
        return time_features(wall_clock(times), task["time_of_day"], task["day_of_week"])

    def predict_window(self, win: InputWindow, engine: str = "torch") -> np.ndarray:
        """Forecast ``[horizon, node, channel]`` float32 in data units from one input window, clipped
        to the channels' valid ranges (``task.valid_range``: a channel declared ``min: 0`` is never
        forecast below 0; :func:`fedldt.data.ranges.clip_forecast`), whichever the engine.

        ``engine="torch"`` runs the PyTorch model exactly as
        :meth:`fedldt.engine.TerritoryTask.predict` does (same features, same sparse graph
        products, same inverse scaling); ``engine="onnx"`` runs ``model.onnx`` with ONNX Runtime
        (equal within the parity error recorded in ``package.json``).

        Raises:
            ValueError: unknown engine; PackageError: ``engine="onnx"`` without ``model.onnx``.
        """
        if engine == "torch":
            task = self.manifest["task"]
            _, features = model_inputs(  # [W, N, F]
                win.values, win.mask, wall_clock(win.times), self.scaler, task["time_of_day"], task["day_of_week"]
            )
            x = torch.from_numpy(features).unsqueeze(0)  # [1, W, N, F]
            with torch.no_grad():
                y = self.scaler.inverse_transform(self.model(x, self.edge_index, self.edge_weight))  # [1, H, N, C]
            return clip_forecast(y[0].numpy(), self.forecast_limits)
        if engine == "onnx":  # packages exported before forecasts were clipped in model.onnx are clipped here
            feeds = {"values": win.values[None], "mask": win.mask[None], "calendar": self.calendar(win.times)[None]}
            return clip_forecast(self.onnx_session().run(["forecast"], feeds)[0][0], self.forecast_limits)
        raise ValueError(f"engine={engine!r} must be one of {ENGINES}")

    @property
    def forecast_limits(self) -> np.ndarray:
        """``[2, channel]`` lowest/highest forecast per channel, from :attr:`valid_range`."""
        return forecast_limits(self.channels, self.valid_range)

    def onnx_session(self):
        """The ONNX Runtime session of ``model.onnx`` (created on first use, CPU provider)."""
        if self._onnx_session is None:
            if not self.manifest.get("onnx"):
                raise PackageError(f"{self.root}: the package has no {ONNX} (exported with --no-onnx); use the torch engine")
            import onnxruntime as ort

            self._onnx_session = ort.InferenceSession(str(self.root / ONNX), providers=["CPUExecutionProvider"])
        return self._onnx_session

    def forecast(self, table: pd.DataFrame, allow_missing: bool = False, engine: str = "torch",
                 invalid: str = "error") -> Forecast:
        """Forecast every sensor for the ``horizon`` steps after the table's last time step.

        Args:
            table: observations, index = timestamps, columns = sensor ids (any order), data units.
            allow_missing: feed NaN values in the window as masked entries instead of refusing them.
            engine: ``"torch"`` or ``"onnx"``.
            invalid: ``"error"`` refuses implausible values, ``"mask"`` masks them (see
                :func:`~fedldt.delivery.observations.select_window`).

        Returns:
            The forecast; a sensor whose forecast cannot be made (no valid input in the window, or
            a non-finite model output) is in :attr:`Forecast.unavailable` with the reason.

        Raises:
            InputError: the observations cannot give a correct forecast, or no sensor has one
                (the message says why).
        """
        win = self.input_window(table, allow_missing, invalid)
        values = self.predict_window(win, engine)
        unavailable = dict(win.unavailable)
        for j in np.flatnonzero(~np.isfinite(values).all(axis=(0, 2))):
            unavailable.setdefault(self.node_ids[j], "the model gave no finite forecast (NaN or infinity)")
        if len(unavailable) == len(self.node_ids):
            raise InputError(f"no forecast can be made: {_listing([f'{s}: {r}' for s, r in unavailable.items()], 2)}")
        last = win.times[-1]
        steps = pd.DatetimeIndex([last + h * self.interval for h in range(1, self.horizon + 1)])
        return Forecast(values=values, timestamps=steps, node_ids=list(self.node_ids), channels=self.channels,
                        units=self.units, interval=self.interval, issued_after=last, territory=self.territory,
                        missing_inputs=win.missing, invalid_inputs=win.invalid, unavailable=unavailable)
