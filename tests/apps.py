"""Test Flower apps: the production ClientApp plus test-only mods (:mod:`tests.mods`), shipped as
a FAB so that a real deployment's SuperNodes run them (``LocalFederation.run(..., app_dir=...)``).

:func:`write_test_app` writes an app folder that holds this checkout's ``clients/`` and
``server/`` (the FAB files of the production app), ``fedldt_test_mods.py`` (a copy of
``tests/mods.py``) and ``fedldt_test_app.py``, whose ``app`` is
:func:`clients.client_app.build_app` with the listed mods; its ``pyproject.toml`` is the
checkout's with the ClientApp component and ``fab-include`` pointed at them. The ServerApp is the
production one. Nothing in the production app changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

from fedldt.config import checkout_root
from tests.mods import resolve_mods

APP_MODULE = "fedldt_test_app"
MODS_MODULE = "fedldt_test_mods"


def write_test_app(dest: Path, mods: Sequence[Any]) -> Path:
    """Write a test app folder at ``dest`` whose ClientApp adds ``mods``, applied in order inside
    the egress mod: names in :data:`tests.mods.MODS` or ``[name, {argument: value}]`` pairs of
    :data:`tests.mods.MOD_FACTORIES` (:func:`tests.mods.resolve_mods`; the arguments are JSON
    values, written into the app as JSON).

    Returns:
        ``dest``, to pass as ``app_dir``.

    Raises:
        ValueError: an unknown mod or bad arguments (checked by building the mods here);
        FileExistsError: ``dest`` exists.
    """
    spec = json.loads(json.dumps(list(mods), allow_nan=False))  # JSON values only, as the app reads them
    resolve_mods(spec)  # unknown names and bad arguments fail here, not in the SuperNodes
    root = checkout_root()
    dest = Path(dest)
    dest.mkdir(parents=True)
    for pkg in ("clients", "server"):
        shutil.copytree(root / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(Path(__file__).with_name("mods.py"), dest / f"{MODS_MODULE}.py")
    (dest / f"{APP_MODULE}.py").write_text(
        '"""TEST APP: the production ClientApp with test-only mods (written by tests/apps.py)."""\n\n'
        "import json\n\n"
        "from clients.client_app import build_app\n"
        f"from {MODS_MODULE} import resolve_mods\n\n"
        f"app = build_app(resolve_mods(json.loads({json.dumps(spec)!r})))\n"
    )
    text = (root / "pyproject.toml").read_text()
    prod_component = 'clientapp = "clients.client_app:app"'
    prod_include = 'fab-include = ["clients/**/*.py", "server/**/*.py"]'
    if text.count(prod_component) != 1 or text.count(prod_include) != 1:
        raise RuntimeError("pyproject.toml: the ClientApp component or fab-include changed; update tests/apps.py")
    text = text.replace(prod_component, f'clientapp = "{APP_MODULE}:app"').replace(
        prod_include, f'fab-include = ["clients/**/*.py", "server/**/*.py", "{APP_MODULE}.py", "{MODS_MODULE}.py"]')
    (dest / "pyproject.toml").write_text(text)
    return dest
