"""Checks and times the "triton" kernels on an NVIDIA GPU; one mode per process.

  python benchmarks/triton_gpu.py check              # correctness vs the float32 reference
  python benchmarks/triton_gpu.py variants [CONFIG..] # TFLOP/s per config beside cuDNN
  python benchmarks/triton_gpu.py memory             # fwd+bwd at S=65536: peak memory

check: per case, the error of out, lse, dq, dk, dv (and dbias) against the float32
reference (HIGHEST precision on upcast inputs) must be at most 2x (forward) / 3x
(gradients) the error of the same-precision jnp reference, plus a small floor. Random
inputs, never zeros; NaN fails.
variants: FlashAttention-paper protocol (batch x seq = 16384, model dim 2048), bf16,
median of repeats after warm-up, inputs rotating between two sets; FLOPs 4 B N T S H
(half when causal), x3.5 for fwd+bwd. A CONFIG is "bq,bk,warps,stages/bq,bk,warps,
stages/bq,bk,warps,stages" for forward / dK,dV / dQ; "def" keeps the heuristic.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import flash_jax
from flash_jax import accuracy, bench
from flash_jax.bench import attention_flops
from flash_jax.kernels.triton import TritonConfig

# On CPU (a smoke test of this script) the kernels run in interpret mode.
INTERPRET = jax.default_backend() == "cpu"
TOKENS, MODEL_DIM = 16384, 2048  # the FlashAttention paper's protocol

# (B, T, S, Nq, Nkv, H, dtype, kwargs); "bias"/"mask" kwargs name a shape to draw.
CASES = [
    (2, 256, 256, 4, 4, 128, "bfloat16", {}),
    (2, 1000, 1000, 4, 2, 64, "bfloat16", {"causal": True}),
    (1, 200, 333, 4, 1, 128, "float16", {"causal": True, "q_offset": "array"}),
    (1, 333, 200, 2, 2, 72, "float32", {"window": (40, 70)}),
    (2, 300, 300, 2, 2, 64, "bfloat16", {"segment_ids": True, "causal": True}),
    (2, 300, 300, 2, 2, 128, "bfloat16", {"q_lengths": [170, 0], "kv_lengths": [300, 41]}),
    (1, 257, 257, 2, 2, 256, "bfloat16", {"causal": True, "softcap": 20.0}),
    (2, 128, 200, 2, 2, 64, "float32", {"bias": (2, 2, 128, 200)}),
    (1, 130, 250, 4, 2, 64, "bfloat16", {"bias": (1, 4, 1, 250), "mask": (1, 1, 130, 250)}),
    (1, 256, 256, 4, 4, 16, "float16", {"dropout_rate": 0.2, "causal": True}),
    (1, 1, 513, 8, 2, 128, "bfloat16", {"q_offset": 512, "causal": True}),
    (1, 2048, 2048, 2, 2, 128, "bfloat16", {"causal": True, "window": 128}),
]


def _inputs(case, seed):
  b, t, s, nq, nkv, h, dtype, kw = case
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 10))
  dt = jnp.dtype(dtype)
  q = jax.random.normal(next(keys), (b, t, nq, h), dt)
  k = jax.random.normal(next(keys), (b, s, nkv, h), dt)
  v = jax.random.normal(next(keys), (b, s, nkv, h), dt)
  kw = dict(kw)
  if kw.get("q_offset") == "array":
    kw["q_offset"] = jax.random.randint(next(keys), (b,), 0, s - t + 1)
  if kw.get("segment_ids"):
    kw["segment_ids"] = jnp.cumsum(jax.random.bernoulli(next(keys), 0.01, (b, t)), axis=1)
  for name in ("q_lengths", "kv_lengths"):
    if name in kw:
      kw[name] = jnp.asarray(kw[name], jnp.int32)
  if "bias" in kw:
    kw["bias"] = jax.random.normal(next(keys), kw["bias"], dt)
  if "mask" in kw:
    kw["mask"] = jax.random.bernoulli(next(keys), 0.8, kw["mask"])
  if kw.get("dropout_rate"):
    kw["dropout_rng"] = next(keys)
  dout = jax.random.normal(next(keys), (b, t, nq, h), jnp.float32)
  dlse = jax.random.normal(next(keys), (b, nq, t), jnp.float32)
  return q, k, v, kw, dout, dlse


def _grads(impl, q, k, v, kw, dout, dlse):
  """out, lse and the gradients of <out, dout> + <lse, dlse> w.r.t. q, k, v (and bias)."""
  kw = dict(kw)
  bias = kw.pop("bias", None)

  def f(q, k, v, bias):
    return flash_jax.flash_attention(q, k, v, bias=bias, implementation=impl, return_lse=True,
                                     interpret=INTERPRET and impl == "triton", **kw)
  (out, lse), vjp = jax.vjp(f, q, k, v, bias)
  lse_ct = jnp.where(jnp.isfinite(lse), dlse, 0.0)
  grads = vjp((dout.astype(out.dtype), lse_ct))
  return (out, lse) + tuple(g for g in grads if g is not None)


def check(log, only=None) -> bool:
  ok_all = True
  for i, case in enumerate(CASES):
    if only is not None and i not in only:
      continue
    b, t, s, nq, nkv, h, dtype, kw = case
    name = f"b{b} t{t} s{s} h{nq}x{nkv} d{h} {dtype} {sorted(kw)}"
    try:
      q, k, v, kw, dout, dlse = _inputs(case, seed=100 + i)
      got = _grads("triton", q, k, v, kw, dout, dlse)
      again = _grads("triton", q, k, v, kw, dout, dlse)
      same = _grads("xla", q, k, v, kw, dout, dlse)
      up = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
      with jax.default_matmul_precision("highest"):
        ref_kw = {n: (up(x) if n == "bias" else x) for n, x in kw.items()}
        ref = _grads("xla", up(q), up(k), up(v), ref_kw, dout, dlse)
      cells, ok = [], True
      labels = ("out", "lse", "dq", "dk", "dv", "dbias")
      for label, g, g2, sp, r in zip(labels, got, again, same, ref):
        verdict = accuracy.judge(g, sp, r, factor=accuracy.factor_for(label), dtype=dtype)
        deterministic = np.array_equal(np.asarray(g), np.asarray(g2))
        ok &= verdict.ok and deterministic
        cells.append(verdict.describe(label) + ("" if deterministic else " NONDET"))
      print(f"{'ok  ' if ok else 'FAIL'} {name}: " + ", ".join(cells), file=log, flush=True)
      ok_all &= ok
    except Exception as e:  # report and go on: one broken feature must not hide the rest
      ok_all = False
      print(f"ERR  {name}: {type(e).__name__}: {str(e)[:1500]}", file=log, flush=True)
      traceback.print_exc(file=sys.stderr)
  return ok_all


def parse_config(text: str) -> TritonConfig | None:
  if text == "def":
    return None
  fields = {}
  names = (("block_q", "block_kv", "num_warps", "num_stages"),
           ("block_q_dkv", "block_kv_dkv", "num_warps_dkv", "num_stages_dkv"),
           ("block_q_dq", "block_kv_dq", "num_warps_dq", "num_stages_dq"))
  for part, keys in zip(text.split("/"), names):
    if part != "def":
      fields.update(zip(keys, (int(x) for x in part.split(","))))
  return TritonConfig(**fields)


def variants(log, head_dims, seqs, configs, modes, causals):
  rows = []
  for h in head_dims:
    for seq in seqs:
      b, n = max(1, TOKENS // seq), MODEL_DIM // h
      args = [tuple(jax.random.normal(key, (b, seq, n, h), jnp.bfloat16)
                    for key in jax.random.split(jax.random.PRNGKey(seed), 4)) for seed in (0, 1)]
      for causal in causals:
        flops = attention_flops(b, n, seq, seq, h, causal=causal)
        contenders = {"cudnn": lambda q, k, v, c=causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=c, implementation="cudnn")}
        for text in configs:
          contenders[f"triton {text}"] = lambda q, k, v, c=causal, cfg=parse_config(text): (
              flash_jax.flash_attention(q, k, v, causal=c, implementation="triton",
                                        block_sizes=cfg))
        for mode in modes:
          fns = {label: bench.timed_function(fn, mode) for label, fn in contenders.items()}
          describe = f"{mode:7} d{h:<3} s{seq:<5} {'causal' if causal else 'full  '}"
          for line in bench.compare_lines(fns, args, flops=flops * (1 if mode == "fwd" else 3.5),
                                          describe=describe, warmup=3, repeats=20, base="cudnn",
                                          width=40):
            rows.append(line)
            print(line, file=log, flush=True)
  return rows


KERNEL_FIELDS = {
    "fwd": ("block_q", "block_kv", "num_warps", "num_stages"),
    "dkv": ("block_q_dkv", "block_kv_dkv", "num_warps_dkv", "num_stages_dkv"),
    "dq": ("block_q_dq", "block_kv_dq", "num_warps_dq", "num_stages_dq"),
}


def parts(log, head_dims, seqs, kernel_configs, causals):
  """Times each kernel alone; a config is "fwd=bq,bk,warps,stages" (or dkv=, dq=), or
  "fwd" for the heuristic. TFLOP/s count the products the kernel really does."""
  from flash_jax import spec as spec_lib
  from flash_jax.kernels.triton import config as config_lib
  from flash_jax.kernels.triton.backward_dkv import backward_dkv
  from flash_jax.kernels.triton.backward_dq import backward_dq
  from flash_jax.kernels.triton.forward import forward
  for h in head_dims:
    for seq in seqs:
      b, n = max(1, TOKENS // seq), MODEL_DIM // h
      sets = [tuple(jax.random.normal(key, (b, seq, n, h), jnp.bfloat16)
                    for key in jax.random.split(jax.random.PRNGKey(seed), 4)) for seed in (0, 1)]
      for causal in causals:
        spec, *_, arrays = spec_lib.normalize(*sets[0][:3], causal=causal)
        default = config_lib.resolve(TritonConfig(), spec)
        args = []
        for q, k, v, dout in sets:
          out, lse = forward(q, k, v, None, arrays, spec, default, INTERPRET)
          delta = jnp.einsum("btnh,btnh->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
          args.append((q, k, v, dout, lse, delta))
        fwd_flops = attention_flops(b, n, seq, seq, h, causal=causal)
        for text in kernel_configs:
          kernel, _, values = text.partition("=")
          fields = dict(zip(KERNEL_FIELDS[kernel], (int(x) for x in values.split(",")))) \
              if values else {}
          cfg = config_lib.resolve(TritonConfig(**fields), spec)
          run = {
              "fwd": lambda q, k, v, do, lse, d: forward(q, k, v, None, arrays, spec, cfg,
                                                         INTERPRET),
              "dkv": lambda q, k, v, do, lse, d: backward_dkv(q, k, v, None, arrays, lse, do, d,
                                                              spec, cfg, INTERPRET),
              "dq": lambda q, k, v, do, lse, d: backward_dq(q, k, v, None, arrays, lse, do, d,
                                                            spec, cfg, INTERPRET),
          }[kernel]
          shown = ",".join(str(getattr(cfg, f)) for f in KERNEL_FIELDS[kernel])
          try:
            sec = bench.time_one(jax.jit(run), args, warmup=5, repeats=30)
            tf = bench.KERNEL_MATMULS[kernel] * fwd_flops / sec / 1e12
            line = (f"part d{h:<3} s{seq:<5} {'causal' if causal else 'full  '} {kernel:>3} "
                    f"{shown:>14}: {tf:7.1f} TFLOP/s (real) {sec * 1e3:8.3f} ms")
          except Exception as e:
            line = (f"part d{h:<3} s{seq:<5} {'causal' if causal else 'full  '} {kernel:>3} "
                    f"{shown:>14}: ERR {type(e).__name__}: {str(e).splitlines()[0][:200]}")
          print(line, file=log, flush=True)


def table(log, head_dims, seqs):
  """The recorded table, through flash_jax.bench's protocol: triton beside cuDNN."""
  contenders = {
      "triton": lambda q, k, v, causal: flash_jax.flash_attention(
          q, k, v, causal=causal, implementation="triton"),
      "jax.nn[cudnn]": lambda q, k, v, causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, implementation="cudnn"),
  }
  problems = [bench.Problem(s, d, c, m, TOKENS, MODEL_DIM, "bfloat16")
              for m in ("fwd", "fwd_bwd") for d in head_dims for s in seqs for c in (False, True)]
  rows = bench.run(problems, contenders, warmup=3, repeats=20, log=sys.stderr)
  print(bench.table(rows), file=log, flush=True)


def memory(log, seq=65536, heads=16, head_dim=128):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v, dout = (jax.random.normal(key, (1, seq, heads, head_dim), jnp.bfloat16)
                   for key in keys)
  inputs = 4 * q.nbytes

  def fb(q, k, v, d):
    out, vjp = jax.vjp(lambda q, k, v: flash_jax.flash_attention(
        q, k, v, causal=True, implementation="triton"), q, k, v)
    return vjp(d)
  jf = jax.jit(fb)
  sec = bench.time_one(jf, [(q, k, v, dout)], warmup=1, repeats=3)
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use", float("nan"))
  flops = attention_flops(1, heads, seq, seq, head_dim, causal=True, backward=True)
  print(f"memory: fwd+bwd causal B=1 N={heads} H={head_dim} S={seq} bf16: {sec * 1e3:.1f} ms "
        f"({flops / sec / 1e12:.1f} TFLOP/s), peak {peak / 2**30:.2f} GiB "
        f"(q,k,v,dout {inputs / 2**30:.2f} GiB; an S x S score matrix per head would be "
        f"{seq * seq * 4 / 2**30:.0f} GiB)", file=log, flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["check", "variants", "parts", "table", "memory"])
  parser.add_argument("configs", nargs="*", default=["def"])
  parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
  parser.add_argument("--seqs", type=int, nargs="+", default=[4096])
  parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"])
  parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
  parser.add_argument("--cases", type=int, nargs="+", default=None, help="check: case indices")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  if args.what == "check":
    ok = check(sys.stdout, args.cases)
    print("CHECK", "PASSED" if ok else "FAILED", flush=True)
  elif args.what == "memory":
    memory(sys.stdout)
  elif args.what == "table":
    table(sys.stdout, args.head_dims, args.seqs)
  elif args.what == "parts":
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    parts(sys.stdout, args.head_dims, args.seqs, args.configs, causals)
  else:
    causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
    variants(sys.stdout, args.head_dims, args.seqs, args.configs, args.modes, causals)


if __name__ == "__main__":
  main()
