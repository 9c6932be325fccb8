"""fedldt ServerApp: composes the pilot config and runs :func:`server.rounds.run_federated`.

Run config keys (``pyproject.toml`` ``[tool.flwr.app.config]``, override with ``flwr run -c``):
``hydra-overrides`` (a JSON list or space-separated Hydra overrides, e.g. ``pilot=los_loop_3``; a
``hydra.searchpath=["file:///abs/dir"]`` among them adds the user's config folders)
and ``run-dir`` (absolute results folder; empty = ``<checkout>/outputs/flwr-run/<run id>``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedldt.config import checkout_root, compose_config, parse_overrides, resolve_config
from fedldt.launch.provenance import provenance_line
from server.rounds import run_federated

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    overrides = parse_overrides(str(context.run_config.get("hydra-overrides", "")))
    cfg = resolve_config(compose_config(overrides), require_data=False)  # the data is on the territories
    print(f"[fedldt] {provenance_line()}", flush=True)  # the code and config folders of this run (server.log)
    run_dir = str(context.run_config.get("run-dir", "")) or str(checkout_root() / "outputs" / "flwr-run" / str(context.run_id))
    run_federated(grid, cfg, Path(run_dir).resolve())
