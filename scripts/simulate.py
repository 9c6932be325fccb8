"""Run a fedldt pilot on Flower's simulation engine: one simulated SuperNode per territory.

    python scripts/simulate.py pilot=los_loop_3 [train.rounds=N] [seed=N] [hydra.run.dir=DIR]

Results (summary.json, history.csv, model.pt, resolved_config.yaml, logs/) go to the Hydra run
directory (default outputs/<pilot>/<date>_<time>).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedldt.config import CONF_DIR, num_territories, resolve_config
from fedldt.federation.launch import RunFailed, run_simulation
from fedldt.results import summary_table


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    resolved = resolve_config(cfg)  # fail fast on a bad config or data path, before Flower starts
    hc = HydraConfig.get()
    try:
        summary = run_simulation(list(hc.overrides.task), hc.runtime.output_dir, num_territories(resolved),
                                 client_cpus=int(resolved["federation"]["client_cpus"]))
    except RunFailed as e:
        print(f"fedldt: run failed: {e}", file=sys.stderr)
        sys.exit(1)
    print()
    print(summary_table(summary))
    print(f"\nresults: {hc.runtime.output_dir}")


if __name__ == "__main__":
    main()
