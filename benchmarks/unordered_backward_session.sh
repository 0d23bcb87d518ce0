# Device calls for what was built without a GPU: the Triton unordered backward
# (TritonConfig(atomic_dq=True)) and the Mosaic GPU split-KV kernel's two-row-tile case.
#   bash benchmarks/unordered_backward_session.sh tests   # both on the GPU (about 4 min)
#   bash benchmarks/unordered_backward_session.sh tune    # the tuner's Triton bwd group,
#                                                         # then the bench with its table
# Logs and the tuned table go to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
step="${1:-tests}"

if [[ "$step" == tests ]]; then
  # The atomic-dQ target joins the shared gradient tests and the edge tests.
  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention.py \
    tests/test_edges.py -k atomic_dq 2>&1 | tail -8 | tee "$OUT/pytest_atomic_dq.log"
  # Decode-shaped calls with more than 64 packed rows take two row tiles.
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_mosaic_gpu.py \
    -k split_kv 2>&1 | tail -8 | tee "$OUT/pytest_split_kv.log"
elif [[ "$step" == tune ]]; then
  # atomic_dq off and on over the paper protocol's forward+backward problems; the
  # winners, with their timings as reasons, are a table the bench then reads.
  timeout 330 python3 -m flash_jax.tune --implementation triton --groups bwd \
    --out "$OUT/triton_bwd.json" 2>&1 | grep -v Warning | tail -30 | tee "$OUT/tune.log"
  for table in shipped tuned; do
    path=""; [[ "$table" == tuned ]] && path="$OUT/triton_bwd.json"
    FLASH_JAX_TUNING_PATH="$path" timeout 240 python3 -m flash_jax.bench \
      --seq-lens 4096 16384 --head-dims 64 128 256 --modes fwd_bwd --implementations triton \
      --repeats 10 --json "$OUT/bench_$table.json" 2>&1 | grep -v Warning | tail -16 \
      | tee "$OUT/bench_$table.log"
  done
else
  echo "unknown step $step: tests or tune" >&2
  exit 2
fi
