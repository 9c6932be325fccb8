"""Fresh Python interpreters for measurements (the peak memory of ``scripts/bench_models.py``).

A process's peak resident set size is only comparable between runs when each starts from a fresh
interpreter; processes start in ``fedldt/launch/`` only (``tests/test_layout.py``), hence this module.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence


def run_python(script: str | Path, args: Sequence[str], env: Mapping[str, str] | None = None,
               timeout: float = 1800.0) -> subprocess.CompletedProcess[str]:
    """Run ``python script *args`` with this interpreter and wait for it.

    Args:
        script: the Python file to run.
        args: its arguments.
        env: variables added to this process's environment (e.g. ``OMP_NUM_THREADS``).
        timeout: seconds before the child is killed.

    Returns:
        The finished process, stdout and stderr captured as text.

    Raises:
        TimeoutError: the child ran longer than ``timeout`` (it was killed).
    """
    try:
        return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                              env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{script} ran longer than {timeout:.0f} s and was killed") from None


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on: CPU model (``/proc/cpuinfo``, else ``platform.processor()``),
    cores, memory in GiB, the load average at the call, Python, torch and flwr versions."""
    import flwr
    import psutil
    import torch

    cpu = platform.processor() or None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "loadavg": list(os.getloadavg()), "python": platform.python_version(), "torch": torch.__version__,
            "flwr": flwr.__version__}


def write_report(out: Path, name: str, report: Mapping[str, Any], text: str) -> None:
    """``<out>/<name>.json`` (valid JSON: NaN or infinity refused) and ``<out>/<name>.md`` of a
    benchmark; the markdown is printed too.

    Raises:
        ValueError: ``report`` holds NaN or infinity.
    """
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / f"{name}.md").write_text(text)
    print(text)
    print(f"written: {out / (name + '.json')}, {out / (name + '.md')}")
