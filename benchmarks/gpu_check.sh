#!/usr/bin/env bash
# The GPU pass: on a machine with a CUDA device, in at most 8 minutes, the device-dependent tests,
# 4 trials sharing one GPU against one at a time (target >= 3x throughput), train.amp and
# train.compile, a positive-control run and pretraining on the GPU; ONE JSON of figures,
# gpu_check.json, in --out (default: $OUT if set, else benchmarks/results). Each check and what
# it reports: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [--out DIR] [--work DIR]   # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run [--out DIR]      # anywhere, seconds: every command parses
#   benchmarks/gpu_check.sh --long [--only long_reconstruction]
#
# --long (opt-in) adds the long reconstruction after the pass: the MLP positive control at n = 500 with
# 50,000 steps (Haim et al. 2022), which does not fit in the 8 minutes: it has its own limit of 15
# minutes (LONG_S in gpu_check.py), and the overall limit grows from 8 to 23 minutes. --only NAME,...
# runs just the named checks (e.g. the long stage alone: --long --only long_reconstruction).
# Without a CUDA device it stops at once with one line and exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash -n "$0"
limit=480
for arg in "$@"; do
    if [[ "$arg" == "--long" ]]; then limit=$((480 + 900)); fi  # + LONG_S of gpu_check.py
done
exec timeout --kill-after=10 "$limit" python benchmarks/gpu_check.py "$@"
