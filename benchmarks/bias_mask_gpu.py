"""Times bias and dense masks on a Hopper GPU: mosaic_gpu and triton beside jax.nn's cuDNN
and XLA, forward and forward+backward, in one process (`flash_jax.bench.compare_lines`).

  python benchmarks/bias_mask_gpu.py [--seq-lens 4096 ...] [--head-dims 128 ...]

Problems (bf16, 16384 tokens, model dim 2048, the bench's protocol):
  * bias [1, N, T, S] (one per head, shared by the batch: T5-style relative positions),
    differentiated (d bias) in fwd+bwd;
  * bias_fixed: the same bias as a constant (ALiBi): no d bias;
  * mask [B, 1, T, S] (Flax's `make_attention_mask` shape): causal AND a ragged key
    padding per batch row, so that leading/trailing all-False tiles exist.
jax.nn's contenders get the same bias / mask; cuDNN's backward returns d bias as well.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import flash_jax
from flash_jax.bench import attention_flops, compare_lines


def problem_inputs(kind: str, b, t, n, h, seed=0):
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q, k, v, dout = (jax.random.normal(key, (b, t, n, h), jnp.bfloat16) for key in keys[:4])
  if kind.startswith("bias"):
    extra = jax.random.normal(keys[4], (1, n, t, t), jnp.bfloat16)
  else:
    lengths = t - (jnp.arange(b) * t) // (4 * b)  # 100% down to ~75% of the keys
    causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    extra = causal[None, None] & (jnp.arange(t)[None, None, None, :] < lengths[:, None, None, None])
  return (q, k, v, dout, extra)


def contenders(kind: str):
  argument = "mask" if kind == "mask" else "bias"
  def ours(name):
    def fn(q, k, v, extra):
      return flash_jax.flash_attention(q, k, v, implementation=name, **{argument: extra})
    return fn

  def jax_nn(impl):
    def fn(q, k, v, extra):
      return jax.nn.dot_product_attention(q, k, v, implementation=impl, **{argument: extra})
    return fn

  return {"mosaic_gpu": ours("mosaic_gpu"), "triton": ours("triton"),
          "jax.nn[cudnn]": jax_nn("cudnn"), "jax.nn[xla]": jax_nn("xla")}


def timed(fn, mode: str, differentiate_extra: bool):
  """The jitted function of (q, k, v, dout, extra) the protocol times."""
  if mode == "fwd":
    return jax.jit(lambda q, k, v, do, extra: fn(q, k, v, extra))

  def fwd_bwd(q, k, v, do, extra):
    if differentiate_extra:  # the bias: d bias too
      out, vjp = jax.vjp(fn, q, k, v, extra)
    else:
      out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, extra), q, k, v)
    return out, vjp(do)
  return jax.jit(fwd_bwd)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--kinds", nargs="+", default=["bias", "bias_fixed", "mask"],
                      choices=["bias", "bias_fixed", "mask"])
  args = parser.parse_args(argv)
  print(jax.devices()[0].device_kind, jax.__version__, flush=True)
  for h in args.head_dims:
    for t in args.seq_lens:
      b, n = max(1, 16384 // t), 2048 // h
      for kind in args.kinds:
        arg_sets = [problem_inputs(kind, b, t, n, h, seed) for seed in (0, 1)]
        for mode in ("fwd", "fwd_bwd"):
          if kind == "bias_fixed" and mode == "fwd":
            continue  # the forward is the bias row's
          # The papers' FLOP count of a full (non-causal) problem, for every contender: the
          # ratio column compares times.
          flops = attention_flops(b, n, t, t, h, causal=False, backward=mode == "fwd_bwd")
          fns = {name: timed(fn, mode, differentiate_extra=kind == "bias")
                 for name, fn in contenders(kind).items()}
          for line in compare_lines(fns, arg_sets, flops=flops, warmup=3,
                                    repeats=args.repeats, base="jax.nn[cudnn]",
                                    describe=f"d{h} s{t} {kind:10} {mode:7}"):
            print(line, flush=True)


if __name__ == "__main__":
  sys.exit(main())
