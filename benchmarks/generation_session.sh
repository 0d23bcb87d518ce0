#!/usr/bin/env bash
# One device call for issue 17's generation problem (about 6 minutes): where a decode
# step's time goes (benchmarks/decode_step_gpu.py: host vs device time, large copies,
# kernel time by name) and end-to-end generation with NEW_TOKENS new tokens per prompt
# (benchmarks/generate_gpu.py), then the decode kernels' profile beside cuDNN
# (benchmarks/decode_gpu.py profile). Logs and JSON go to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
timeout "${STEP_TIMEOUT:-200}" python3 benchmarks/decode_step_gpu.py --profile "$OUT/profile" \
  --json "$OUT/decode_step.json" > "$OUT/decode_step.log" 2>&1
cat "$OUT/decode_step.log" | grep -v "^WARNING" | head -80
rm -rf "$OUT/profile"
timeout "${GENERATE_TIMEOUT:-300}" python3 benchmarks/generate_gpu.py \
  --new-tokens "${NEW_TOKENS:-1024}" --caches ${CACHES:-paged flax} --budget-s 280 \
  --json "$OUT/generate.json" > "$OUT/generate.log" 2>&1
tail -12 "$OUT/generate.log"
timeout "${PROFILE_TIMEOUT:-150}" python3 benchmarks/decode_gpu.py profile --problems 0 1 2 4 5 \
  --trace-dir /tmp/decode_traces > "$OUT/decode_profile.log" 2>&1
grep -E "PROFILE|Error" "$OUT/decode_profile.log"
