#!/usr/bin/env bash
# One device call for the decode kernels on an H200 (about 7 minutes):
# checks (benchmarks/decode_gpu.py check, hlo), the decode benchmark in both protocols
# (python -m flash_jax.bench --decode), and the shared suite's decode and paged cases on
# the triton-gpu target. Logs and JSON go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -e . -q > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -5 "$OUT/install.log"; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv,noheader
timeout 200 python3 benchmarks/decode_gpu.py check > "$OUT/check.log" 2>&1
grep -E "CHECK|Error" "$OUT/check.log" | tail -3
timeout 60 python3 benchmarks/decode_gpu.py hlo 2>&1 | grep HLO
for protocol in loop call; do
  timeout 240 python3 -m flash_jax.bench --decode --protocol "$protocol" \
    --json "$OUT/decode_$protocol.json" > "$OUT/bench_$protocol.log" 2>&1
  echo "== protocol $protocol"; grep -E "^\|" "$OUT/bench_$protocol.log"
done
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_paged.py \
  tests/test_attention.py -k "triton and (decode or paged or t1-s97)" > "$OUT/pytest.log" 2>&1
tail -3 "$OUT/pytest.log"
