#!/usr/bin/env bash
# GPU check for a machine with an NVIDIA GPU (issue 15, item 5), in under 5 minutes:
#   1. the CUDA build of torch sees the GPU;
#   2. local training of los_loop_3 (2 rounds) on the GPU and on the CPU: wall time and test MAE;
#   3. one federated run (2 rounds) with each simulated territory given half a GPU.
# Results (summary.json of each run, timings) go to ${OUT:-outputs/bench_gpu}/; the last lines print
# a table. Run from the checkout after `make install` with a CUDA build of torch in .venv
# (the CPU constraint in constraints.txt installs the CPU build: `pip install torch==2.13.0
# --index-url https://download.pytorch.org/whl/cu126` first on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-outputs/bench_gpu}
mkdir -p "$OUT"
$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('torch', torch.__version__, 'cuda', ok, torch.cuda.get_device_name(0) if ok else ''); sys.exit(0 if ok else 3)" \
  || { echo "no CUDA device visible to torch: nothing to check here" >&2; exit 3; }
run() {  # name, overrides...
  local name=$1; shift
  local t0=$EPOCHREALTIME
  $PY scripts/simulate.py pilot=los_loop_3 train.rounds=2 "hydra.run.dir=$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local t1=$EPOCHREALTIME
  $PY - "$OUT/$name/summary.json" "$name" "$t0" "$t1" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<22} wall {float(sys.argv[4]) - float(sys.argv[3]):7.1f} s   test MAE {s['test']['mae']['all']:.4f}")
EOF
}
run local-cuda mode=local train.device=cuda
run local-cpu mode=local train.device=cpu
run federated-cuda train.device=cuda federation.client_gpus=0.5
