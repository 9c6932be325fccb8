"""One entry point for every training mode (used by ``scripts/simulate.py`` and ``scripts/compare.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from fedldt.baselines import MODES, run_centralized, run_local
from fedldt.config import num_territories
from fedldt.engine import train_device
from fedldt.results import check_run_dir
from fedldt.schema import ConfigError


def run_mode(cfg: dict[str, Any], overrides: Sequence[str], run_dir: str | Path, mode: str | None = None) -> dict[str, Any]:
    """Run ``mode`` (default ``cfg["mode"]``) and return its ``summary.json`` content.

    Args:
        cfg: resolved config (see :func:`fedldt.config.resolve_config`).
        overrides: the Hydra overrides that produced ``cfg`` (the federated run re-composes the
            config inside the Flower ServerApp from them).
        run_dir: results folder.
        mode: ``federated`` (Flower simulation engine), ``centralized`` or ``local``.

    Raises:
        ValueError: unknown mode (``mode`` named).
        FileExistsError: ``run_dir`` holds a result file fedldt did not write.
        fedldt.launch.simulation.RunFailed: the federated run failed.
    """
    mode = mode or cfg["mode"]
    run_dir = Path(run_dir).resolve()
    check_run_dir(run_dir)  # before any training: never overwrite what fedldt did not write
    train_device(cfg["train"])  # train.device=cuda on a machine without one: refused before any training
    fed = cfg.get("federation") or {}
    if (mode == "federated" and cfg["train"].get("device") == "cuda" and not fed.get("client_gpus")
            and fed.get("ray_address") is None):
        raise ConfigError("train.device=cuda with federation.client_gpus=0: Ray hides the GPUs from territory actors "
                          "without a GPU share, so every territory would fail; set federation.client_gpus (e.g. 0.5) "
                          "or train.device=auto")
    if mode == "federated":
        from fedldt.launch.simulation import run_simulation  # Flower only where it is needed

        ov = [o for o in overrides if not o.startswith("mode=")] + ["mode=federated"]
        return run_simulation(ov, run_dir, num_territories(cfg), client_cpus=int(cfg["federation"]["client_cpus"]),
                              client_gpus=float(cfg["federation"].get("client_gpus", 0.0)),
                              ray_address=cfg["federation"].get("ray_address"))
    if mode == "centralized":
        return run_centralized({**cfg, "mode": mode}, run_dir)
    if mode == "local":
        return run_local({**cfg, "mode": mode}, run_dir)
    raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
