"""A federation's territories read from territory data packages: one package per sub-folder.

``conf/dataset/packages.yaml`` (``dataset=packages dataset.path=DIR``) names this loader: every
sub-folder of ``DIR`` holding a ``territory.yaml`` is one territory (format:
``docs/data-format.md``), taken in the order of the sub-folders' names, so a pilot runs on
packages written by ``fedldt partition`` (:mod:`fedldt.data.package_writer`) or brought by the
territories themselves. The partition is then ``as_given`` with one territory per package
(:func:`fedldt.config.resolve_config` sets it); each channel's valid range comes from its
package's ``territory.yaml`` (``dataset.extra["valid_range"]``).
"""

from __future__ import annotations

from pathlib import Path

from fedldt.data.checks import UnusableData, is_usable
from fedldt.data.package import DOC, MANIFEST, TerritoryPackageError, load_package
from fedldt.data.territory import TerritoryDataset


def package_folders(path: str | Path) -> list[Path]:
    """The package sub-folders of ``path`` (those holding ``territory.yaml``), sorted by name.

    Raises:
        TerritoryPackageError: ``path`` is not a folder, or holds no package sub-folder.
    """
    root = Path(path)
    if not root.is_dir():
        raise TerritoryPackageError(f"dataset.path={root}: not a folder; fix: give the folder holding one territory data "
                                    f"package per sub-folder (fedldt partition writes one; {DOC})")
    found = sorted((d for d in root.iterdir() if d.is_dir() and (d / MANIFEST).is_file()), key=lambda d: d.name)
    if not found:
        raise TerritoryPackageError(f"dataset.path={root}: no sub-folder holds a {MANIFEST}; fix: one territory data "
                                    f"package per sub-folder ({DOC})")
    return found


def load_packages(path: str, name: str = "packages") -> list[TerritoryDataset]:
    """Load every territory data package under ``path`` (:func:`package_folders` order).

    Args:
        path: folder holding one package per sub-folder.
        name: dataset name carried into results.

    Returns:
        One :class:`TerritoryDataset` per package (see :func:`fedldt.data.load_package`), all with
        the same channels and units, each with ``extra["valid_range"]`` from its manifest.

    Raises:
        UnusableData: a package is not usable (a problem of severity ``error``, named by code).
        TerritoryPackageError: a package cannot be loaded, two packages have the same territory name, or their
            channels or units differ (one model serves them all).
    """
    out: list[TerritoryDataset] = []
    for folder in package_folders(path):
        ds = load_package(folder)
        errors = [p["code"] for p in ds.extra["problems"] if p["severity"] == "error"]
        if not is_usable(ds.extra["problems"]):
            raise UnusableData(f"{folder}: not usable ({', '.join(errors)}); fix: run `fedldt validate {folder}` and "
                               "correct the data", errors)
        if out and (ds.channels, ds.units) != (out[0].channels, out[0].units):
            raise TerritoryPackageError(f"{folder / MANIFEST}: field 'channels': {list(zip(ds.channels, ds.units))} differ "
                                        f"from {list(zip(out[0].channels, out[0].units))} of {out[0].name}; fix: every "
                                        "territory of a federation declares the same channels and units, in the same order")
        if any(t.name == ds.name for t in out):
            raise TerritoryPackageError(f"{folder / MANIFEST}: field 'name': {ds.name!r} is the name of another package; "
                                        "fix: give each territory its own name")
        ds.extra["dataset"] = name
        out.append(ds)
    return out
