# Device calls for the unordered backwards (MosaicGPUBlockSizes(atomic_dq=True) and
# TritonConfig(atomic_dq=True)):
#   bash benchmarks/atomic_dq_session.sh tests   # both through the shared gradient and
#                                                # edge tests (~6 min)
#   bash benchmarks/atomic_dq_session.sh time    # the Mosaic GPU kernel beside the dK/dV
#     and dQ kernels it replaces, forward+backward beside cuDNN, and the split-KV kernel at
#     two row tiles (T = 16, 8 query heads a K/V head) beside Triton's and cuDNN (~5 min)
# Logs in $OUT. The tests run over 14 processes (pytest-xdist carried as wheels in .whl,
# the device's README says how): compiling, not the GPU, sets their length.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
bench() {  # bench NAME SECONDS ARGS...: benchmarks/mosaic_gpu.py ARGS, logged to $OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  echo "== $name"
  timeout "$seconds" python3 benchmarks/mosaic_gpu.py "$@" 2>&1 | grep -v Warning \
    | grep -v "^ \|^$\|slow_operation\|onstant fold\|file a bug\|necessarily a bug" \
    | tail -40 | tee "$OUT/$name.log"
}
tests() {  # tests NAME SECONDS -k EXPR [ARGS...]: the shared suite's GPU tests
  local name=$1 seconds=$2; shift 2
  echo "== $name"
  timeout "$seconds" python3 -m pytest -q -m gpu -p no:cacheprovider -p no:benchmark -rfE \
    --tb=short -n 14 tests/test_attention.py tests/test_edges.py "$@" 2>&1 | tail -80 \
    | tee "$OUT/$name.log"
}
step="${1:-tests}"
if [[ "$step" == tests ]]; then
  tests pytest_mosaic_gpu 240 -k "mosaic_gpu-atomic_dq"
  tests pytest_triton 300 -k "triton-atomic_dq"
elif [[ "$step" == time ]]; then
  bench kernels 60 kernels --head-dims 128 --seqs 16384
  bench fwd_bwd 120 variants --atomic-dq --head-dims 128 64 --seqs 4096 16384 --modes fwd_bwd
  for head_dim in 64 256; do
    echo "== decode two row tiles d$head_dim"
    timeout 45 python3 benchmarks/decode_gpu.py compare --shape 8 32768 16 32 4 "$head_dim" \
      --implementation mosaic_gpu --configs '[]' 2>&1 | grep COMPARE | tee -a "$OUT/decode.log"
  done
else
  echo "unknown step $step: tests or time" >&2
  exit 2
fi
