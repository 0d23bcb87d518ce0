"""Where a generation decode step's time goes: one step of examples/generate.py's engines,
timed two ways, with the compiled step's large copies listed.

Issue 17's model (bf16, d_model 1024, 8 layers, 8 query heads over 8 or 2 K/V heads,
batch 32) at one decode step with every row `--context` tokens deep (ragged: 75-100%):

  host    a synchronous engine: host arrays in, np.asarray(next tokens) out, one step per
          call (examples/generate.py dispatches a step ahead instead: see its Pending);
          dispatch: the part of it until the call returns (launches, transfers)
  queued  the same host arguments, calls back to back with no wait
  device  the compiled step called --repeats times back to back on device-resident
          arguments (its outputs fed back), one wait at the end: the GPU's time per step

and, from the compiled HLO, every copy of more than 1 MiB (a page pool or cache copied
per step would show here).

  python benchmarks/decode_step_gpu.py --json out.json
  python benchmarks/decode_step_gpu.py --tiny          # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import generate  # noqa: E402
from trace_kernels import kernel_times  # noqa: E402
import train_lm  # noqa: E402


def large_copies(hlo: str, min_bytes: int = 2**20) -> list[str]:
  """Copy instructions of at least min_bytes in compiled HLO text."""
  found = []
  sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u8": 1, "s8": 1, "pred": 1}
  for line in hlo.splitlines():
    match = re.search(r"= (\w+)\[([\d,]*)\][^ ]* (copy|copy-start)\(", line)
    if match and match.group(1) in sizes:
      dims = [int(d) for d in match.group(2).split(",") if d]
      if sizes[match.group(1)] * int(np.prod(dims)) >= min_bytes:
        found.append(line.strip()[:160])
  return found


def time_step(compiled, args, feed_back, repeats: int):
  """(host, dispatch, queued, device) ms per step, and the last arguments (the cache is
  donated). dispatch: until the call returns, on an idle GPU; queued: host arguments,
  calls back to back. feed_back(args, outputs) -> the next call's args."""
  outputs = compiled(*args)
  jax.block_until_ready(outputs)
  host, dispatch = [], []
  for _ in range(repeats):  # host arguments, a wait per step
    args = feed_back(args, outputs)  # the small arguments stay numpy arrays, as in the engine
    tick = time.perf_counter()
    outputs = compiled(*args)
    dispatch.append(time.perf_counter() - tick)
    np.asarray(outputs[1])
    host.append(time.perf_counter() - tick)
  args = feed_back(args, outputs)
  tick = time.perf_counter()
  for _ in range(repeats):  # host arguments, no wait
    outputs = compiled(*args)
    args = feed_back(args, outputs)
  jax.block_until_ready(outputs)
  queued = (time.perf_counter() - tick) / repeats
  args = jax.device_put(args)
  jax.block_until_ready(args)
  tick = time.perf_counter()
  for _ in range(repeats):
    outputs = compiled(*args)
    args = feed_back(args, outputs)
  jax.block_until_ready(outputs)
  device = (time.perf_counter() - tick) / repeats
  return (1e3 * float(np.median(host)), 1e3 * float(np.median(dispatch)), 1e3 * queued,
          1e3 * device, args)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--context", type=int, default=2048, help="deepest row's cached tokens")
  p.add_argument("--max-context", type=int, default=3072)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--layouts", nargs="+", default=("mha", "gqa"))
  p.add_argument("--caches", nargs="+", default=("paged", "flax"))
  p.add_argument("--page-size", type=int, default=64)
  p.add_argument("--implementation", default=None)
  p.add_argument("--dump", default=None, help="a directory for the compiled HLO texts")
  p.add_argument("--profile", default=None,
                 help="a directory for jax.profiler traces: kernel time per step, by name")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  if args.tiny:
    shape = dict(seq_len=96, d_model=64, layers=2, heads=4, mlp_ratio=4)
    args.context, args.batch, args.page_size, args.repeats = 64, 2, 16, 3
    dtype = "float32"
  else:
    shape = dict(seq_len=args.max_context, d_model=1024, layers=8, heads=8, mlp_ratio=4)
    dtype = "bfloat16"
  kv_heads = {"mha": shape["heads"], "gqa": max(shape["heads"] // 4, 1)}
  rng = np.random.default_rng(0)
  lengths = rng.integers(int(0.75 * args.context), args.context + 1, args.batch).astype(np.int32)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; cached tokens "
        f"{lengths.min()}-{lengths.max()} (mean {lengths.mean():.0f})", flush=True)
  rows = []
  for layout in args.layouts:
    for cache_kind in args.caches:
      config = train_lm.ModelConfig(**shape, kv_heads=kv_heads[layout],
                                    attention="flax" if cache_kind == "flax" else "flash",
                                    dtype=dtype, implementation=args.implementation,
                                    remat=False)
      model = train_lm.LanguageModel(config, nnx.Rngs(0))
      sampling = generate.Sampling()
      key = jax.random.key(0)
      tokens = rng.integers(0, 256, (args.batch, 1)).astype(np.int32)
      if cache_kind == "flax":
        generate.init_module_caches(model, args.batch, config.seq_len, dtype, ragged=False)
      graphdef, params, params_def, cache, cache_def = generate.step_operands(model, dtype)
      if cache_kind == "paged":
        paged = generate.PagedCache(config, args.batch, args.batch * -(-config.seq_len //
                                                                        args.page_size),
                                    args.page_size, dtype)
        for slot in range(args.batch):
          paged.admit(slot, config.seq_len)
        paged.tables[:] = rng.permutation(paged.tables.ravel()).reshape(paged.tables.shape)
        step = generate.make_paged_step(graphdef, params_def, sampling, config.seq_len,
                                        args.implementation)
        counts = np.ones(args.batch, np.int32)
        call = (params, paged.arrays, paged.tables, lengths, tokens, counts, tokens[:, 0],
                np.ones(args.batch, bool), key, np.int32(0))
        feed_back = lambda a, out: (a[0], out[0], *a[2:6], out[1], *a[7:])
        cache_bytes = paged.bytes
      else:
        step = generate.make_flax_step(graphdef, params_def, cache_def, sampling,
                                       config.seq_len)
        call = (params, cache, np.int32(args.context), tokens, tokens[:, 0],
                np.ones(args.batch, bool), key, np.int32(0))
        feed_back = lambda a, out: (a[0], out[0], *a[2:4], out[1], *a[5:])
        cache_bytes = sum(x.nbytes for x in cache)
      compiled = jax.jit(step, donate_argnums=(1,)).lower(*call).compile()
      hlo = compiled.as_text()
      if args.dump:
        pathlib.Path(args.dump).mkdir(parents=True, exist_ok=True)
        (pathlib.Path(args.dump) / f"{layout}_{cache_kind}.hlo").write_text(hlo)
      copies = large_copies(hlo)
      host_ms, dispatch_ms, queued_ms, device_ms, state = time_step(compiled, call, feed_back, args.repeats)
      kernels = None
      if args.profile:
        trace_dir = pathlib.Path(args.profile) / f"{layout}_{cache_kind}"
        with jax.profiler.trace(str(trace_dir)):
          for _ in range(5):
            outputs = compiled(*state)
            state = feed_back(state, outputs)
          jax.block_until_ready(outputs)
        kernels = kernel_times(trace_dir, 5)
      row = dict(layout=layout, cache=cache_kind, host_ms=round(host_ms, 3),
                 dispatch_ms=round(dispatch_ms, 3), queued_ms=round(queued_ms, 3),
                 device_ms=round(device_ms, 3), cache_mib=round(cache_bytes / 2**20, 1),
                 large_copies=len(copies), custom_calls=hlo.count("custom-call("),
                 fusions=len(re.findall(r"^\s*\S+ = \S+ fusion\(", hlo, re.M)))
      rows.append(row)
      print(json.dumps(row), flush=True)
      for line in copies[:6]:
        print("   ", line, flush=True)
      for name, us in kernels or ():
        print(f"    {us:9.1f} us/step  {name}", flush=True)
      row["kernels_us_per_step"] = kernels
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
