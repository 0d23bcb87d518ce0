#!/usr/bin/env bash
# One device call for mosaic_gpu's head dims and junk keys on an H200 (about 9 minutes):
# the GPU tests of tests/test_mosaic_gpu.py (padded head dims 80/96/112/192 and Hv != H,
# NaN/inf past kv_lengths), the shared suite's GPU cases, then the bench at s4k for the
# padded head dims beside cuDNN (where jax.nn serves Hv == H) and Triton. Logs to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
timeout "${TEST_TIMEOUT:-330}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_mosaic_gpu.py tests/test_attention.py tests/test_paged.py \
  ${TEST_FILTER:+-k "$TEST_FILTER"} > "$OUT/pytest.log" 2>&1
grep -E "passed|failed" "$OUT/pytest.log" | tail -2; grep -E "^FAILED|^ERROR" "$OUT/pytest.log" | head -20
timeout "${BENCH_TIMEOUT:-200}" python3 -m flash_jax.bench --seq-lens 4096 \
  --head-dims ${HEAD_DIMS:-192:128 192 96 80} --implementations mosaic_gpu triton \
  --json "$OUT/head_dims.json" > "$OUT/bench.log" 2>&1
grep -E "^(fwd|mode)" "$OUT/bench.log"; tail -3 "$OUT/bench.log" | grep -v "^fwd"
