#!/usr/bin/env bash
# One device call for decoding on an H200 (about 9 minutes): checks (decode_gpu.py check,
# hlo), the decode benchmark (python -m flash_jax.bench --decode), the shared suite's
# decode, paged, junk-key, sinks and bias cases on the GPU targets, and end-to-end
# generation (benchmarks/generate_gpu.py). Logs and JSON go to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
timeout 150 python3 benchmarks/decode_gpu.py check > "$OUT/check.log" 2>&1
grep -E "CHECK|Error" "$OUT/check.log" | tail -3
timeout 60 python3 benchmarks/decode_gpu.py hlo 2>&1 | grep HLO
for protocol in ${PROTOCOLS:-loop}; do
  timeout 200 python3 -m flash_jax.bench --decode --protocol "$protocol" \
    --json "$OUT/decode_$protocol.json" > "$OUT/bench_$protocol.log" 2>&1
  echo "== protocol $protocol"; grep -E "^\|" "$OUT/bench_$protocol.log"
done
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_paged.py tests/test_attention.py \
  -k "(triton and (decode or paged or junk or sinks or t1-s97 or bias)) or (mosaic_gpu and (junk or sinks or t1-s97))" \
  > "$OUT/pytest.log" 2>&1
grep -E "passed|failed" "$OUT/pytest.log" | tail -2; grep -E "^FAILED" "$OUT/pytest.log" | head
timeout "${GENERATE_TIMEOUT:-200}" python3 benchmarks/generate_gpu.py \
  --new-tokens "${NEW_TOKENS:-256}" --caches paged flax --budget-s 170 \
  --json "$OUT/generate.json" > "$OUT/generate.log" 2>&1
tail -12 "$OUT/generate.log"
