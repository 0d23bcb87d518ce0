"""Benchmark: `python -m flash_jax.bench` (FlashAttention-paper protocol).

batch x seq = 16384 tokens, model dim 2048 (heads = 2048 / head_dim), seq 512..16384,
head dims 64/128/256, causal and not, forward and forward+backward. FLOPs: forward
4 * B * N * T * S * H, halved when causal; backward 2.5x forward, so forward+backward
is 3.5x. Every available flash_jax implementation and jax.nn.dot_product_attention
('xla', and 'cudnn' on NVIDIA) run in one process, timed call by call in turn
(`time_interleaved`); the table gives TFLOP/s and each row's ratio to cuDNN. On CPU the
defaults shrink so that a run takes about a minute.

`--peers torch` adds PyTorch SDPA's cuDNN and flash backends when they can run here
(flash_jax/bench_peers.py); `--plot out.png` draws TFLOP/s against sequence length
(flash_jax/bench_plot.py, needs matplotlib), also from earlier runs' JSON (`--from-json`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import flash_jax
from flash_jax import bench_peers
from flash_jax import bench_plot  # matplotlib only when a plot is drawn
from flash_jax import dispatch


@dataclasses.dataclass(frozen=True)
class Problem:
  seq_len: int
  head_dim: int
  causal: bool
  mode: str  # "fwd" | "fwd_bwd"
  tokens: int
  model_dim: int
  dtype: str
  head_dim_v: int | None = None  # None: Hv = H
  dropout_rate: float = 0.0

  @property
  def batch(self) -> int:
    return max(1, self.tokens // self.seq_len)

  @property
  def heads(self) -> int:
    return max(1, self.model_dim // self.head_dim)

  @property
  def value_head_dim(self) -> int:
    return self.head_dim_v or self.head_dim

  def flops(self) -> float:
    return attention_flops(self.batch, self.heads, self.seq_len, self.seq_len, self.head_dim,
                           causal=self.causal, backward=self.mode == "fwd_bwd",
                           head_dim_v=self.value_head_dim)


def attention_flops(batch, heads, q_len, kv_len, head_dim, *, causal: bool,
                    backward: bool = False, head_dim_v: int | None = None) -> float:
  """The FlashAttention papers' count: 4·B·N·T·S·H forward (two matmuls of 2·T·S·H; with
  Hv != H, 2·T·S·(H + Hv)), half when causal; the backward is 2.5x the forward, so
  forward+backward is 3.5x."""
  head_dims = head_dim + (head_dim_v or head_dim)
  forward = 2.0 * batch * heads * q_len * kv_len * head_dims / (2 if causal else 1)
  return forward * (3.5 if backward else 1.0)


def parse_head_dims(text: str) -> tuple[int, int | None]:
  """--head-dims entries: '128' -> (128, None); '192:128' -> (192, 128) (Hv != H)."""
  h, _, hv = text.partition(":")
  try:
    return int(h), (int(hv) if hv else None)
  except ValueError:
    raise argparse.ArgumentTypeError(f"head dims are H or H:Hv, got {text!r}") from None


# The matmuls a two-kernel backward's kernels really issue per tile pair, in units of the
# forward's two (QK^T, PV): dK/dV recomputes QK^T and does dP, dV, dK (4); dQ recomputes
# QK^T and does dP, dQ (3). For per-kernel TFLOP/s: attention_flops(...) * the factor.
KERNEL_MATMULS = {"fwd": 1.0, "dkv": 2.0, "dq": 1.5}


# XLA's determinism switch as a per-compilation option, so that one process can time cuDNN
# both ways (its backward is reproducible only with it; flash_jax's `deterministic`).
DETERMINISTIC_XLA = {"xla_gpu_deterministic_ops": True}
CUDNN_DETERMINISTIC = "jax.nn[cudnn,det]"


def dropout_kwargs(rate: float) -> dict:
  """flash_attention's dropout arguments for a bench problem (a fixed key), {} at rate 0."""
  return dict(dropout_rate=rate, dropout_rng=jax.random.PRNGKey(0)) if rate else {}


def _contenders(platform: str, names, dropout_rate: float = 0.0,
                cudnn_deterministic: bool = False) -> dict:
  """name -> attention function (q, k, v, causal) for every contender on this platform
  (jax.nn's only without dropout: it has none). A function's `compiler_options`
  attribute, where set, goes to jax.jit."""
  fns = {}
  dropout = dropout_kwargs(dropout_rate)
  for name in names:
    fns[name] = lambda q, k, v, causal, name=name: flash_jax.flash_attention(
        q, k, v, causal=causal, implementation=name, **dropout)
  if dropout_rate:
    return fns
  fns["jax.nn[xla]"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
      q, k, v, is_causal=causal, implementation="xla")
  if platform == "gpu":
    fns["jax.nn[cudnn]"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn")
    if cudnn_deterministic:
      deterministic = lambda q, k, v, causal: fns["jax.nn[cudnn]"](q, k, v, causal)
      deterministic.compiler_options = DETERMINISTIC_XLA
      fns[CUDNN_DETERMINISTIC] = deterministic
  return fns


def _inputs(problem: Problem, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
  shape_v = shape[:3] + (problem.value_head_dim,)
  dtype = jnp.dtype(problem.dtype)
  return tuple(jax.random.normal(key, s, dtype)  # q, k, v, dout
               for key, s in zip(keys, (shape, shape, shape_v, shape_v)))


def timed_function(fn, mode: str, compiler_options=None):
  """fn(q, k, v) -> out, as the jitted function of (q, k, v, dout) that the protocol times:
  the forward (`mode` "fwd") or the forward and its vjp ("fwd_bwd")."""
  jit = lambda f: jax.jit(f, compiler_options=compiler_options)
  if mode == "fwd":
    return jit(lambda q, k, v, do: fn(q, k, v))

  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)
  return jit(fwd_bwd)


def _compiled(fn, problem: Problem):
  return timed_function(lambda q, k, v: fn(q, k, v, problem.causal), problem.mode,
                        getattr(fn, "compiler_options", None))


def time_interleaved(calls, repeats: int):
  """Median seconds per call of each entry of `calls` (name -> call(i), which runs repeat i
  and blocks until its result is ready), timed round-robin: round i calls every entry once,
  in an order rotated by i, so that all contenders sample the same stretch of the device's
  clocks and temperature and none always runs first or last. An entry that raises drops
  out. Returns ({name: seconds}, {name: exception})."""
  names = list(calls)
  samples = {name: [] for name in names}
  failed = {}
  for i in range(repeats if names else 0):
    shift = i % len(names)
    for name in names[shift:] + names[:shift]:
      if name in failed:
        continue
      start = time.perf_counter()
      try:
        calls[name](i)
      except Exception as e:  # out of memory at run time: report, go on
        failed[name] = e
        continue
      samples[name].append(time.perf_counter() - start)
  seconds = {name: statistics.median(t) for name, t in samples.items()
             if name not in failed and t}
  return seconds, failed


def time_contenders(fns, arg_sets, *, warmup: int, repeats: int):
  """Compiles and warms up each of `fns` (name -> function) on arg_sets[0], then times them
  together (`time_interleaved`), repeat i on arg_sets[i % len(arg_sets)]. Returns
  ({name: median seconds}, {name: exception}); a contender that raises while warming up
  (NotImplementedError included) or running drops out."""
  calls, failed = {}, {}
  for name, fn in fns.items():
    try:
      for _ in range(warmup):
        jax.block_until_ready(fn(*arg_sets[0]))
    except Exception as e:  # out of memory, compile failure, declined: report, go on
      failed[name] = e
      continue
    calls[name] = lambda i, fn=fn: jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  seconds, run_failed = time_interleaved(calls, repeats)
  return seconds, {**failed, **run_failed}


def time_one(fn, arg_sets, *, warmup: int = 3, repeats: int = 10) -> float:
  """Median seconds of one function's calls (`time_contenders` of one); raises what it raises."""
  seconds, failed = time_contenders({"fn": fn}, arg_sets, warmup=warmup, repeats=repeats)
  if failed:
    raise failed["fn"]
  return seconds["fn"]


def compare_lines(fns, arg_sets, *, flops: float, describe: str, warmup: int, repeats: int,
                  base: str | None = None, width: int = 22) -> list[str]:
  """Times `fns` together (`time_contenders`); one line per contender, in order:
  TFLOP/s, ms and the ratio to contender `base`, or the error."""
  seconds, failed = time_contenders(fns, arg_sets, warmup=warmup, repeats=repeats)
  base_tflops = flops / seconds[base] / 1e12 if base in seconds else None
  lines = []
  for name in fns:
    if name in seconds:
      tflops = flops / seconds[name] / 1e12
      ratio = f"{tflops / base_tflops:5.2f}x" if base_tflops else ""
      lines.append(f"{describe} {name:>{width}}: {tflops:7.1f} TFLOP/s "
                   f"{seconds[name] * 1e3:8.3f} ms {ratio}")
    else:
      lines.append(f"{describe} {name:>{width}}: ERR {error_text(failed[name])}")
  return lines


def error_text(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"


def run(problems, contenders, *, warmup, repeats, log=sys.stderr, peers=()):
  """One row per (problem, contender). Per problem, every contender is compiled and warmed
  up first, then all are timed together (`time_interleaved`); inputs rotate between two
  sets. `peers` (flash_jax/bench_peers.py) add their contenders, timed the same way."""
  rows = []
  names = [*contenders, *(name for peer in peers for name in peer.contenders)]
  width = max(14, *map(len, names)) if names else 14
  for n, problem in enumerate(problems):
    args = [_inputs(problem, seed) for seed in (0, 1)]
    compiled, declined = {}, {}
    for name, fn in contenders.items():
      try:
        if name.startswith("jax.nn") and problem.value_head_dim != problem.head_dim:
          raise NotImplementedError("jax.nn.dot_product_attention needs Hv == H")
        if name in dispatch.implementation_names():
          q, k, v, _ = args[0]
          flash_jax.which_implementation(q, k, v, causal=problem.causal, implementation=name,
                                         **dropout_kwargs(problem.dropout_rate))
        compiled[name] = _compiled(fn, problem)
      except NotImplementedError as e:
        declined[name] = e
    for peer in peers:
      try:
        compiled.update(peer.timed_functions(problem, args))
      except NotImplementedError as e:
        declined.update(dict.fromkeys(peer.contenders, e))
    seconds, failed = time_contenders(compiled, args, warmup=warmup, repeats=repeats)
    for name in names:
      row = dict(dataclasses.asdict(problem), batch=problem.batch, heads=problem.heads,
                 implementation=name)
      error = declined.get(name) or failed.get(name)
      if name in seconds:
        row.update(ms=seconds[name] * 1e3, tflops=problem.flops() / seconds[name] / 1e12)
      elif isinstance(error, NotImplementedError):
        row.update(status=f"n/a: {error}")
      else:
        row.update(status=f"error: {error_text(error)}")
      rows.append(row)
      print(f"[{n + 1}/{len(problems)}] {_describe(problem)} {name:>{width}}: "
            f"{_cell(row)}", file=log, flush=True)
  return rows


def _describe(p: Problem) -> str:
  dims = bench_plot.head_dims_label(dataclasses.asdict(p))
  return (f"{p.mode:7} d{dims:<3} s{p.seq_len:<5} {'causal' if p.causal else 'full  '} "
          f"b{p.batch}xh{p.heads}")


def _cell(row) -> str:
  return f"{row['tflops']:8.4g} TFLOP/s {row['ms']:9.3f} ms" if "tflops" in row else row["status"]


def table(rows) -> str:
  """One line per problem: each contender's TFLOP/s and its ratio to cuDNN."""
  names = list(dict.fromkeys(r["implementation"] for r in rows))
  keyed = {}
  for r in rows:
    key = (r["mode"], bench_plot.head_dims_label(r), r["seq_len"], r["causal"])
    keyed.setdefault(key, {})[r["implementation"]] = r
  header = f"{'mode':7} {'d':>4} {'seq':>6} {'causal':>6} | " + " | ".join(
      f"{n:>22}" for n in names)
  lines = [header, "-" * len(header)]
  for (mode, d, s, causal), by_name in keyed.items():
    base = by_name.get("jax.nn[cudnn]", {}).get("tflops")
    cells = []
    for n in names:
      r = by_name.get(n, {})
      if not r:  # not timed at this problem (runs merged by --from-json)
        cells.append(f"{'-':>22}")
      elif "tflops" not in r:
        cells.append(f"{'n/a' if r.get('status', '').startswith('n/a') else 'error':>22}")
      elif base:
        cells.append(f"{r['tflops']:7.1f} TF/s ({r['tflops'] / base:4.2f}x)".rjust(22))
      else:
        ms = f" ({r['ms']:.2f} ms)" if "ms" in r else ""  # transcribed runs have no ms
        cells.append(f"{r['tflops']:7.3g} TF/s{ms}".rjust(22))
    lines.append(f"{mode:7} {d:>4} {s:>6} {str(causal):>6} | " + " | ".join(cells))
  return "\n".join(lines)


def main(argv=None):
  platform = jax.default_backend()
  on_cpu = platform == "cpu"
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-lens", type=int, nargs="+",
                      default=[128, 256] if on_cpu else [512, 1024, 2048, 4096, 8192, 16384])
  parser.add_argument("--head-dims", type=parse_head_dims, nargs="+",
                      default=["64"] if on_cpu else ["64", "128", "256"],
                      help="H, or H:Hv for a value head dim Hv != H (MLA: 192:128)")
  parser.add_argument("--causal", choices=["both", "true", "false"], default="both")
  parser.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
  parser.add_argument("--tokens", type=int, default=512 if on_cpu else 16384,
                      help="batch x seq (paper: 16384)")
  parser.add_argument("--model-dim", type=int, default=256 if on_cpu else 2048,
                      help="heads x head_dim (paper: 2048)")
  parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
  parser.add_argument("--implementations", nargs="+", default=None,
                      help="flash_jax implementations (default: all registered for this platform)")
  parser.add_argument("--warmup", type=int, default=1 if on_cpu else 3)
  parser.add_argument("--repeats", type=int, default=3 if on_cpu else 20)
  parser.add_argument("--json", default="bench_results.json", help="where to write all rows")
  parser.add_argument("--cudnn-deterministic", action="store_true",
                      help=f"also time cuDNN compiled with XLA's determinism switch "
                           f"({CUDNN_DETERMINISTIC}: its reproducible backward)")
  parser.add_argument("--dropout", type=float, default=0.0, metavar="RATE",
                      help="attention dropout at this rate (flash_jax's contenders only: "
                      "jax.nn has none)")
  parser.add_argument("--decode", action="store_true",
                      help="the decode benchmark instead (flash_jax/bench_decode.py)")
  parser.add_argument("--protocol", choices=["loop", "call"], default="loop",
                      help="--decode: calls in a compiled loop, or one host dispatch each")
  parser.add_argument("--peers", nargs="+", default=[], choices=sorted(bench_peers.PEERS),
                      help="other libraries' attention timed beside the others when they can "
                      "run here (torch: PyTorch SDPA's cuDNN and flash backends on CUDA)")
  parser.add_argument("--plot", metavar="PATH", default=None,
                      help="also draw TFLOP/s against sequence length to PATH (.png, .svg, "
                      f".pdf); needs matplotlib: pip install '{bench_plot.EXTRA}'")
  parser.add_argument("--from-json", metavar="FILE", nargs="+", default=None,
                      help="run nothing: the table (and --plot) of earlier runs' --json files, "
                      "the later file winning where two time the same problem")
  args = parser.parse_args(argv)
  if args.plot:
    _require_matplotlib(parser)
  if args.from_json:
    if args.decode or args.peers:
      parser.error("--from-json reads earlier runs: it takes no --decode or --peers")
    return _main_from_json(args)
  if args.dropout and (args.peers or args.decode):
    parser.error("--dropout times flash_jax's implementations only: no --peers or --decode")
  if args.decode:
    if args.peers or args.plot:
      parser.error("--peers and --plot apply to the attention bench, not to --decode")
    return _main_decode(args, platform)

  names = args.implementations or [e.name for e in dispatch.REGISTRY if platform in e.platforms]
  causals = {"both": [False, True], "true": [True], "false": [False]}[args.causal]
  problems = [Problem(s, d, c, m, args.tokens, args.model_dim, args.dtype, head_dim_v=dv,
                      dropout_rate=args.dropout)
              for m in args.modes for d, dv in args.head_dims for s in args.seq_lens
              for c in causals]
  device = jax.devices()[0]
  peers, peer_report = bench_peers.load(args.peers, platform)
  contenders = _contenders(platform, names, args.dropout, args.cudnn_deterministic)
  count = len(contenders) + sum(len(peer.contenders) for peer in peers)
  print(f"flash_jax {flash_jax.__version__} on {device.device_kind} ({platform}), jax {jax.__version__}; "
        f"{len(problems)} problems x {count} contenders", flush=True)
  for name, report in peer_report.items():
    print(f"peer {name}: {report}", flush=True)
  rows = run(problems, contenders, warmup=args.warmup, repeats=args.repeats, peers=peers,
             log=sys.stderr)  # today's stderr, not the one at import (tests capture it)
  with open(args.json, "w") as f:
    json.dump(dict(device=device.device_kind, platform=platform, jax=jax.__version__,
                   **(dict(peers=peer_report) if peer_report else {}), rows=rows), f, indent=1)
  print(table(rows))
  print(f"(rows written to {args.json})")
  if args.plot:
    _plot(rows, args.plot, f"{device.device_kind}, JAX {jax.__version__}, {args.dtype}")


def _require_matplotlib(parser):
  """Fails before anything runs, not after a long run, when --plot cannot draw."""
  try:
    bench_plot.require_matplotlib()
  except ImportError as e:
    parser.error(str(e))


def _plot(rows, path, title):
  print(f"(plot written to {bench_plot.save(rows, path, title=title)})")


def _main_from_json(args):
  runs = bench_plot.load(args.from_json)
  for path in runs["skipped"]:
    print(f"(skipped {path}: a decode run)", file=sys.stderr)
  print(table(runs["rows"]))
  if args.plot:
    _plot(runs["rows"], args.plot, runs["title"])


def _main_decode(args, platform):
  from flash_jax import bench_decode  # pylint: disable=import-outside-toplevel
  device = jax.devices()[0]
  problems = bench_decode.CPU_PROBLEMS if platform == "cpu" else bench_decode.DEFAULT_PROBLEMS
  print(f"flash_jax {flash_jax.__version__} decode on {device.device_kind} ({platform}), "
        f"jax {jax.__version__}; {len(problems)} problems", flush=True)
  rows = bench_decode.measure(problems, bench_decode.contenders(platform),
                              warmup=args.warmup, repeats=args.repeats, protocol=args.protocol,
                              log=lambda line: print(line, file=sys.stderr, flush=True))
  with open(args.json, "w") as f:
    json.dump(dict(device=device.device_kind, platform=platform, jax=jax.__version__,
                   mode="decode", protocol=args.protocol, rows=rows), f, indent=1)
  print(bench_decode.table(rows, device.device_kind))
  print(f"(rows written to {args.json})")


if __name__ == "__main__":
  main()
