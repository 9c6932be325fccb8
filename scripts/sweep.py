"""Federated runs of models x strategies (x personalization) on one pilot, with one seed.

    python scripts/sweep.py pilot=los_loop_3 [sweep.publish_dir=docs/results/los_loop_3]
                            [sweep.models=[dcrnn,gwnet]] [train.rounds=N] [seed=N]

The combinations are ``sweep.models`` x ``sweep.strategies`` (conf/config.yaml). Writes
models_strategies.json and models_strategies.md to the Hydra run directory (each run in its own
subfolder) after every run, and copies them to ``sweep.publish_dir`` when set. Ctrl-C or SIGTERM stops every process started
(exit status 130 / 143).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedldt.config import CONF_DIR, checkout_path, resolve_config
from fedldt.launch.provenance import begin_run, guard_checkout
from fedldt.launch.simulation import config_errors, interruptible
from fedldt.sweep import ARTIFACTS, run_sweep


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with config_errors():
        resolved = resolve_config(cfg)
    hc = HydraConfig.get()
    overrides = begin_run(hc)  # logs the code and config folders; carries --config-dir to Flower
    publish = checkout_path(resolved["sweep"].get("publish_dir"))
    with interruptible():
        run_sweep(resolved, overrides, hc.runtime.output_dir, publish)
    print((Path(hc.runtime.output_dir) / ARTIFACTS[1]).read_text())
    print(f"results: {hc.runtime.output_dir}" + (f" (published to {publish})" if publish else ""))


if __name__ == "__main__":
    guard_checkout(__file__)  # this checkout's fedldt, or a clear error naming both
    main()
