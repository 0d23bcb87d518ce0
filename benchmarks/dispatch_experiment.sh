source benchmarks/device_prologue.sh
for flags in "" "--xla_gpu_enable_command_buffer=" "--xla_gpu_graph_min_graph_size=1"; do
  echo "== XLA_FLAGS=$flags"
  XLA_FLAGS="$flags" timeout 150 python3 benchmarks/decode_step_gpu.py --layouts mha --repeats 20 2>&1 | grep -v WARNING | grep "^{"
done
timeout 240 python3 benchmarks/decode_gpu.py compare --problems 0 1 2 3 4 5 6 \
  --configs '[{"num_stages_split": 2}, {"num_stages_split": 4}]' 2>&1 | grep COMPARE
