# Device call for the Mosaic GPU unordered backward (MosaicGPUBlockSizes(atomic_dq=True)):
# its accuracy on benchmarks/mosaic_gpu.py's cases, its kernel timed beside the dK/dV and
# dQ kernels it replaces (with the dQ matmul in the update's scope or in its own), and
# forward+backward beside cuDNN.   bash benchmarks/mosaic_atomic_dq_session.sh   (~9 min)
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"
run() {  # run NAME SECONDS ARGS...: benchmarks/mosaic_gpu.py ARGS, logged to $OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  echo "== $name"
  timeout "$seconds" python3 benchmarks/mosaic_gpu.py "$@" 2>&1 | grep -v Warning \
    | grep -v "^ " | tail -40 | tee "$OUT/$name.log"
}
run check 150 check --atomic-dq
run check_own_scope 80 check --atomic-dq --dq-own-scope --cases 0 1 2 7
run kernels 110 kernels --head-dims 128 --seqs 16384
run kernels_own_scope 90 kernels --head-dims 128 --seqs 16384 --dq-own-scope
run fwd_bwd 150 variants --atomic-dq --head-dims 128 64 --seqs 4096 16384 --modes fwd_bwd
