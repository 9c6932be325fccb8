"""Fresh Python interpreters for measurements (the peak memory of ``scripts/bench_models.py``).

A process's peak resident set size is only comparable between runs when each starts from a fresh
interpreter; processes start in ``fedldt/launch/`` only (``tests/test_layout.py``), hence this module.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence


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
