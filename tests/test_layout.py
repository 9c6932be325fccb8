"""The layout's two rules, read from the source with ``ast`` (nothing is imported):

* only ``clients/`` and ``server/`` import Flower's app APIs (``flwr.app``, ``flwr.clientapp``,
  ``flwr.serverapp``); ``fedldt/`` never imports ``clients`` or ``server``;
* only ``fedldt/launch/`` starts processes (``subprocess``, ``multiprocessing``, ``os.system``,
  ``os.exec*``, ``os.spawn*``, ``os.fork``, ``os.posix_spawn*``, ``Popen``).

``tests/`` drive the apps and start real deployments, so they are not held to either rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_APP_APIS = ("flwr.app", "flwr.clientapp", "flwr.serverapp")
APPS = ("clients", "server")
PROCESS_MODULES = ("subprocess", "multiprocessing", "concurrent.futures.process")
PROCESS_CALLS = ("system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp")  # os.<name>
PROCESS_PREFIXES = ("exec", "spawn")  # os.execv, os.spawnl, ...


def _within(name: str, packages) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def imported_modules(source: str) -> set[str]:
    """Every module an ``import``/``from ... import`` statement names (absolute names only;
    ``from a import b`` yields ``a`` and ``a.b``, since ``b`` may be a module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def process_starts(source: str) -> list[str]:
    """What in ``source`` starts (or can start) a process: imports of :data:`PROCESS_MODULES`,
    ``os.system``/``os.exec*``/``os.spawn*``/``os.fork``/``os.posix_spawn*`` (as attributes of
    ``os`` or imported from it) and any name, attribute or import ``Popen``; sorted, once each."""
    found = [m for m in sorted(imported_modules(source)) if _within(m, PROCESS_MODULES)]

    def is_process_call(name: str) -> bool:
        return name in PROCESS_CALLS or name.startswith(PROCESS_PREFIXES)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            if node.attr == "Popen":
                found.append("Popen")
            elif isinstance(node.value, ast.Name) and node.value.id == "os" and is_process_call(node.attr):
                found.append(f"os.{node.attr}")
        elif isinstance(node, ast.Name) and node.id == "Popen":
            found.append("Popen")
        elif isinstance(node, ast.ImportFrom):
            found += [f"os.{a.name}" for a in node.names if node.module == "os" and is_process_call(a.name)]
            found += ["Popen" for a in node.names if a.name == "Popen"]
    return sorted(set(found))


def _sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_scanners_see_what_they_look_for():
    """Known answers, so that the rules below could fail."""
    assert imported_modules("import flwr.app\nfrom flwr.serverapp import Grid\nfrom . import x\n") == {
        "flwr.app", "flwr.serverapp", "flwr.serverapp.Grid"}
    assert _within("flwr.serverapp.strategy", FLOWER_APP_APIS) and not _within("flwr.common", FLOWER_APP_APIS)
    assert not _within("flwr.application", FLOWER_APP_APIS) and _within("server.rounds", APPS)
    src = ("import subprocess\nimport os\nfrom os import execv\nos.system('x')\nos.spawnl(0, 'x')\n"
           "from psutil import Popen\nmultiprocessing_free = 1\n")
    assert process_starts(src) == ["Popen", "os.execv", "os.spawnl", "os.system", "subprocess"]
    assert process_starts("import os\nos.path.join('a')\nos.environ.get('x')\nimport psutil\n") == []
    assert process_starts("from concurrent.futures import ProcessPoolExecutor\n") == []  # not a module import
    assert process_starts("import concurrent.futures.process\n") == ["concurrent.futures.process"]


@pytest.mark.parametrize("path", _sources("fedldt", "scripts"), ids=_rel)
def test_only_the_apps_import_flowers_app_apis(path):
    """fedldt/ (the library) and scripts/ import no ``flwr.app``/``flwr.clientapp``/``flwr.serverapp``,
    and fedldt/ imports neither app folder."""
    modules = imported_modules(path.read_text())
    assert not [m for m in modules if _within(m, FLOWER_APP_APIS)], f"{_rel(path)} imports Flower's app APIs"
    if _rel(path).startswith("fedldt/"):
        assert not [m for m in modules if _within(m, APPS)], f"{_rel(path)} imports clients/ or server/"


@pytest.mark.parametrize("path", [p for p in _sources("fedldt", "clients", "server", "scripts")
                                  if not _rel(p).startswith("fedldt/launch/")], ids=_rel)
def test_only_fedldt_launch_starts_processes(path):
    assert process_starts(path.read_text()) == [], f"{_rel(path)} starts processes; that belongs in fedldt/launch/"


def test_fedldt_launch_is_where_processes_start():
    """The rule is not empty: the launchers are found by the same scanner."""
    starts = {_rel(p): process_starts(p.read_text()) for p in _sources("fedldt/launch")}
    assert "subprocess" in starts["fedldt/launch/simulation.py"] and "subprocess" in starts["fedldt/launch/loopback.py"]


def test_the_wheel_installs_fedldt_only_and_the_apps_are_not_packages_of_it():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"] == ["fedldt"]
    assert project["tool"]["flwr"]["app"]["components"] == {"serverapp": "server.server_app:app",
                                                           "clientapp": "clients.client_app:app"}
    assert project["tool"]["flwr"]["app"]["fab-include"] == ["clients/**/*.py", "server/**/*.py"]
