# One device call: the price of determinism. flash_jax's backward (deterministic, bitwise
# reproducible: checked) beside cuDNN's default and cuDNN under XLA's determinism switch.
source benchmarks/device_prologue.sh
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py \
  -k "deterministic and gpu" 2>&1 | tail -3
timeout 360 python3 -m flash_jax.bench --seq-lens 4096 16384 --head-dims 128 --modes fwd_bwd \
  --implementations mosaic_gpu --cudnn-deterministic --repeats 10 \
  --json "$OUT/determinism.json" "$@" 2>&1 | grep -v Warning | tail -12
