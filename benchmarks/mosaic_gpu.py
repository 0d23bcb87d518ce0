"""Checks and times the mosaic_gpu kernels on a Hopper GPU in one process.

  python benchmarks/mosaic_gpu.py check     # correctness vs the float32 reference
  python benchmarks/mosaic_gpu.py variants  # forward / fwd+bwd TFLOP/s per config, beside cuDNN
  python benchmarks/mosaic_gpu.py kernels   # each kernel of fwd+bwd timed alone;
                                            # --sweep: with KERNEL_VARIANTS beside

check: for each case, error of out, lse and dq/dk/dv against the float32 reference
(HIGHEST precision on upcast inputs) over the error of the same-precision jnp
reference; passes when <= 2x (forward) / 3x (gradients) plus a small floor. Outputs
start from random inputs (never zeros); NaN fails.
variants: FlashAttention-paper protocol (batch x seq = 16384, model dim 2048), bf16,
median of repeats after warm-up; FLOPs 4 B N T S H (half when causal), x3.5 fwd+bwd.
kernels: the same protocol; the forward, dK/dV and dQ kernels each timed
alone, with the TFLOP/s of the matmuls each one issues (`bench.KERNEL_MATMULS`), against
the whole fwd+bwd call, to see which kernel sits furthest from the card's matmul ceiling.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import flash_jax
from flash_jax import accuracy, bench
from flash_jax.bench import attention_flops
from flash_jax.kernels.mosaic_gpu.config import MosaicGPUBlockSizes

# (B, T, S, Nq, Nkv, H, dtype, kwargs)
CASES = [
    (2, 256, 256, 4, 4, 128, "bfloat16", {}),
    (1, 384, 384, 4, 2, 64, "bfloat16", {"causal": True}),
    (2, 200, 333, 2, 2, 128, "bfloat16", {"causal": True}),
    (1, 256, 256, 2, 2, 256, "float16", {"causal": True}),
    (1, 512, 512, 2, 1, 128, "bfloat16", {"causal": True, "window": 64}),
    (1, 300, 300, 2, 2, 128, "bfloat16", {"window": (40, 70)}),
    (1, 256, 256, 2, 2, 64, "bfloat16", {"softcap": 20.0}),
    (1, 128, 512, 4, 1, 128, "bfloat16", {}),
    (1, 300, 200, 2, 2, 64, "float16", {"causal": True}),
    (1, 1000, 1000, 2, 2, 256, "bfloat16", {"causal": True, "softcap": 30.0}),
]


def _run(impl, q, k, v, kw, dout, dlse, block_sizes=None):
  def f(q, k, v):
    return flash_jax.flash_attention(q, k, v, implementation=impl, return_lse=True,
                                     block_sizes=block_sizes, **kw)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  lse_ct = jnp.where(jnp.isfinite(lse), dlse, 0.0)
  return (out, lse) + tuple(vjp((dout.astype(out.dtype), lse_ct)))


def check(log, cases=None, block_sizes=None) -> bool:
  ok_all = True
  for i, (b, t, s, nq, nkv, h, dtype, kw) in enumerate(CASES):
    if cases is not None and i not in cases:
      continue
    name = f"b{b} t{t} s{s} h{nq}x{nkv} d{h} {dtype} {kw}"
    try:
      keys = jax.random.split(jax.random.PRNGKey(100 + i), 5)
      dt = jnp.dtype(dtype)
      q = jax.random.normal(keys[0], (b, t, nq, h), dt)
      k = jax.random.normal(keys[1], (b, s, nkv, h), dt)
      v = jax.random.normal(keys[2], (b, s, nkv, h), dt)
      dout = jax.random.normal(keys[3], (b, t, nq, h), jnp.float32)
      dlse = jax.random.normal(keys[4], (b, nq, t), jnp.float32)
      got = _run("mosaic_gpu", q, k, v, kw, dout, dlse, block_sizes)
      again = _run("mosaic_gpu", q, k, v, kw, dout, dlse, block_sizes)
      reproducible = all(np.array_equal(np.asarray(a), np.asarray(b))
                         for a, b in zip(got, again))
      # The unordered backward (atomic_dq) may differ in the last bits from run to run.
      unordered = bool(getattr(block_sizes, "atomic_dq", False))
      same = _run("xla", q, k, v, kw, dout, dlse)
      up = lambda x: x.astype(jnp.float32)
      with jax.default_matmul_precision("highest"):
        ref = _run("xla", up(q), up(k), up(v), kw, dout, dlse)
      ok = reproducible or unordered
      cells = [] if reproducible else ["not bitwise reproducible"]
      for label, g, sp, r in zip(("out", "lse", "dq", "dk", "dv"), got, same, ref):
        verdict = accuracy.judge(g, sp, r, factor=accuracy.factor_for(label), dtype=dtype)
        ok &= verdict.ok
        cells.append(verdict.describe(label))
      print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(cells), file=log, flush=True)
      ok_all &= ok
    except Exception as e:  # report and go on: one broken feature must not hide the rest
      ok_all = False
      print(f"ERR  {name}: {type(e).__name__}: {str(e)[:2000]}", file=log, flush=True)
      traceback.print_exc(file=sys.stderr)
  return ok_all


def variants(log, head_dims, seqs, configs, modes):
  for h in head_dims:
    for seq in seqs:
      b, n = 16384 // seq, 2048 // h
      args = [tuple(jax.random.normal(key, (b, seq, n, h), jnp.bfloat16)
                    for key in jax.random.split(jax.random.PRNGKey(seed), 4)) for seed in (0, 1)]
      for causal in (False, True):
        flops = attention_flops(b, n, seq, seq, h, causal=causal)
        contenders = {"cudnn": lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn")}
        for cfg in configs.get(h, [None]):
          label = "mosaic" if cfg is None else "mosaic " + ",".join(
              f"{x}" for x in (cfg.block_kv, cfg.num_stages, cfg.block_kv_dq)) + (
                  {True: ",overlap", False: ",sequential"}.get(cfg.overlap_softmax, "")) + (
                      ",atomic_dq" if cfg.atomic_dq else "")
          contenders[label] = lambda q, k, v, c=causal, cfg=cfg: flash_jax.flash_attention(
              q, k, v, causal=c, implementation="mosaic_gpu", block_sizes=cfg)
        for mode in modes:
          fns = {label: bench.timed_function(fn, mode) for label, fn in contenders.items()}
          describe = f"{mode:7} d{h:<3} s{seq:<5} {'causal' if causal else 'full  '}"
          for line in bench.compare_lines(fns, args, flops=flops * (1 if mode == "fwd" else 3.5),
                                          describe=describe, warmup=3, repeats=15, base="cudnn"):
            print(line, file=log, flush=True)


# `kernels --sweep`: configs timed beside the defaults, per head dim, as (kernel, label,
# fields replaced in the default config): the alternatives the defaults won against
# (docs/performance.md, "Why these defaults": the dK/dV schedule and ring depth; at d128 the
# non-causal default is ping-pong, the causal one sequential, both with 2 slots). A
# variant equal to a call's default is not timed twice.
KERNEL_VARIANTS = {
    64: [("dkv", "dK/dV sequential", {"dkv_ping_pong": False}),
         ("dkv", "dK/dV q64", {"block_q_dkv": 64}),
         ("dq", "dQ kv64", {"block_kv_dq": 64})],
    128: [("fwd", "forward sequential", {"overlap_softmax": False}),
          ("dkv", "dK/dV ping-pong 2 st", {"dkv_ping_pong": True}),
          ("dkv", "dK/dV ping-pong 3 st", {"dkv_ping_pong": True, "num_stages_dkv": 3}),
          ("dkv", "dK/dV sequential 3 st", {"dkv_ping_pong": False, "num_stages_dkv": 3}),
          ("dkv", "dK/dV sequential 2 st", {"dkv_ping_pong": False})],
}


def kernels(log, head_dims, seqs, sweep=False):
  from flash_jax import spec as spec_lib
  from flash_jax.kernels.mosaic_gpu import backward as backward_kernels
  from flash_jax.kernels.mosaic_gpu import config as config_lib
  from flash_jax.kernels.mosaic_gpu import forward as forward_kernel
  for h, seq in ((h, seq) for h in head_dims for seq in seqs):
    b, n = 16384 // seq, 2048 // h
    q, k, v, dout = (jax.random.normal(key, (b, seq, n, h), jnp.bfloat16)
                     for key in jax.random.split(jax.random.PRNGKey(0), 4))
    for causal in (False, True):
      spec, *_, arrays = spec_lib.normalize(q, k, v, causal=causal)
      config = config_lib.default_config(spec)
      flops = attention_flops(b, n, seq, seq, h, causal=causal)  # the forward's 2 matmuls
      out, lse, _ = jax.jit(lambda q, k, v: forward_kernel.forward(q, k, v, None, arrays,
                                                                   spec, config))(q, k, v)
      delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
      ops, t_pad, s_pad = backward_kernels.kernel_operands(q, k, v, lse, dout, delta, arrays,
                                                           spec, config)
      *tensors, names, feature_arrays = ops
      kernel_calls = {  # kernel -> (config -> jitted call, its operands)
          "fwd": (lambda config: jax.jit(lambda q, k, v: forward_kernel.forward(
              q, k, v, None, arrays, spec, config)[:2]), (q, k, v)),
          "dkv": (lambda config: jax.jit(lambda *t: tuple(
              backward_kernels._dkv(*t, names, feature_arrays, spec=spec, config=config,
                                    s_pad=s_pad, outputs=outputs)
              for outputs in backward_kernels.dkv_launches(spec))), tuple(tensors)),
          "dq": (lambda config: jax.jit(lambda *t: backward_kernels._dq(
              *t, names, feature_arrays, spec=spec, config=config, t_pad=t_pad)[0]),
                 tuple(tensors)),
          "dkv+dq": (lambda config: jax.jit(lambda *t: tuple(  # the unordered backward
              backward_kernels._dkv(*t, names, feature_arrays, spec=spec, config=config,
                                    s_pad=s_pad, outputs=outputs, adds_dq="dk" in outputs)
              for outputs in backward_kernels.dkv_launches(spec))), tuple(tensors)),
      }

      def whole(q, k, v):
        f = lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=causal,
                                                      implementation="mosaic_gpu")
        return jax.vjp(f, q, k, v)[1](dout)

      # dK/dV+dQ issues the 5 matmuls of one fused pass (S, dP, dV, dK, dQ).
      matmuls = dict(bench.KERNEL_MATMULS, **{"dkv+dq": 2.5})
      runs = [(kernel, label, {}) for kernel, label in
              (("fwd", "forward"), ("dkv", "dK/dV"), ("dq", "dQ"))]
      runs += KERNEL_VARIANTS.get(h, []) if sweep else []
      if h <= 128:
        runs.append(("dkv+dq", "dK/dV+dQ (atomic_dq)", {}))
      parts = {}  # label -> (jitted call, operands, FLOPs of the matmuls it issues)
      for kernel, label, fields in runs:
        variant = dataclasses.replace(config, **fields)
        if fields and variant == config:  # this call's default already (e.g. causal d128)
          continue
        make, operands = kernel_calls[kernel]
        parts[label] = (make(variant), operands, matmuls[kernel] * flops)
      parts["fwd+bwd call"] = (jax.jit(whole), (q, k, v),
                               sum(bench.KERNEL_MATMULS.values()) * flops)
      seconds, failed = bench.time_contenders(
          {label: lambda fn=fn, args=args: fn(*args) for label, (fn, args, _) in parts.items()},
          [()], warmup=3, repeats=15)
      for label, (_, _, work) in parts.items():
        cell = (f"{seconds[label] * 1e3:8.3f} ms {work / seconds[label] / 1e12:7.1f} TFLOP/s "
                "of issued matmuls" if label in seconds else f"ERR {failed[label]!r}"[:300])
        print(f"d{h} s{seq:<5} {'causal' if causal else 'full  '} {label:>23}: {cell}",
              file=log, flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["check", "variants", "kernels"])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--seqs", type=int, nargs="+", default=[4096])
  parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
  parser.add_argument("--cases", type=int, nargs="+", default=None, help="check: case indices")
  parser.add_argument("--sweep", action="store_true", help="time several configs per head dim")
  parser.add_argument("--overlap-softmax", choices=["true", "false"], default=None,
                      help="check: MosaicGPUBlockSizes.overlap_softmax (default: the default)")
  parser.add_argument("--atomic-dq", action="store_true",
                      help="check: the unordered backward; variants: it beside the default")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  if args.what == "check":
    overlap = None if args.overlap_softmax is None else args.overlap_softmax == "true"
    block_sizes = MosaicGPUBlockSizes(overlap_softmax=overlap,
                                      atomic_dq=True if args.atomic_dq else None)
    sys.exit(0 if check(sys.stdout, args.cases, block_sizes) else 1)
  if args.what == "kernels":
    kernels(sys.stdout, args.head_dims, args.seqs, args.sweep)
    return
  configs = {}
  if args.atomic_dq:
    configs = {h: [None, MosaicGPUBlockSizes(atomic_dq=True)] for h in args.head_dims}
  if args.sweep:
    m = lambda bkv, overlap, st=2: MosaicGPUBlockSizes(block_kv=bkv, num_stages=st,
                                                       overlap_softmax=overlap)
    # Beside each default (config.py), the alternatives v6 weighed: the other forward
    # schedule (sequential softmax vs overlapped with the PV matmul) and, at d64, 256-wide
    # key blocks and deeper rings (the H200's 1.4x bandwidth).
    configs = {64: [None, m(256, False), m(128, True), m(128, False, 3), m(128, False, 4),
                    m(256, False, 3)],
               128: [None, m(128, False)],
               256: [None, m(64, False)]}  # d256: Q + a 2-slot ring of 64-row blocks fill SMEM
  variants(sys.stdout, args.head_dims, args.seqs, configs, args.modes)


if __name__ == "__main__":
  main()
