#!/usr/bin/env bash
# One single-GPU device call: the Flax example at sequence 4096 (flash vs stock Flax
# attention), the suite's GPU targets, and the combined benchmark
# table at head dim 128 (every kernel beside cuDNN in one process). Logs go to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
python -c "import jax, flax, flash_jax; print(jax.__version__, flax.__version__, jax.devices())"
for attention in flash flax; do
  timeout 150 python examples/train_lm.py --attention "$attention" --seq-len 4096 --batch 8 \
    --layers 8 --d-model 1024 --heads 8 --steps 20 --log-every 10 --data-mb 4 \
    > "$OUT/train_$attention.log" 2>&1
  grep -E "SUMMARY|implementation|Error" "$OUT/train_$attention.log" | tail -4
done
# The GPU targets of the suite (-m gpu; without it pytest deselects them).
timeout "${TEST_TIMEOUT:-240}" python -m pytest tests/test_attention.py tests/test_mosaic_gpu.py \
  tests/test_triton.py -m gpu -q -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/pytest_gpu.log"
timeout 200 python -m flash_jax.bench --seq-lens 4096 16384 --head-dims 128 \
  --implementations mosaic_gpu triton --warmup 2 --repeats 10 --json "$OUT/bench.json" \
  2>&1 | grep -v "^W" | tee "$OUT/bench.log" | tail -40
