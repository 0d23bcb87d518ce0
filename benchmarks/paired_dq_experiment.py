"""Device experiment: the unordered backward with the consumers' dQ rows paired in
shared memory (one reduce-add per step) against unpaired (one each), beside the two
kernels and cuDNN. python benchmarks/paired_dq_experiment.py {check,time}"""
import functools
import sys

import jax
import jax.numpy as jnp

import flash_jax
from flash_jax import bench
from flash_jax.bench import attention_flops
from flash_jax.kernels.mosaic_gpu import backward as bk
from flash_jax.kernels.mosaic_gpu.config import MosaicGPUBlockSizes

sys.path.insert(0, "benchmarks")
import mosaic_gpu as mg  # noqa: E402

ORIG = bk._dkv
CAUSAL = {(128, 16384): (False, True), (64, 4096): (True,)}


def with_pairs(pairs):  # api caches each call's jitted function: start afresh
  bk._dkv = functools.partial(ORIG, pairs_dq=pairs)
  flash_jax.api._named_call.cache_clear()


def time_all(head_dims, seqs):
  atomic = MosaicGPUBlockSizes(atomic_dq=True)
  two = MosaicGPUBlockSizes(atomic_dq=False)
  for h in head_dims:
    for seq in seqs:
      b, n = 16384 // seq, 2048 // h
      args = [tuple(jax.random.normal(key, (b, seq, n, h), jnp.bfloat16)
                    for key in jax.random.split(jax.random.PRNGKey(seed), 4)) for seed in (0, 1)]
      for causal in CAUSAL.get((h, seq), (False, True)):
        flops = attention_flops(b, n, seq, seq, h, causal=causal) * 3.5
        fns = {"cudnn": bench.timed_function(lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn"), "fwd_bwd")}
        for label, cfg, pairs in (("atomic paired", atomic, True),
                                  ("atomic unpaired", atomic, False),
                                  ("paired nowait", atomic, "nowait"),
                                  ("paired noload", atomic, "noload")):
          with_pairs(pairs)
          f = bench.timed_function(lambda q, k, v, cfg=cfg: flash_jax.flash_attention(
              q, k, v, causal=causal, implementation="mosaic_gpu", block_sizes=cfg), "fwd_bwd")
          jax.block_until_ready(f(*args[0]))  # trace now, under this pairing
          fns[label] = f
        with_pairs(None)
        describe = f"fwd_bwd d{h:<3} s{seq:<5} {'causal' if causal else 'full  '}"
        for line in bench.compare_lines(fns, args, flops=flops, describe=describe, warmup=3,
                                        repeats=15, base="cudnn"):
          print(line, flush=True)


if __name__ == "__main__":
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  if sys.argv[1] == "check":
    for pairs in (True, False):
      with_pairs(pairs)
      print(f"== pairs_dq={pairs}", flush=True)
      mg.check(sys.stdout, None, MosaicGPUBlockSizes(atomic_dq=True))
  else:
    time_all([int(x) for x in sys.argv[2].split(",")], [int(x) for x in sys.argv[3].split(",")])
