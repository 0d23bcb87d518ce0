#!/usr/bin/env bash
# One device call on a multi-GPU host (issue: ring and sharded attention on two GPUs):
#   bash benchmarks/multi_gpu.sh scaling      # ring vs one GPU at 32k-128k, checked and timed
#   bash benchmarks/multi_gpu.sh fit partition
# Logs go to $OUT/ring_<mode>.log.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
source "$(dirname "$0")/device_prologue.sh"
nvidia-smi topo -m 2>&1 | head -4
for mode in "$@"; do
  timeout "${MODE_TIMEOUT:-560}" python benchmarks/ring_gpu.py "$mode" 2>&1 | tee "$OUT/ring_$mode.log" | grep -v "^WARNING"
  echo "== $mode exit ${PIPESTATUS[0]}"
done
