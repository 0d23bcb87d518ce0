"""Decode kernels on a GPU in one call: correctness checks, a config sweep, the HLO check.

  python benchmarks/decode_gpu.py check [--implementation triton]
  python benchmarks/decode_gpu.py sweep [--problems 0 1 2]
  python benchmarks/decode_gpu.py hlo
  python benchmarks/decode_gpu.py profile [--problems 0 1 2]
  python benchmarks/decode_gpu.py compare [--paged] [--implementation mosaic_gpu] --configs JSON

`check` runs contiguous and paged decode (bf16) against the float32 reference under the
accuracy rule, with NaN/inf poison in unused pages and past the lengths, over T in
{1, 2, 7, 16}, odd S, lengths 0 and 1, page sizes 16/64/128, window, softcap, GQA/MQA.
`sweep` times split-KV configs of the Triton kernel beside cuDNN on the benchmark's
problems (the loop protocol of flash_jax.bench_decode). `hlo` checks that no compiled
paged call gathers a contiguous copy of the cache. `profile` lists each contender's
kernel time per call, by kernel, inside the loop protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

import flash_jax
from flash_jax import accuracy, bench, bench_decode

CHECKS = [
    # (B, T, Nq, Nkv, H, page_size, pages_per_seq, extra kwargs)
    (4, 1, 32, 8, 128, 64, 9, {}),
    (3, 2, 16, 1, 128, 16, 31, {}),
    (2, 7, 8, 8, 64, 128, 3, {"window": (100, 0)}),
    (3, 16, 32, 8, 128, 64, 5, {"softcap": 30.0}),
    (2, 1, 8, 2, 256, 16, 7, {}),
    (5, 3, 12, 4, 96, 64, 4, {"scale": 0.3}),
    (3, 1, 8, 2, 64, 7, 13, {}),  # S = 91: odd, pages of 7 (rows found through the table)
]


def _case(b, t, nq, nkv, h, page_size, pages_per_seq, seed):
  """Caches whose lengths include 0, 1 and an odd length; junk everywhere unused."""
  rng = np.random.RandomState(seed)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  s = page_size * pages_per_seq
  lengths = rng.randint(t, s + 1, b)
  lengths[0] = s - 3 if s > 3 else s  # odd, ends inside a page
  if b > 2:
    lengths[1], lengths[2] = 0, 1
  q = jax.random.normal(keys[0], (b, t, nq, h), jnp.bfloat16)
  k = jax.random.normal(keys[1], (b, s, nkv, h), jnp.bfloat16)
  v = jax.random.normal(keys[2], (b, s, nkv, h), jnp.bfloat16)
  stored = (np.arange(s)[None, :] < lengths[:, None])[:, :, None, None]
  k = jnp.where(stored, k, jnp.nan)
  v = jnp.where(stored, v, jnp.inf)
  pool = b * pages_per_seq + 3
  tables = rng.permutation(pool)[:b * pages_per_seq].reshape(b, pages_per_seq)
  used = -(-lengths // page_size)
  tables = np.where(np.arange(pages_per_seq)[None, :] < used[:, None], tables, 10**6 + 7)
  k_pages = jnp.full((pool, page_size, nkv, h), jnp.nan, jnp.bfloat16)
  v_pages = jnp.full((pool, page_size, nkv, h), -jnp.inf, jnp.bfloat16)
  k_pages, v_pages = flash_jax.write_kv_pages(k_pages, v_pages, tables, 0, k, v,
                                              lengths=jnp.asarray(lengths, jnp.int32))
  return q, k, v, jnp.asarray(lengths, jnp.int32), k_pages, v_pages, jnp.asarray(tables, jnp.int32)


def check(implementation: str) -> bool:
  ok = True
  for n, (b, t, nq, nkv, h, ps, pps, extra) in enumerate(CHECKS):
    q, k, v, lengths, k_pages, v_pages, tables = _case(b, t, nq, nkv, h, ps, pps, seed=n)
    kwargs = dict(causal=True, **extra)
    up = lambda x: x.astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
      exact, exact_lse = flash_jax.paged_attention(up(q), up(k_pages), up(v_pages), tables,
                                                   lengths, implementation="xla",
                                                   return_lse=True, **kwargs)
    same, same_lse = flash_jax.paged_attention(q, k_pages, v_pages, tables, lengths,
                                               implementation="xla", return_lse=True, **kwargs)
    calls = {
        "paged": lambda: flash_jax.paged_attention(
            q, k_pages, v_pages, tables, lengths, implementation=implementation,
            return_lse=True, **kwargs),
        "contiguous": lambda: flash_jax.flash_attention(
            q, k, v, kv_lengths=lengths, q_offset=lengths - t, return_lse=True,
            implementation=implementation, **kwargs),
    }
    for layout, call in calls.items():
      try:
        out, lse = call()
      except NotImplementedError as e:  # a call the implementation declines (page size 7)
        print(f"check {n} B={b} T={t} d{h} page{ps} {layout:10} declined: {e}", flush=True)
        continue
      for name, x, s, r in (("out", out, same, exact), ("lse", lse, same_lse, exact_lse)):
        verdict = accuracy.judge(x, s, r, factor=accuracy.factor_for(name), dtype="bfloat16")
        ok &= verdict.ok
        print(f"check {n} B={b} T={t} {nq}/{nkv} d{h} page{ps} {extra} {layout:10} "
              f"{verdict.describe(name)}", flush=True)
  print("CHECK", "PASSED" if ok else "FAILED", flush=True)
  return ok


def _ranked(rows):
  """(µs, contender) of the timed rows, fastest first."""
  return sorted((round(r["us"], 1), r["implementation"]) for r in rows if "us" in r)


def sweep(problem_indices, repeats: int):
  from flash_jax.kernels.triton import TritonConfig, config as config_lib
  problems = [bench_decode.DEFAULT_PROBLEMS[i] for i in problem_indices]
  for problem in problems:
    variants = {"cudnn": None, "default": TritonConfig()}
    for block_kv, stages in itertools.product((32, 64, 128), (2, 3, 4)):
      variants[f"bk{block_kv} st{stages}"] = TritonConfig(block_kv_split=block_kv,
                                                          num_stages_split=stages)
    for splits in (8, 16, 32, 64, 128):
      variants[f"splits{splits}"] = TritonConfig(num_splits=splits)
    variants["warps8"] = TritonConfig(num_warps_split=8)
    fns = {}
    for name, config in variants.items():
      if config is None:
        fns[name] = bench_decode.contenders("gpu")["jax.nn[cudnn]"]
      else:
        fns[name] = bench_decode.contenders("gpu", "triton", config)["flash_jax"]
    fns["paged default"] = bench_decode.contenders("gpu", "triton")["flash_jax paged"]
    rows = bench_decode.measure([problem], fns, warmup=2, repeats=repeats)
    print(f"SWEEP {problem.label}: best {_ranked(rows)[:4]}", flush=True)


def compare(problems, repeats: int, configs: list[dict], paged: bool = False,
            implementation: str = "triton"):
  """The defaults of the GPU implementations beside each of `configs` (fields of
  `implementation`'s config) and cuDNN, per problem, over contiguous caches or (`paged`)
  paged ones."""
  from flash_jax import dispatch
  layout = "flash_jax paged" if paged else "flash_jax"
  config_type = dispatch.get_implementation(implementation).config_type
  for problem in problems:
    fns = {"cudnn": bench_decode.contenders("gpu")["jax.nn[cudnn]"]}
    for name in ("triton", "mosaic_gpu"):
      fns[name] = bench_decode.contenders("gpu", name)[layout]
    for fields in configs:
      name = implementation + " " + " ".join(f"{k}={v}" for k, v in fields.items())
      fns[name] = bench_decode.contenders("gpu", implementation, config_type(**fields))[layout]
    rows = bench_decode.measure([problem], fns, warmup=2, repeats=repeats)
    print(f"COMPARE {problem.label}: {_ranked(rows)}", flush=True)


def splits_sweep(problem_indices, repeats: int, split_counts=(1, 2, 4, 8, 16, 32, 64)):
  """Contiguous and paged at each split count, cuDNN twice (its spread is the noise)."""
  from flash_jax.kernels.triton import TritonConfig
  for i in problem_indices:
    problem = bench_decode.DEFAULT_PROBLEMS[i]
    cudnn = bench_decode.contenders("gpu")["jax.nn[cudnn]"]
    fns = {"cudnn": cudnn, "cudnn again": cudnn}
    for layout, key in (("contig", "flash_jax"), ("paged", "flash_jax paged")):
      fns[f"{layout} default"] = bench_decode.contenders("gpu", "triton")[key]
      for n in split_counts:
        fns[f"{layout} splits{n}"] = bench_decode.contenders(
            "gpu", "triton", TritonConfig(num_splits=n))[key]
    rows = bench_decode.measure([problem], fns, warmup=2, repeats=repeats)
    print(f"SPLITS {problem.label}: {_ranked(rows)[:6]}", flush=True)


def paged_sweep(problem_indices, repeats: int):
  """Paged variants (page id prefetch, block sizes, stages) beside contiguous and cuDNN."""
  from flash_jax.kernels.triton import TritonConfig
  variants = {"paged default": TritonConfig(),
              "paged no prefetch": TritonConfig(prefetch_pages=False),
              "paged bk128 (gather)": TritonConfig(block_kv_split=128),
              "paged bk128 st2 (gather)": TritonConfig(block_kv_split=128, num_stages_split=2),
              "paged splits x2": None,
              "paged bk32": TritonConfig(block_kv_split=32),
              "paged st4": TritonConfig(num_stages_split=4),
              "paged bk32 st4": TritonConfig(block_kv_split=32, num_stages_split=4)}
  for i in problem_indices:
    problem = bench_decode.DEFAULT_PROBLEMS[i]
    fns = {"cudnn": bench_decode.contenders("gpu")["jax.nn[cudnn]"],
           "contiguous default": bench_decode.contenders("gpu", "triton")["flash_jax"]}
    for name, config in variants.items():
      if config is None:  # twice the heuristic's splits
        from flash_jax.kernels.triton import config as config_lib
        spec = flash_jax.paged.normalize_paged(*_paged_shapes(problem))[0]
        config = TritonConfig(num_splits=2 * config_lib.split_kv_config(spec)["num_splits"])
      fns[name] = bench_decode.contenders("gpu", "triton", config)["flash_jax paged"]
    rows = bench_decode.measure([problem], fns, warmup=2, repeats=repeats)
    print(f"PAGED {problem.label}: {_ranked(rows)}", flush=True)


def _paged_shapes(problem):
  """Arguments of normalize_paged for `problem` (zeros: only shapes matter)."""
  p = problem
  pages = -(-p.kv_len // p.page_size)
  q = jnp.zeros((p.batch, p.q_len, p.num_q_heads, p.head_dim), p.dtype)
  pool = jnp.zeros((p.batch * pages, p.page_size, p.num_kv_heads, p.head_dim), p.dtype)
  return (q, pool, pool, jnp.zeros((p.batch, pages), jnp.int32),
          jnp.full((p.batch,), p.kv_len, jnp.int32))


def bandwidth():
  """The card's read and copy bandwidth through XLA (the ceiling decode aims at)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2**31,), jnp.bfloat16)  # 4 GiB
  read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
  copy = jax.jit(lambda x: x * jnp.bfloat16(1.5))
  for name, fn, moved in (("read", read, x.nbytes), ("copy", copy, 2 * x.nbytes)):
    seconds = bench.time_one(fn, [(x,)], warmup=3, repeats=20)
    print(f"BANDWIDTH {name}: {moved / seconds / 1e12:.2f} TB/s ({seconds * 1e3:.3f} ms)",
          flush=True)


def profile(problem_indices, trace_root: str):
  """Kernel time per call, by kernel, of flash_jax (contiguous, paged) and cuDNN inside
  the loop protocol (jax.profiler trace of one looped run each)."""
  import pathlib
  from trace_kernels import kernel_times
  for i in problem_indices:
    problem = bench_decode.DEFAULT_PROBLEMS[i]
    sets = (bench_decode.make_inputs(problem, 0), bench_decode.make_inputs(problem, 1))
    fns = bench_decode.contenders("gpu")
    for name in ("flash_jax", "flash_jax paged", "jax.nn[cudnn]"):
      looped = bench_decode.looped(fns[name])
      trace_dir = pathlib.Path(trace_root) / f"{i}_{name.replace(' ', '_')}"
      try:
        jax.block_until_ready(looped(*sets))
        with jax.profiler.trace(str(trace_dir)):
          jax.block_until_ready(looped(*sets))
      except Exception as error:  # noqa: BLE001 (report, go on with the others)
        print(f"PROFILE {problem.label} {name}: {bench.error_text(error)}", flush=True)
        continue
      kernels = kernel_times(trace_dir, bench_decode.CALLS_PER_LOOP, top=6)
      print(f"PROFILE {problem.label} {name}: " +
            "; ".join(f"{us} us {kernel}" for kernel, us in kernels), flush=True)


def hlo_check() -> bool:
  problem = bench_decode.DecodeProblem(8, 32768, 1, 32, 8, 128)
  x = bench_decode.make_inputs(problem, 0)
  fn = jax.jit(lambda x: flash_jax.paged_attention(x.q, x.k_pages, x.v_pages, x.block_tables,
                                                   x.lengths))
  text = fn.lower(x).compile().as_text()
  # A contiguous copy would be a gather (or fusion output) holding B x S x Nkv x H elements.
  big = problem.batch * problem.kv_len * problem.num_kv_heads * problem.head_dim
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"bf16\[([\d,]+)\][^\n]*gather", text)]
  ok = all(size < big for size in sizes)
  print(f"HLO gathers of bf16: {sizes[:8]} (a copy would be {big}): "
        f"{'PASSED' if ok else 'FAILED'}", flush=True)
  return ok


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["check", "sweep", "splits", "paged", "bandwidth", "hlo",
                                           "profile", "compare"])
  parser.add_argument("--implementation", default="triton")
  parser.add_argument("--problems", type=int, nargs="+", default=list(range(6)))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--trace-dir", default="/tmp/decode_traces", help="profile's traces")
  parser.add_argument("--configs", default='[{"num_stages_split": 2}]',
                      help="compare: a JSON list of config fields of --implementation")
  parser.add_argument("--paged", action="store_true", help="compare: paged caches")
  parser.add_argument("--shape", type=int, nargs=6, metavar=("B", "S", "T", "NQ", "NKV", "H"),
                      help="compare: this problem in place of --problems")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  if args.mode == "check":
    sys.exit(0 if check(args.implementation) else 1)
  if args.mode == "hlo":
    sys.exit(0 if hlo_check() else 1)
  if args.mode == "bandwidth":
    return bandwidth()
  if args.mode == "profile":
    return profile(args.problems, args.trace_dir)
  if args.mode == "compare":
    import json
    problems = ([bench_decode.DecodeProblem(*args.shape)] if args.shape else
                [bench_decode.DEFAULT_PROBLEMS[i] for i in args.problems])
    return compare(problems, args.repeats, json.loads(args.configs), args.paged,
                   args.implementation)
  if args.mode == "paged":
    return paged_sweep(args.problems, args.repeats)
  if args.mode == "splits":
    return splits_sweep(args.problems, args.repeats)
  sweep(args.problems, args.repeats)


if __name__ == "__main__":
  main()
