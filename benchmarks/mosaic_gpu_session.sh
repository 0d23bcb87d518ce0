#!/usr/bin/env bash
# Device calls for the Mosaic GPU kernels on an H100, each within a call's 10 minutes:
#   bash benchmarks/mosaic_gpu_session.sh tests    # 4 to 7 minutes:
#     tests/test_mosaic_gpu.py and the shared suite's mosaic_gpu target (-m gpu), split
#     over four pytest processes (one GPU; the tests are small);
#   bash benchmarks/mosaic_gpu_session.sh timing   # about 6 minutes:
#     each kernel of fwd+bwd timed alone beside the config variants
#     (benchmarks/mosaic_gpu.py kernels --sweep), then the issue's benchmark table:
#     d128 at s4096 and s16384, d64 and d256 at s4096.
# Logs and JSON go to $OUT.
set -uo pipefail
source "$(dirname "$0")/device_prologue.sh"

what=${1:?tests or timing}
if [ "$what" = tests ]; then
parts=$(mktemp -d)
python -m pytest --collect-only -q -m gpu tests/test_mosaic_gpu.py tests/test_attention.py \
  -k mosaic_gpu 2>/dev/null | grep "::" > "$parts/all"
split -n r/4 "$parts/all" "$parts/part_"
for part in "$parts"/part_*; do
  # Test ids hold spaces and quotes: pass them to pytest.main as a list, not a command line.
  ( timeout -s KILL "${TEST_TIMEOUT:-450}" python -c "import sys, pytest
ids = [line for line in open(sys.argv[1]).read().splitlines() if line]
sys.exit(pytest.main(['-q', '-m', 'gpu', '-p', 'no:cacheprovider'] + ids))" "$part" \
      > "$OUT/tests_$(basename "$part").log" 2>&1
    echo "pytest $(basename "$part"): exit $?" ) &
done
wait
grep -h "passed\|failed\|error" "$OUT"/tests_part_*.log | grep -v "^E " | tail -8
fi

if [ "$what" = timing ]; then
timeout -s KILL 200 python benchmarks/mosaic_gpu.py kernels --sweep --seqs 4096 16384 \
  > "$OUT/kernels.log" 2>&1; echo "kernels: exit $?"
grep -v "^W" "$OUT/kernels.log" | tail -33

timeout -s KILL 150 python -m flash_jax.bench --implementations mosaic_gpu --head-dims 128 \
  --seq-lens 4096 16384 --json "$OUT/bench_d128.json" > "$OUT/bench_d128.log" 2>&1
echo "bench d128: exit $?"; grep -v "^W\|^\[" "$OUT/bench_d128.log" | tail -11
timeout -s KILL 110 python -m flash_jax.bench --implementations mosaic_gpu --head-dims 64 256 \
  --seq-lens 4096 --json "$OUT/bench_d64_d256.json" > "$OUT/bench_d64_d256.log" 2>&1
echo "bench d64/d256: exit $?"; grep -v "^W\|^\[" "$OUT/bench_d64_d256.log" | tail -11
fi
