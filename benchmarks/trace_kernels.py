"""Kernel time by name from a jax.profiler trace (the benchmarks' GPU profiles).

  with jax.profiler.trace(directory): ...run `steps` steps...
  for name, us in kernel_times(pathlib.Path(directory), steps): ...
"""

from __future__ import annotations

import gzip
import json
import pathlib
import re


def kernel_times(trace_dir: pathlib.Path, steps: int, top: int = 12) -> list[tuple[str, float]]:
  """(kernel name, µs per step), largest first, from a jax.profiler perfetto trace."""
  totals, lines = {}, set()
  for path in trace_dir.rglob("*.trace.json.gz"):
    events = json.loads(gzip.open(path).read()).get("traceEvents", [])
    names = {(e.get("pid"), e.get("tid") if e["name"] == "thread_name" else None):
             e["args"].get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") in ("thread_name", "process_name")}
    for e in events:
      process = names.get((e.get("pid"), None), "")
      thread = names.get((e.get("pid"), e.get("tid")), "")
      if e.get("ph") != "X" or "/device:" not in process or "/device:CPU" in process:
        continue
      lines.add(thread)
      if thread.startswith("Stream"):  # kernels and copies as the GPU ran them
        name = re.sub(r"[._]\d+$", "", e.get("name", "?"))[:60]
        totals[name] = totals.get(name, 0.0) + e.get("dur", 0.0)
  if not totals and lines:
    print(f"    no stream lines in the trace; device lines: {sorted(lines)}", flush=True)
  ranked = sorted(totals.items(), key=lambda kv: -kv[1])
  return [(name, round(us / steps, 1)) for name, us in ranked[:top]] + [
      ("(all kernels)", round(sum(totals.values()) / steps, 1))]
