"""End-to-end generation on one GPU in one call: flash_jax's modules vs Flax's decode cache.

Issue 17's problem: examples/train_lm.py's decoder-only LM in bf16, d_model 1024, 8
layers, 8 query heads over 8 K/V heads (MHA) and over 2 (GQA), batch 32, prompts of
512-2048 tokens (windows of the standard library's source), 1024 new tokens each, greedy.
Each row is one run of examples/generate.py's engine, in one process:

  flash paged       paged_attention / write_kv_pages, continuous batching, chunked prefill
  flash contiguous  FlashAttention's own decode cache (init_cache(ragged=True))
  flax              nnx.MultiHeadAttention's decode cache (one token per call, dense mask)

It reports end-to-end new tokens/s (prefill + decode, compilation excluded), ms per
decode step (steps that carry no prefill), cache memory, and the ratios to Flax's
(the bar: >= 3x tokens/s end to end, >= 2x per decode step). Runs go in order of
importance (paged and flax first); one that would push the total past --budget-s is
skipped and says so. The table comes last.

  python benchmarks/generate_gpu.py                    # the issue's problem (H200: ~4 min)
  python benchmarks/generate_gpu.py --new-tokens 256   # shorter
  python benchmarks/generate_gpu.py --tiny             # CPU smoke test: tiny sizes
  python benchmarks/generate_gpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "examples"))
import generate  # noqa: E402

LAYOUTS = {"mha": 8, "gqa": 2}  # K/V heads under 8 query heads
RUNS = (("mha", "paged"), ("mha", "flax"), ("gqa", "paged"), ("gqa", "flax"),
        ("mha", "contiguous"), ("gqa", "contiguous"))


def problem(args, kv_heads: int) -> list[str]:
  if args.tiny:
    return ["--requests", "4", "--slots", "2", "--min-prompt", "8", "--max-prompt", "24",
            "--new-tokens", str(args.new_tokens or 8), "--prefill-chunk", "8",
            "--page-size", "8", "--max-context", "40", "--layers", "2", "--d-model", "64",
            "--heads", "4", "--kv-heads", str(max(kv_heads // 2, 1)), "--dtype", "float32",
            "--data-mb", "0.1"]
  new = args.new_tokens or 1024
  return ["--requests", str(args.batch), "--slots", str(args.batch), "--min-prompt", "512",
          "--max-prompt", "2048", "--new-tokens", str(new), "--min-new-tokens", str(new),
          "--prefill-chunk", str(args.prefill_chunk), "--page-size", "64",
          "--max-context", str(2048 + new), "--layers", "8", "--d-model", "1024", "--heads", "8",
          "--kv-heads", str(kv_heads), "--mlp-ratio", "4", "--dtype", "bfloat16",
          "--data-mb", "2"]


def common_prefix_fraction(a, b) -> float:
  """Mean over requests of the tokens two greedy runs agree on before they first differ
  (bf16 runs may part ways after a near tie; early disagreement would be a bug)."""
  fractions = []
  for x, y in zip(a, b):
    same = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
    fractions.append(same / max(len(x), 1))
  return sum(fractions) / max(len(fractions), 1)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--tiny", action="store_true", help="tiny sizes (CPU smoke test)")
  p.add_argument("--new-tokens", type=int, default=None, help="default 1024 (tiny: 8)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--prefill-chunk", type=int, default=512)
  p.add_argument("--layouts", nargs="+", choices=tuple(LAYOUTS), default=tuple(LAYOUTS))
  p.add_argument("--caches", nargs="+", choices=("paged", "flax", "contiguous"),
                 default=("paged", "flax", "contiguous"))
  p.add_argument("--budget-s", type=float, default=270.0,
                 help="skip runs that would take the total past this")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)

  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
  start, rows, durations = time.perf_counter(), [], {}
  for layout, cache in RUNS:
    if layout not in args.layouts or cache not in args.caches:
      continue
    elapsed = time.perf_counter() - start
    estimate = durations.get(cache, 0.0)  # the same cache's last run (compilation included)
    if elapsed + estimate > args.budget_s:
      print(f"skipped {layout} {cache}: {elapsed:.0f} s spent, about {estimate:.0f} s more "
            f"would pass --budget-s {args.budget_s:.0f}", flush=True)
      continue
    flags = problem(args, LAYOUTS[layout]) + ["--no-progress"]
    flags += ["--attention", "flax"] if cache == "flax" else ["--cache", cache]
    tick = time.perf_counter()
    result = generate.main(flags)
    durations[cache] = time.perf_counter() - tick
    result.update(layout=layout, wall_s=round(durations[cache], 1))
    rows.append(result)

  by_key = {(r["layout"], r["cache"]): r for r in rows}
  for r in rows:
    flax_run = by_key.get((r["layout"], "flax"))
    if flax_run is not None and r is not flax_run:
      r["speedup_tokens_per_s"] = round(r["tokens_per_s"] / flax_run["tokens_per_s"], 2)
      if r["decode_step_ms"] and flax_run["decode_step_ms"]:
        r["speedup_decode_step"] = round(flax_run["decode_step_ms"] / r["decode_step_ms"], 2)
      r["same_greedy_prefix"] = round(common_prefix_fraction(r["generated"],
                                                             flax_run["generated"]), 3)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "generated"} for r in rows], indent=1))

  print(f"\ngeneration, {rows[0]['device'] if rows else '?'}, {rows[0]['dtype'] if rows else ''}: "
        f"{rows[0]['requests'] if rows else 0} prompts of "
        f"{'8-24' if args.tiny else '512-2048'} tokens, "
        f"{rows[0]['new_tokens'] // max(rows[0]['requests'], 1) if rows else 0} new tokens each; "
        f"total {time.perf_counter() - start:.0f} s")
  header = ("layout", "cache", "new tokens/s", "vs flax", "ms/decode step", "vs flax (faster)",
            "cache MiB", "greedy prefix = flax")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = (r["layout"], r["cache"], f"{r['tokens_per_s']:.0f}",
             str(r.get("speedup_tokens_per_s", "")), f"{r['decode_step_ms'] or 0:.3f}",
             str(r.get("speedup_decode_step", "")), f"{r['cache_mib']:.1f}",
             str(r.get("same_greedy_prefix", "")))
    print("| " + " | ".join(cells) + " |")
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
