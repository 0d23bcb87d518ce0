#!/usr/bin/env bash
# One device call (about 2 minutes): what a generation decode step costs the host, under
# XLA's default command buffers (CUDA graphs), with them off, and with the smallest graph
# size (benchmarks/decode_step_gpu.py: host, dispatch, queued and device time per step);
# then the Triton split-KV kernel's pipeline stages beside the default on the decode
# problems (benchmarks/decode_gpu.py compare). Its 2026-11-30 H200 results are in
# docs/measurements/2026-11-30_h200_generation.txt and the Triton tuning table's reasons.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
for flags in "" "--xla_gpu_enable_command_buffer=" "--xla_gpu_graph_min_graph_size=1"; do
  echo "== XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" timeout 150 python3 benchmarks/decode_step_gpu.py --layouts mha --repeats 20 2>&1 | grep -v WARNING | grep "^{"
done
timeout 240 python3 benchmarks/decode_gpu.py compare --problems 0 1 2 3 4 5 6 \
  --configs '[{"num_stages_split": 2}, {"num_stages_split": 4}]' 2>&1 | grep COMPARE
