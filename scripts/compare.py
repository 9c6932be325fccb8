"""Compare training methods (federated, finetune, ditto, fedper, centralized, local) with the
reference forecasts (fedldt.results.REFERENCES) on the same territory splits, over one or more seeds.

    python scripts/compare.py pilot=los_loop_3 [compare.seeds=[0,1,2]] \
        [compare.methods=[federated,finetune,ditto,centralized,local]] [compare.contribution=true] \
        [compare.publish_dir=docs/results/los_loop_3]

Writes comparison.json, comparison.md and PNG plots to the Hydra run directory (the runs in its
seed<k>/<method>/ subfolders, leave-one-out runs in seed<k>/without-<territory>/), and copies the
artifacts to ``compare.publish_dir`` when set. Ctrl-C or SIGTERM stops every process started (exit
status 130 / 143). docs/evaluation.md ("Comparisons over seeds") explains the report.
"""

from __future__ import annotations


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedldt.compare import run_comparison
from fedldt.config import CONF_DIR, checkout_path, resolve_config
from fedldt.launch.provenance import begin_run, guard_checkout
from fedldt.launch.simulation import config_errors, interruptible


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    with config_errors():
        resolved = resolve_config(cfg)
    hc = HydraConfig.get()
    overrides = begin_run(hc)  # logs the code and config folders; carries --config-dir to Flower
    publish = checkout_path(resolved.get("compare", {}).get("publish_dir"))
    with interruptible():
        run_comparison(resolved, overrides, hc.runtime.output_dir, publish)
    print((__import__("pathlib").Path(hc.runtime.output_dir) / "comparison.md").read_text())
    print(f"results: {hc.runtime.output_dir}" + (f" (published to {publish})" if publish else ""))


if __name__ == "__main__":
    guard_checkout(__file__)  # this checkout's fedldt, or a clear error naming both
    main()
