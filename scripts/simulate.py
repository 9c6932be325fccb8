"""Run a fedldt pilot: federated on Flower's simulation engine (one SuperNode per territory),
or one of the reference modes on the same territory splits.

    python scripts/simulate.py pilot=los_loop_3 [mode=federated|centralized|local]
                               [train.rounds=N] [seed=N] [hydra.run.dir=DIR] [resume=RUN_DIR]

Results (summary.json, history.csv, model.pt, resolved_config.yaml, logs/) go to the Hydra run
directory (default outputs/<pilot>/<date>_<time>); with resume=RUN_DIR (a federated run that
stopped) the run continues after RUN_DIR's checkpoint and its results go into RUN_DIR. Ctrl-C or SIGTERM stops every process started
(exit status 130 / 143).
"""

from __future__ import annotations


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedldt.checkpoint import resume_folder
from fedldt.config import CONF_DIR, resolve_config
from fedldt.launch.provenance import begin_run, guard_checkout
from fedldt.launch.simulation import config_errors, interruptible
from fedldt.results import summary_table
from fedldt.runner import run_mode


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    with config_errors():  # fail fast on a bad config, data path or checkpoint, before Flower starts
        resolved = resolve_config(cfg)
        run_dir = resume_folder(resolved) or hc.runtime.output_dir
    overrides = begin_run(hc)  # logs the code and config folders; carries --config-dir to Flower
    if resolved.get("resume"):  # the ServerApp runs elsewhere: it gets the absolute folder
        overrides = [o for o in overrides if not o.startswith("resume=")] + [f"resume={run_dir}"]
    with interruptible():
        summary = run_mode(resolved, overrides, run_dir)
    print()
    print(summary_table(summary))
    print(f"\nresults: {run_dir}")


if __name__ == "__main__":
    guard_checkout(__file__)  # this checkout's fedldt, or a clear error naming both
    main()
