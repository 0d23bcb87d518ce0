# One device call: bias and dense masks on mosaic_gpu, checked (the shared suite's bias and
# mask cases, the edge probes, dispatch) and timed beside cuDNN (benchmarks/bias_mask_gpu.py).
source benchmarks/device_prologue.sh
run_tests() { timeout "$1" python3 -m pytest -q -m gpu -p no:cacheprovider "${@:2}" 2>&1 | tail -25; }
run_tests 240 tests/test_attention.py -k "mosaic_gpu and (bias or mask or nothing)"
run_tests 150 tests/test_edges.py -k "mosaic_gpu"
run_tests 60 tests/test_mosaic_gpu.py -k "default_on_hopper"
timeout 240 python3 benchmarks/bias_mask_gpu.py "$@" 2>&1 | tee "$OUT/bias_mask.txt" | grep -v Warning
