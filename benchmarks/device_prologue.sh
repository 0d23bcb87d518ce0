# Sourced by the device-call scripts (benchmarks/*.sh): unbuffered output, no up-front
# GPU memory grab, $OUT, flash_jax installed from the tree, the card's name and clocks.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install --no-deps --no-build-isolation -e . -q > "$OUT/install.log" 2>&1 \
  || { echo "install failed"; tail -5 "$OUT/install.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw \
  --format=csv,noheader
