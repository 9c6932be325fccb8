"""Which code and which configs ran a run, and the guard that a script runs its own checkout's code.

Every run records (in its log and in ``summary.json`` under ``provenance``, written by
:func:`fedldt.results.write_run_outputs`):

* ``fedldt_version`` and ``fedldt_package``: the version and folder of the imported ``fedldt``;
* ``checkout``: :func:`fedldt.config.checkout_root`, the checkout whose ``conf/``, ``clients/``
  and ``server/`` (the Flower app) the run used;
* ``git_commit`` and ``git_dirty``: the checkout's ``HEAD`` and whether it has uncommitted
  changes or untracked files (``null`` when the checkout is not a git work tree or git is
  not installed);
* ``config_dirs``: the config folders searched, fedldt's ``conf/`` first, then the user's own
  (``--config-dir DIR``, or ``hydra.searchpath``).

A script (``scripts/simulate.py``, ``compare.py``, ``sweep.py``, ``federation_local.py``) runs
with the ``fedldt`` of its Python environment, and a federated run submits that ``fedldt``'s
checkout as the Flower app. :func:`guard_checkout` refuses a script of one checkout run with
an environment installed from another (the run would silently use the other checkout's code
and configs), naming both and the fix. It lives in :mod:`fedldt.launch` because it asks
``git`` (a process).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import fedldt
from fedldt.config import CONF_DIR, checkout_root, record_config_sources, searched_config_dirs, searchpath_override

log = logging.getLogger(__name__)


class CheckoutMismatch(RuntimeError):
    """A script of one fedldt checkout runs with the ``fedldt`` installed from another."""


def _git(root: Path, *args: str) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(root: str | Path) -> dict[str, Any]:
    """``{"git_commit": HEAD sha (40 hex) or None, "git_dirty": bool or None}`` of the git work tree
    at ``root`` (``None``, ``None`` when ``root`` is not the top of a git work tree or git is not
    installed). Dirty = tracked files changed or files git does not ignore added."""
    root = Path(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return {"git_commit": None, "git_dirty": None}
    head = _git(root, "rev-parse", "--verify", "HEAD")
    status = _git(root, "status", "--porcelain")
    return {"git_commit": head.strip() if head else None, "git_dirty": None if status is None else bool(status.strip())}


def run_provenance() -> dict[str, Any]:
    """The ``provenance`` block of ``summary.json`` (see the module docstring)."""
    root = checkout_root()
    return {"fedldt_version": fedldt.__version__, "fedldt_package": str(Path(fedldt.__file__).resolve().parent),
            "checkout": str(root), **git_state(root), "config_dirs": searched_config_dirs()}


def provenance_line(prov: dict[str, Any] | None = None) -> str:
    """One log line: ``fedldt 0.1.0, checkout /x (git 1a2b3c4d5e6f, dirty), config folders /x/conf, /me/conf``."""
    p = run_provenance() if prov is None else prov
    git = "not a git checkout" if p["git_commit"] is None else \
        f"git {p['git_commit'][:12]}{', uncommitted changes' if p['git_dirty'] else ''}"
    return (f"fedldt {p['fedldt_version']}, checkout {p['checkout']} ({git}), config folders "
            f"{', '.join(p['config_dirs']) or '(none composed)'}")


def script_checkout(script: str | Path) -> Path:
    """The checkout a script file belongs to (``<checkout>/scripts/<name>.py``)."""
    return Path(script).resolve().parent.parent


def check_checkout(script: str | Path) -> None:
    """Refuse a fedldt script of one checkout run with the ``fedldt`` of another.

    A script outside a fedldt checkout (no ``fedldt/__init__.py`` beside its folder) is not checked.

    Raises:
        CheckoutMismatch: names the script's checkout, the environment's, and the fix.
    """
    mine = script_checkout(script)
    installed = checkout_root().resolve()
    if (mine / "fedldt" / "__init__.py").is_file() and mine != installed:
        raise CheckoutMismatch(
            f"{Path(script).resolve()} belongs to the fedldt checkout {mine}, but this Python environment "
            f"({sys.executable}) imports fedldt from {installed}: the run would use the code, configs and Flower "
            f"app of {installed}, not of {mine}. Fix: install this checkout into the environment "
            f"(`{sys.executable} -m pip install -e {mine}`), or run {installed / 'scripts' / Path(script).name} instead.")


def guard_checkout(script: str | Path) -> None:
    """:func:`check_checkout` for a script's ``__main__``: on a mismatch, print the reason on stderr
    and exit with status 2 before Hydra composes anything."""
    try:
        check_checkout(script)
    except CheckoutMismatch as e:
        print(f"fedldt: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def begin_run(hydra_config: Any) -> list[str]:
    """What a script's ``@hydra.main`` does first: record the config folders Hydra searched, log
    :func:`provenance_line`, and return the overrides that recompose this config elsewhere (the
    ServerApp of a federated run): the task overrides plus ``hydra.searchpath`` of the user's
    folders (``--config-dir``), which Flower's run config then carries.

    Args:
        hydra_config: ``HydraConfig.get()`` of the running script.
    """
    sources = [{"path": s.path, "schema": s.schema, "provider": s.provider} for s in hydra_config.runtime.config_sources]
    dirs = record_config_sources(sources)
    log.info("[fedldt] %s", provenance_line())
    extra = [d for d in dirs if Path(d).resolve() != CONF_DIR.resolve()]
    return list(hydra_config.overrides.task) + ([searchpath_override(extra)] if extra else [])

