#!/usr/bin/env bash
# The GPU pass: on a machine with a CUDA device, in at most 8 minutes, the device-dependent tests,
# 4 trials sharing one GPU against one at a time (target >= 3x throughput), train.amp and
# train.compile, a positive-control run and pretraining on the GPU; ONE JSON of figures,
# gpu_check.json, in --out (default: $OUT if set, else benchmarks/results). Each check and what
# it reports: benchmarks/gpu_check.py.
#
#   benchmarks/gpu_check.sh [--out DIR] [--work DIR]   # on the GPU machine
#   benchmarks/gpu_check.sh --dry-run [--out DIR]      # anywhere, seconds: every command parses
#
# Without a CUDA device it stops at once with one line and exit status 2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash -n "$0"
exec timeout --kill-after=10 480 python benchmarks/gpu_check.py "$@"
