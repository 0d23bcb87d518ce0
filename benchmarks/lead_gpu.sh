#!/usr/bin/env bash
# One device call for the lead's GPU checks: the Flax example at sequence 4096 (flash vs
# stock Flax attention), ring/sharding scripts on one GPU, and the jnp implementations'
# share of the suite on the GPU. Logs go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . -q > "$OUT/install.log" 2>&1 || echo "install failed"
python -c "import jax, flax, flash_jax; print(jax.__version__, flax.__version__, jax.devices())"
for attention in flash flax; do
  timeout 170 python examples/train_lm.py --attention "$attention" --seq-len 4096 --batch 8 \
    --layers 8 --d-model 1024 --heads 8 --steps 20 --log-every 10 --data-mb 4 \
    2>&1 | tee "$OUT/train_$attention.log" | grep -E "SUMMARY|implementation|Error|error" | tail -5
done
for mode in check partition time; do
  timeout 120 python benchmarks/ring_gpu.py "$mode" 2>&1 | tail -15 | tee "$OUT/ring_$mode.log"
done
timeout 150 python -m pytest tests/test_attention.py tests/test_api.py -q -x -k "(xla or chunked) and not bkv48 and not interpret" \
  -p no:cacheprovider 2>&1 | tail -8 | tee "$OUT/pytest_jnp_gpu.log"
