"""Checks and times attention over several GPUs of one host; one mode per process.

  python benchmarks/ring_gpu.py check      # ring fwd + grads vs one-device attention
  python benchmarks/ring_gpu.py overlap    # ring time vs its compute alone and transfers alone
  python benchmarks/ring_gpu.py memory     # compiled bytes per device vs device count
  python benchmarks/ring_gpu.py partition  # batch/head-sharded flash_attention under jit
  python benchmarks/ring_gpu.py scaling    # 32k-128k: ring vs one GPU, checked and timed
  python benchmarks/ring_gpu.py fit        # longest sequence whose fwd+bwd fits, 1 vs all GPUs

check: the accuracy rule of the suite: error against the float32 reference (HIGHEST
precision on upcast inputs) at most 2x (forward) / 3x (gradients) the error of the
same-precision jnp reference, plus a floor. Random inputs; NaN fails.
overlap: the ring's forward time against (a) the same per-device compute with no
transfer (the single-device kernel on the blocks one device computes) and (b) the
transfers alone (n-1 ppermutes of a K/V block). Perfect overlap: ring ~ max(a, b).
partition: flash_attention jitted on inputs sharded over batch and heads vs one GPU,
checked by the accuracy rule; the compiled HLO must have no all-gather.
scaling: bf16, B=1, N=16 heads of 128, causal (every layout) and full (contiguous);
ring output and gradients vs the float32 chunked reference on one GPU, with the
one-GPU kernel's own error as the same-precision baseline; median of repeats after
warm-up; efficiency = t1 / (n * tn).
fit: XLA's compiled memory analysis of causal fwd+bwd (bf16 cotangent) against the
device's allocator limit, doubling T then solving the linear bytes(T) for the largest
multiple of 16384 that fits; compile only (running T ~ 10^6 would take minutes).

Smoke test on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=2 python
benchmarks/ring_gpu.py <mode> --small
"""

from __future__ import annotations

import argparse
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import flash_jax
from flash_jax import accuracy, bench
from flash_jax.bench import attention_flops


def _mesh(n=None):
  devices = jax.local_devices()[:n or len(jax.local_devices())]
  return Mesh(np.array(devices), ("seq",))


def _inputs(seq, heads, head_dim, dtype, seed=0, batch=1):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (batch, seq, heads, head_dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  dout = jax.random.normal(keys[3], shape, jnp.float32)
  return q, k, v, dout


def _ring(mesh, layout, **kw):
  """Global natural-order arrays in, natural-order out (permutes into `layout`)."""
  n = mesh.shape["seq"]
  to = lambda x: flash_jax.to_ring_layout(x, n, layout)

  def attend(q, k, v):
    out = flash_jax.sharded_ring_attention(to(q), to(k), to(v), mesh=mesh, seq_axis="seq",
                                           layout=layout, **kw)
    return flash_jax.from_ring_layout(out, n, layout)
  return attend


def _on_ring(mesh, layout, **kw):
  """Arrays already in layout order and sharded: what a training step sees."""
  return lambda q, k, v: flash_jax.sharded_ring_attention(q, k, v, mesh=mesh, seq_axis="seq",
                                                          layout=layout, **kw)


def _fwd_bwd(fn):
  def loss(q, k, v, dout):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) * dout)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _time(fn, *args, warmup=3, repeats=10):
  """Median milliseconds of fn(*args)."""
  return bench.time_one(fn, [args], warmup=warmup, repeats=repeats) * 1e3


def _judge(got, base, exact, dtype, names=("out", "dq", "dk", "dv")):
  """The suite's rule per result: err(got) <= factor * err(base) + floor; NaN fails.

  got, base, exact: sequences of (out, dq, dk, dv); base is the same-precision baseline.
  Returns (ok, text).
  """
  ok, text = True, ""
  for name, g, b, r in zip(names, got, base, exact):
    verdict = accuracy.judge(g, b, r, factor=accuracy.factor_for(name), dtype=jnp.dtype(dtype))
    ok &= verdict.ok
    text += " " + verdict.describe(name)
  return ok, text


def _exact(fn, q, k, v, dout):
  """fn's output and input gradients on float32 copies at HIGHEST matmul precision."""
  up = [x.astype(jnp.float32) for x in (q, k, v)]
  with jax.default_matmul_precision("highest"):
    return [jax.jit(fn)(*up)] + list(_fwd_bwd(fn)(*up, dout))


def check(log, small) -> bool:
  mesh, ok = _mesh(), True
  seq = 256 if small else 8192
  for dtype in ("bfloat16", "float16"):
    for layout in flash_jax.ring_layout.LAYOUTS:
      for kw in ({"causal": True}, {}, {"causal": True, "segment_ids": True}):
        kw = dict(kw)
        q, k, v, dout = _inputs(seq, 4, 128, jnp.dtype(dtype))
        if kw.pop("segment_ids", False):
          kw["segment_ids"] = jnp.cumsum(jax.random.bernoulli(jax.random.PRNGKey(9), 0.002,
                                                              (1, seq)), axis=1)
          ring_kw = dict(kw, segment_ids=flash_jax.to_ring_layout(
              kw["segment_ids"], mesh.shape["seq"], layout))
        else:
          ring_kw = kw
        ring = _ring(mesh, layout, **ring_kw)
        same = functools.partial(flash_jax.flash_attention, implementation="xla", **kw)
        exact = _exact(same, q, k, v, dout)
        got = [jax.jit(ring)(q, k, v)] + list(_fwd_bwd(ring)(q, k, v, dout))
        base = [same(q, k, v)] + list(_fwd_bwd(same)(q, k, v, dout))
        good, text = _judge(got, base, exact, dtype)
        ok &= good
        log(f"{dtype} {layout:10s} {sorted(kw)!s:28s}{text}")
  return ok


def overlap(log, small):
  """Forward ring vs its parts, zigzag causal (every step: one unmasked half block)."""
  n = len(jax.local_devices())
  seq = 2048 if small else 65536
  heads, head_dim = (2, 64) if small else (16, 128)
  mesh, local = _mesh(), seq // n
  q, k, v, _ = _inputs(seq, heads, head_dim, jnp.bfloat16)
  sharding = NamedSharding(mesh, P(None, "seq"))
  args = [jax.device_put(x, sharding) for x in (q, k, v)]
  ring_ms = _time(jax.jit(_on_ring(mesh, "zigzag", causal=True)), *args)
  # (a) compute alone: the diagonal block (causal, L x L) and n-1 off-diagonal steps of
  # L queries against half a block, unmasked, on one device.
  lq = q[:, :local]
  diag = _time(jax.jit(functools.partial(flash_jax.flash_attention, causal=True)), lq,
               k[:, :local], v[:, :local])
  half = _time(jax.jit(flash_jax.flash_attention), lq, k[:, :local // 2], v[:, :local // 2])
  compute_ms = diag + (n - 1) * half
  # (b) transfers alone: n-1 ring hops of a K/V block.
  rows = P(None, "seq")

  def hops(k, v):
    def body(_, kv):
      return jax.lax.ppermute(kv, "seq", [(i, (i + 1) % n) for i in range(n)])
    return jax.lax.fori_loop(0, n - 1, body, (k, v))
  transfer = jax.jit(jax.shard_map(hops, mesh=mesh, in_specs=(rows, rows),
                                   out_specs=(rows, rows)))
  transfer_ms = _time(transfer, *args[1:])
  log(f"zigzag causal forward, T={seq} over {n} devices: ring {ring_ms:.2f} ms; compute "
      f"alone {compute_ms:.2f} ms; transfers alone {transfer_ms:.2f} ms; serial sum "
      f"{compute_ms + transfer_ms:.2f} ms; hidden {max(0.0, compute_ms + transfer_ms - ring_ms):.2f} ms")


def memory(log, small):
  seq = 4096 if small else 131072
  heads, head_dim = (2, 64) if small else (16, 128)
  log(f"| devices | bytes per device, causal zigzag fwd+bwd, T={seq} |")
  log("|---|---|")
  for n in [m for m in (1, 2, 4, 8) if m <= len(jax.local_devices())]:
    mesh = _mesh(n)
    shape = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, "seq")))
    dout = jax.ShapeDtypeStruct(shape.shape, jnp.float32, sharding=shape.sharding)
    stats = _fwd_bwd(_on_ring(mesh, "zigzag", causal=True)).lower(
        shape, shape, shape, dout).compile().memory_analysis()
    total = (stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    log(f"| {n} | {total / 2**20:.1f} MiB |")


def partition(log, small):
  n = len(jax.local_devices())
  batch, seq, heads = (n, 256, 2 * n) if small else (4 * n, 4096, 16)
  mesh = Mesh(np.array(jax.local_devices()), ("data",))
  q, k, v, dout = _inputs(seq, heads, 128, jnp.bfloat16, batch=batch)
  single = functools.partial(flash_jax.flash_attention, causal=True)
  reference = functools.partial(flash_jax.flash_attention, causal=True,
                                implementation="chunked")
  exact = _exact(reference, q, k, v, dout)
  fb = _fwd_bwd(single)
  base = [jax.jit(single)(q, k, v)] + list(fb(q, k, v, dout))
  ok = True
  for spec, label in ((P("data"), "batch"), (P(None, None, "data"), "heads")):
    sharding = NamedSharding(mesh, spec)
    args = [jax.device_put(x, sharding) for x in (q, k, v)]
    sharded_dout = jax.device_put(dout, sharding)
    hlo = fb.lower(*args, sharded_dout).compile().as_text()
    gathers = len(re.findall(r"all-gather(?:-start)?\(", hlo))
    got = [jax.jit(single)(*args)] + list(fb(*args, sharded_dout))
    good, text = _judge(got, base, exact, jnp.bfloat16)
    same = all(bool(jnp.array_equal(g, b)) for g, b in zip(got, base))
    sharded_ms = _time(fb, *args, sharded_dout)
    one_ms = _time(fb, q, k, v, dout)
    log(f"{label} over {n}: fwd+bwd {sharded_ms:.2f} ms vs one device {one_ms:.2f} ms "
        f"({one_ms / sharded_ms:.2f}x); all-gathers in HLO: {gathers}; bitwise equal to one "
        f"device: {same};{text}")
    ok &= good and not gathers
  return ok


def scaling(log, small):
  """Issue protocol: ring over all GPUs vs one GPU at 32k/64k/128k tokens, checked."""
  n = len(jax.local_devices())
  seqs = (1024, 2048) if small else (32768, 65536, 131072)
  heads, head_dim = (2, 64) if small else (16, 128)
  timing = dict(warmup=1, repeats=2 if small else 5)  # the checked call compiled and warmed
  sharding = NamedSharding(_mesh(), P(None, "seq"))
  ok = True
  log(f"| T | mask | layout | 1 GPU fwd ms | ring x{n} fwd ms | fwd eff | 1 GPU fwd+bwd ms "
      f"| ring x{n} fwd+bwd ms | fwd+bwd eff | ring TF/s per GPU (fwd / fwd+bwd) |")
  log("|---|---|---|---|---|---|---|---|---|---|")
  for seq in seqs:
    q, k, v, dout = _inputs(seq, heads, head_dim, jnp.bfloat16, seed=seq)
    for causal in (False, True):
      single = functools.partial(flash_jax.flash_attention, causal=causal)
      reference = functools.partial(flash_jax.flash_attention, causal=causal,
                                    implementation="chunked")
      exact = _exact(reference, q, k, v, dout)
      fwd_1, fwd_bwd_1 = jax.jit(single), _fwd_bwd(single)
      base = [fwd_1(q, k, v)] + list(fwd_bwd_1(q, k, v, dout))
      one = (_time(fwd_1, q, k, v, **timing), _time(fwd_bwd_1, q, k, v, dout, **timing))
      for layout in (flash_jax.ring_layout.LAYOUTS if causal else ("contiguous",)):
        on_ring = _on_ring(_mesh(), layout, causal=causal)
        fwd_n, fwd_bwd_n = jax.jit(on_ring), _fwd_bwd(on_ring)
        to = lambda x: jax.device_put(flash_jax.to_ring_layout(x, n, layout), sharding)
        args, ring_dout = [to(x) for x in (q, k, v)], to(dout)
        got = [flash_jax.from_ring_layout(y, n, layout)
               for y in [fwd_n(*args)] + list(fwd_bwd_n(*args, ring_dout))]
        good, text = _judge(got, base, exact, jnp.bfloat16)
        ok &= good
        log(f"check T={seq} causal={causal} {layout}: max |ring - one GPU| out "
            f"{accuracy.max_error(got[0], base[0]):.2e}; error/bound vs float32:{text}")
        del got
        times = (_time(fwd_n, *args, **timing), _time(fwd_bwd_n, *args, ring_dout, **timing))
        tflops = [attention_flops(1, heads, seq, seq, head_dim, causal=causal,
                                  backward=backward) / (t * 1e-3) / n / 1e12
                  for backward, t in ((False, times[0]), (True, times[1]))]
        log(f"| {seq} | {'causal' if causal else 'full'} | {layout} | {one[0]:.1f} | "
            f"{times[0]:.1f} | {one[0] / (n * times[0]):.2f} | {one[1]:.1f} | {times[1]:.1f} | "
            f"{one[1] / (n * times[1]):.2f} | {tflops[0]:.0f} / {tflops[1]:.0f} |")
  return ok


def _compiled_bytes(fn, shapes):
  stats = fn.lower(*shapes).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def fit(log, small, devices=None, verify=False):
  """Longest causal fwd+bwd sequence on each device count, from compiled memory.

  bytes(T) is affine in T: two compiles at moderate T give the slope, and the longest
  T (a multiple of `step`) under the allocator limit follows. With `verify`, one more
  compile at that T confirms it (slow: XLA tries rematerialization near the limit).
  """
  heads, head_dim, step = (2, 64, 1024) if small else (16, 128, 16384)
  limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit", 2**34)
  log(f"allocator limit per device: {limit / 2**30:.1f} GiB; B=1, N={heads}, H={head_dim}, "
      f"bf16, causal fwd+bwd")
  for n in devices or sorted({1, len(jax.local_devices())}):
    mesh = _mesh(n)
    if n == 1:
      fn, sharding = _fwd_bwd(functools.partial(flash_jax.flash_attention, causal=True)), None
    else:
      fn = _fwd_bwd(_on_ring(mesh, "zigzag", causal=True))
      sharding = NamedSharding(mesh, P(None, "seq"))

    def bytes_at(seq):
      shape = jax.ShapeDtypeStruct((1, seq, heads, head_dim), jnp.bfloat16, sharding=sharding)
      return _compiled_bytes(fn, (shape,) * 4)

    (t0, b0), (t1, b1) = [(t, bytes_at(t)) for t in (step * 8, step * 16)]
    per_token = (b1 - b0) / (t1 - t0)
    longest = int((limit - (b0 - per_token * t0)) / per_token) // step * step
    line = (f"{n} device(s): {per_token / 1024:.1f} KiB per token per device "
            f"({b0 / 2**30:.2f} GiB at T={t0}, {b1 / 2**30:.2f} GiB at T={t1}); longest T "
            f"that fits: {longest}")
    if verify:
      line += f" (compiled: {bytes_at(longest) / 2**30:.1f} GiB per device)"
    log(line)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("mode", choices=("check", "overlap", "memory", "partition", "scaling",
                                       "fit"))
  parser.add_argument("--small", action="store_true", help="CPU-sized smoke test")
  parser.add_argument("--devices", type=int, nargs="+", help="fit: device counts to size")
  parser.add_argument("--verify", action="store_true", help="fit: compile at the answer too")
  args = parser.parse_args()
  log = functools.partial(print, flush=True)
  log(f"jax {jax.__version__}; {len(jax.local_devices())} x {jax.local_devices()[0].device_kind}")
  if len(jax.local_devices()) < 2:
    log("needs at least 2 devices")
    return 1
  mode = {"check": check, "overlap": overlap, "memory": memory, "partition": partition,
          "scaling": scaling, "fit": fit}[args.mode]
  extra = dict(devices=args.devices, verify=args.verify) if args.mode == "fit" else {}
  result = mode(log, args.small, **extra)
  return 0 if result is None or result else 1


if __name__ == "__main__":
  sys.exit(main())
