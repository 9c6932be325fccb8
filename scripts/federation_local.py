"""Run a fedldt pilot as a real federation on this machine: a SuperLink and one SuperNode per
territory, over loopback, with TLS and SuperNode authentication.

    python scripts/federation_local.py pilot=los_loop_3 [train.rounds=N] [seed=N] [hydra.run.dir=DIR]

Same pilots and overrides as scripts/simulate.py, same results folder (summary.json, history.csv,
model.pt, resolved_config.yaml), plus logs/ (superlink.log, supernode-<i>.log, server.log,
processes.json) and territories/territory-<i>/egress.jsonl (what each territory sent).
Every process started is stopped at the end, also on error, Ctrl-C or SIGTERM (exit status 130 / 143).
With ``dataset=packages dataset.path=DIR`` each SuperNode's node config names only its own package,
``data-path=<the i-th package sub-folder of DIR>`` (name order), as territories holding their own data do.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedldt.config import CONF_DIR, num_territories, reads_packages, resolve_config
from fedldt.data import package_folders
from fedldt.launch.loopback import LocalFederation
from fedldt.launch.provenance import begin_run, guard_checkout
from fedldt.launch.simulation import config_errors, interruptible
from fedldt.results import summary_table


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with config_errors():  # fail fast on a bad config or data path, before Flower starts
        resolved = resolve_config(cfg)
    hc = HydraConfig.get()
    overrides = begin_run(hc)  # logs the code and config folders; carries --config-dir to Flower
    run_dir = Path(hc.runtime.output_dir)
    with interruptible(f" (see {run_dir / 'logs' / 'processes.json'})"):
        # Every territory reads the data from its own node config: its own package (data-path) when the
        # pilot reads packages, else the folder of datasets (data-root), here the same folder for all.
        path = Path(resolved["dataset"]["path"])
        own = {"data_paths": package_folders(path)} if reads_packages(resolved) else {"data_root": path.parent}
        with LocalFederation(run_dir, num_territories(resolved), **own) as fed:
            summary = fed.run(overrides, run_dir)
    print()
    print(summary_table(summary))
    print(f"\nresults: {run_dir}")


if __name__ == "__main__":
    guard_checkout(__file__)  # this checkout's fedldt, or a clear error naming both
    main()
