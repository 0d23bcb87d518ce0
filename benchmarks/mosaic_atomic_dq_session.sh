# Device call for the unordered backwards (MosaicGPUBlockSizes(atomic_dq=True) and
# TritonConfig(atomic_dq=True)): the Mosaic GPU one through the shared gradient and edge
# tests, its kernel timed beside the dK/dV and dQ kernels it replaces, forward+backward
# beside cuDNN; the Triton one's GPU tests; and the Mosaic GPU split-KV kernel at two row
# tiles (T = 16, 8 query heads a K/V head) beside Triton's and cuDNN.
#   bash benchmarks/mosaic_atomic_dq_session.sh   (~8 min; logs in $OUT)
# The tests run over 12 processes (pytest-xdist carried as wheels in .whl: the device's
# README says how), since compiling, not the GPU, sets their length.
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
  timeout "$seconds" python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --tb=short -n 12 \
    tests/test_attention.py tests/test_edges.py "$@" 2>&1 | tail -80 | tee "$OUT/$name.log"
}
tests pytest_atomic_dq 240 -k "atomic_dq"
bench kernels 60 kernels --head-dims 128 --seqs 16384
bench fwd_bwd 120 variants --atomic-dq --head-dims 128 64 --seqs 4096 16384 --modes fwd_bwd
for head_dim in 64 256; do
  echo "== decode two row tiles d$head_dim"
  timeout 45 python3 benchmarks/decode_gpu.py compare --shape 8 32768 16 32 4 "$head_dim" \
    --implementation mosaic_gpu --configs '[]' 2>&1 | grep COMPARE | tee -a "$OUT/decode.log"
done
