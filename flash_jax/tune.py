"""Tuner: `python -m flash_jax.tune --implementation triton|mosaic_gpu`.

Sweeps candidate configs of a GPU backend and writes a tuning table (flash_jax/tuning.py)
with the fastest candidate per entry. The config's fields come in groups, one per kernel:
the forward (timed forward only), dK/dV and dQ (timed forward+backward), the backward's
form (`atomic_dq`, timed forward+backward) and the split-KV kernel (timed on decode
problems). Problems: the FlashAttention-paper protocol
of `python -m flash_jax.bench` (batch x seq = 16384 tokens, model dim 2048) at each
--seq-lens, head dim and causal, and the decode problems of flash_jax/bench_decode.py.

An entry is a group's fields for one table key (head dim, causal, dtype): the problems
with that key decide it. Each candidate is first checked against the float32 reference
(HIGHEST precision on upcast inputs) under flash_jax.accuracy's rule; one that fails or
crashes is dropped and reported. The rest are timed in turn in one process
(`bench.time_contenders`, the decode problems in `bench_decode`'s loop), every other
field at its current default (the winners of earlier groups included). The winner has
the lowest geometric mean of its time over the fastest candidate's on each problem; its
times and the runner-up go into the entry's reason.

Use the table with FLASH_JAX_TUNING_PATH=<file> or flash_jax.tuning.use_table(<file>);
to ship it, add it as kernels/<implementation>/tuning/<device kind>.json.
`--tiny` runs CPU-sized problems with two candidates per group (Triton in interpret
mode on CPU): a test of the whole path in seconds, not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import itertools
import math
import sys

import jax
import jax.numpy as jnp

import flash_jax
from flash_jax import accuracy, bench, bench_decode, device, dispatch, tuning
from flash_jax import spec as spec_lib

TRAIN_KEYS = ("head_dim", "causal", "dtype")


@dataclasses.dataclass(frozen=True)
class Group:
  """Config fields one kernel reads, the mode that times them, and the keys of their
  table entries."""

  name: str
  mode: str  # "fwd" | "fwd_bwd" | "decode"
  keys: tuple[str, ...] = TRAIN_KEYS


GROUPS = {
    "triton": (Group("fwd", "fwd"), Group("dkv", "fwd_bwd"), Group("dq", "fwd_bwd"),
               Group("bwd", "fwd_bwd"), Group("split", "decode", ("head_dim", "dtype", "decode"))),
    "mosaic_gpu": (Group("fwd", "fwd"), Group("dkv", "fwd_bwd"), Group("dq", "fwd_bwd"),
                   Group("bwd", "fwd_bwd"), Group("split", "decode", ("head_dim", "dtype"))),
}


def _triton_grids(head_dim: int) -> dict:
  del head_dim  # fit_shared_memory shrinks what a head dim cannot hold; duplicates drop
  return {
      "fwd": {"block_q": (64, 128), "block_kv": (32, 64, 128), "num_warps": (4, 8),
              "num_stages": (2, 3)},
      "dkv": {"block_q_dkv": (32, 64), "block_kv_dkv": (64, 128), "num_warps_dkv": (4, 8),
              "num_stages_dkv": (2, 3)},
      "dq": {"block_q_dq": (64, 128), "block_kv_dq": (32, 64), "num_warps_dq": (4, 8),
             "num_stages_dq": (2, 3)},
      # The backward's form: the dQ kernel, or dQ added up by the dK/dV kernel (atomics;
      # it serves calls that allow an unordered backward, which the tuner's do).
      "bwd": {"atomic_dq": (False, True)},
      "split": {"block_kv_split": (32, 64, 128), "num_stages_split": (2, 3),
                "num_stages_one_split": (3, 4), "split_programs_per_multiprocessor": (1, 2, 4)},
  }


def _mosaic_grids(head_dim: int) -> dict:
  if head_dim == 256:  # the resident tiles and a 2-slot ring of 64-row blocks fill smem
    return {"fwd": {"block_kv": (64,), "num_stages": (2,), "overlap_softmax": (False, True)},
            "dkv": {"block_q_dkv": (64,), "block_kv_dkv": (64,), "num_stages_dkv": (2,),
                    "dkv_ping_pong": (False,)},
            "dq": {"block_q_dq": (64,), "block_kv_dq": (64,), "num_stages_dq": (2,)},
            "bwd": {"atomic_dq": (False,)},  # no registers for dQ's rows (`fuses_dq`)
            "split": {"block_kv_split": (64,), "num_stages_split": (2,),
                      "split_programs_per_multiprocessor": (1,), "split_min_blocks": (2, 4)}}
  return {"fwd": {"block_kv": (64, 128), "num_stages": (2, 3), "overlap_softmax": (False, True)},
          "dkv": {"block_q_dkv": (64, 128), "block_kv_dkv": (64,), "num_stages_dkv": (2, 3),
                  "dkv_ping_pong": (False, True)},
          "dq": {"block_q_dq": (64,), "block_kv_dq": (64, 128), "num_stages_dq": (2, 3)},
          # The backward's form, as Triton's: the dQ kernel or dQ added up by dK/dV.
          "bwd": {"atomic_dq": (False, True)},
          # Two slots of 64 keys let two CTAs share a multiprocessor; the rest fit one.
          "split": {"block_kv_split": (64, 128), "num_stages_split": (2, 3, 4),
                    "split_programs_per_multiprocessor": (1, 2), "split_min_blocks": (4,)}}


# --tiny: two candidates per group, none of them a shipped default, so that a tiny table
# visibly changes the configs it covers.
_TINY_GRIDS = {
    "triton": {
        "fwd": {"block_q": (16, 32), "block_kv": (16,), "num_warps": (4,), "num_stages": (2,)},
        "dkv": {"block_q_dkv": (16, 32), "block_kv_dkv": (32,), "num_warps_dkv": (4,),
                "num_stages_dkv": (2,)},
        "dq": {"block_q_dq": (16, 32), "block_kv_dq": (16,), "num_warps_dq": (4,),
               "num_stages_dq": (2,)},
        "bwd": {"atomic_dq": (True,)},  # the one value that is not the shipped default
        "split": {"block_kv_split": (16, 32), "num_stages_split": (2,),
                  "split_programs_per_multiprocessor": (2,)},
    },
    "mosaic_gpu": {
        "fwd": {"block_kv": (64,), "num_stages": (2, 3), "overlap_softmax": (False,)},
        "dkv": {"block_q_dkv": (64,), "block_kv_dkv": (64,), "num_stages_dkv": (3,),
                "dkv_ping_pong": (False, True)},
        "dq": {"block_q_dq": (64,), "block_kv_dq": (64,), "num_stages_dq": (2, 3)},
        "bwd": {"atomic_dq": (True,)},
        "split": {"block_kv_split": (64,), "num_stages_split": (3, 4),
                  "split_programs_per_multiprocessor": (1,), "split_min_blocks": (4,)},
    },
}


def candidates(implementation: str, group: str, head_dim: int, *, tiny: bool) -> list[dict]:
  """The candidate values of a group's fields: every combination of its grid."""
  if tiny:
    grid = _TINY_GRIDS[implementation][group]
  else:
    grid = {"triton": _triton_grids, "mosaic_gpu": _mosaic_grids}[implementation](head_dim)[group]
  return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def _name(fields: dict) -> str:
  return " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in fields.items())


# ---- problems ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
  implementation: str
  interpret: bool
  warmup: int
  repeats: int
  protocol: str  # decode timing: "loop" (bench_decode.looped) or "call"


def _inputs(problem: bench.Problem, seed: int):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  shape = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
  return tuple(jax.random.normal(key, shape, jnp.dtype(problem.dtype)) for key in keys)


def _spec(problem) -> spec_lib.AttentionSpec:
  """The call a training problem or (contiguous) decode problem makes."""
  if isinstance(problem, bench.Problem):
    q = jax.ShapeDtypeStruct((problem.batch, problem.seq_len, problem.heads, problem.head_dim),
                             jnp.dtype(problem.dtype))
    return spec_lib.normalize(q, q, q, causal=problem.causal)[0]
  p, dtype = problem, jnp.dtype(problem.dtype)
  q = jax.ShapeDtypeStruct((p.batch, p.q_len, p.num_q_heads, p.head_dim), dtype)
  kv = jax.ShapeDtypeStruct((p.batch, p.kv_len, p.num_kv_heads, p.head_dim), dtype)
  lengths = jnp.full((p.batch,), p.kv_len, jnp.int32)
  return spec_lib.normalize(q, kv, kv, causal=True, kv_lengths=lengths,
                            q_offset=lengths - p.q_len)[0]


# Score elements (B x N x T x S) up to which a candidate is checked on the timed problem
# itself; larger problems are checked at batch 1, 2 heads and at most 4096 tokens.
CHECK_ELEMENTS = 2**27


def _check_problem(problem: bench.Problem) -> bench.Problem:
  if problem.batch * problem.heads * problem.seq_len**2 <= CHECK_ELEMENTS:
    return problem
  seq = min(problem.seq_len, 4096)
  return dataclasses.replace(problem, seq_len=seq, tokens=seq,
                             model_dim=min(problem.heads, 2) * problem.head_dim)


def _attention(settings: Settings, causal: bool, implementation: str | None = None):
  name = implementation or settings.implementation
  interpret = settings.interpret and name == settings.implementation
  return lambda q, k, v: flash_jax.flash_attention(q, k, v, causal=causal, implementation=name,
                                                   interpret=interpret)


def _decode_calls(settings: Settings, implementation: str | None = None) -> dict:
  """name -> fn(bench_decode.DecodeInputs) -> out, contiguous and paged."""
  name = implementation or settings.implementation
  interpret = settings.interpret and name == settings.implementation

  def contiguous(x):
    return flash_jax.flash_attention(x.q, x.k, x.v, causal=True, kv_lengths=x.lengths,
                                     q_offset=x.lengths - x.q.shape[1], implementation=name,
                                     interpret=interpret)

  def paged(x):
    return flash_jax.paged_attention(x.q, x.k_pages, x.v_pages, x.block_tables, x.lengths,
                                     implementation=name, interpret=interpret)
  return {"contiguous": contiguous, "paged": paged}


def _under(table: tuning.Table, fn):
  """fn, traced with `table` above the other tables (jit traces on the first call)."""
  def traced(*args):
    with tuning.use_table(table):
      return fn(*args)
  return traced


def _upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _judge(names, got, same, exact, dtype) -> tuple[bool, str]:
  ok, cells = True, []
  for name, g, s, r in zip(names, got, same, exact):
    verdict = accuracy.judge(g, s, r, factor=accuracy.factor_for(name), dtype=dtype)
    ok &= verdict.ok
    cells.append(verdict.describe(name))
  return ok, ", ".join(cells)


def _flat(mode: str, result) -> tuple:
  return (result,) if mode == "fwd" else (result[0], *result[1])


# ---- one entry: check, time, choose ----------------------------------------------------

@dataclasses.dataclass
class Outcome:
  """The candidates of one entry: times per problem, the ones dropped and why."""

  names: dict[str, dict]  # candidate name -> its fields
  seconds: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)

  def ranking(self) -> list[tuple[str, float]]:
    """(name, geometric mean of time / fastest time per problem), best first."""
    kept = {name: t for name, t in self.seconds.items() if name not in self.dropped}
    problems = {p for times in kept.values() for p in times}
    best = {p: min(t[p] for t in kept.values() if p in t) for p in problems}
    scores = {name: math.exp(sum(math.log(t[p] / best[p]) for p in problems) / len(problems))
              for name, t in kept.items() if problems and set(t) == problems}
    return sorted(scores.items(), key=lambda item: item[1])


def _overlay(settings: Settings, winners: list[dict], fields: dict | None) -> tuning.Table:
  """A table for any device: the winners so far, then `fields` for every call."""
  entries = list(winners)
  if fields is not None:
    entries.append({"match": {}, "config": fields, "reason": "a candidate of flash_jax.tune"})
  return tuning.parse({"schema_version": tuning.SCHEMA_VERSION,
                       "implementation": settings.implementation,
                       "device_kind": tuning.ANY_DEVICE, "entries": entries},
                      "<flash_jax.tune>")


def _distinct(settings, winners, fields_list, specs, log) -> tuple[dict, dict]:
  """name -> (fields, table) of the candidates that give distinct configs on `specs`
  (a config the backend shrinks to fit the GPU may equal another), and the dropped."""
  impl = dispatch.get_implementation(settings.implementation)
  config_lib = importlib.import_module(tuning.SCHEMA_MODULES[settings.implementation])
  kept, seen, dropped = {}, {}, {}
  for fields in fields_list:
    name = _name(fields)
    try:
      table = _overlay(settings, winners, fields)
      with tuning.use_table(table):  # what the kernels run: blocks fitted to the call too
        configs = tuple(config_lib.resolve(impl.default_config(spec), spec) for spec in specs)
    except ValueError as e:
      dropped[name] = f"invalid: {e}"
      log(f"  DROP {name}: invalid: {e}")
      continue
    if configs in seen:
      log(f"  skip {name}: the same configs as {seen[configs]}")
      continue
    seen[configs] = name
    kept[name] = (fields, table)
  return kept, dropped


def _sweep_training(settings, problems, kept, outcome, log):
  """Checks then times each kept candidate on the training problems of one entry."""
  references, passed = {}, set()  # a check problem's (exact, same precision); (name, check)
  for problem in problems:
    arg_sets = [_inputs(problem, seed) for seed in (0, 1)]
    timed = {name: bench.timed_function(_under(table, _attention(settings, problem.causal)),
                                        problem.mode)
             for name, (_, table) in kept.items() if name not in outcome.dropped}
    check = _check_problem(problem)
    check_args = arg_sets[0] if check == problem else _inputs(check, 2)
    names = ("out",) if problem.mode == "fwd" else ("out", "dq", "dk", "dv")
    for name in list(timed):
      if (name, check) in passed:
        continue
      if check not in references:
        reference = bench.timed_function(_attention(settings, problem.causal, "xla"),
                                         problem.mode)
        with jax.default_matmul_precision("highest"):
          exact = _flat(problem.mode, reference(*_upcast(check_args)))
        references[check] = exact, _flat(problem.mode, reference(*check_args))
      fn = timed[name] if check == problem else bench.timed_function(
          _under(kept[name][1], _attention(settings, problem.causal)), problem.mode)
      try:
        got = _flat(problem.mode, jax.block_until_ready(fn(*check_args)))
        ok, text = _judge(names, got, references[check][1], references[check][0], problem.dtype)
      except Exception as e:  # compile or launch failure: report, go on
        ok, text = False, bench.error_text(e)
      log(f"  {'ok  ' if ok else 'DROP'} {name}: {_describe(check)} {text}")
      if ok:
        passed.add((name, check))
      else:
        outcome.dropped[name] = f"{_describe(problem)}: {text}"
        del timed[name]
    seconds, failed = bench.time_contenders(timed, arg_sets, warmup=settings.warmup,
                                            repeats=settings.repeats)
    _record(outcome, problem, seconds, failed, log)


def _sweep_decode(settings, problems, kept, outcome, log):
  """Checks then times each kept candidate, contiguous and paged, on decode problems."""
  for problem in problems:
    sets = (bench_decode.make_inputs(problem, 0), bench_decode.make_inputs(problem, 1))
    reference = _decode_calls(settings, "xla")["contiguous"]
    with jax.default_matmul_precision("highest"):
      exact = jax.jit(reference)(dataclasses.replace(
          sets[0], q=_upcast(sets[0].q), k=_upcast(sets[0].k), v=_upcast(sets[0].v)))
    same = jax.jit(reference)(sets[0])
    timed = {}
    for name, (_, table) in kept.items():
      if name in outcome.dropped:
        continue
      for layout, fn in _decode_calls(settings).items():
        fn = _under(table, fn)
        jitted = jax.jit(fn)
        try:
          ok, text = _judge(("out",), (jax.block_until_ready(jitted(sets[0])),), (same,),
                            (exact,), problem.dtype)
        except Exception as e:  # compile or launch failure: report, go on
          ok, text = False, bench.error_text(e)
        log(f"  {'ok  ' if ok else 'DROP'} {name}: {problem.label} {layout} {text}")
        if not ok:
          outcome.dropped[name] = f"{problem.label} {layout}: {text}"
          timed = {k: f for k, f in timed.items() if not k.startswith(f"{name} | ")}
          break
        timed[f"{name} | {layout}"] = (bench_decode.looped(fn) if settings.protocol == "loop"
                                       else jitted)
    arg_sets = [sets] if settings.protocol == "loop" else [(x,) for x in sets]
    seconds, failed = bench.time_contenders(timed, arg_sets, warmup=settings.warmup,
                                            repeats=settings.repeats)
    calls = bench_decode.CALLS_PER_LOOP if settings.protocol == "loop" else 1
    per_candidate: dict[str, float] = {}
    for key, value in seconds.items():  # contiguous + paged: the time of one of each
      name = key.split(" | ")[0]
      per_candidate[name] = per_candidate.get(name, 0.0) + value / calls
    for key, e in failed.items():
      per_candidate.pop(key.split(" | ")[0], None)
    complete = {name: t for name, t in per_candidate.items()
                if all(f"{name} | {layout}" in seconds for layout in ("contiguous", "paged"))}
    _record(outcome, problem, complete,
            {key.split(" | ")[0]: e for key, e in failed.items()}, log)


def _record(outcome, problem, seconds, failed, log):
  label = _describe(problem)
  for name, e in failed.items():
    outcome.dropped[name] = f"{label}: {bench.error_text(e)}"
    log(f"  DROP {name}: {label}: {bench.error_text(e)}")
  for name, t in seconds.items():
    if name not in outcome.dropped:
      outcome.seconds.setdefault(name, {})[label] = t
      log(f"  {label} {name}: {t * 1e3:.3f} ms")


def _describe(problem) -> str:
  if isinstance(problem, bench.Problem):
    return f"{problem.mode} s{problem.seq_len}"
  return problem.label


def _reason(outcome: Outcome, ranking, default_name: str | None, settings: Settings) -> str:
  best, _ = ranking[0]
  times = ", ".join(f"{label} {t * 1e3:.3g} ms" for label, t in outcome.seconds[best].items())
  count = f"{len(ranking)} candidate{'s' if len(ranking) > 1 else ''}"
  text = f"Fastest of {count} that passed the check, timed ({times})"
  scores = dict(ranking)
  gap = lambda name: f"+{(scores[name] / scores[best] - 1) * 100:.1f}%"
  runner_up = ranking[1][0] if len(ranking) > 1 else None
  if runner_up is not None:
    which = ", the previous default," if runner_up == default_name else ""
    text += f"; runner-up{which} {runner_up}: {gap(runner_up)}"
  if default_name == best:
    text += "; it is the previous default"
  elif default_name in scores and default_name != runner_up:
    text += f"; the previous default: {gap(default_name)}"
  if outcome.dropped:
    text += f"; dropped {len(outcome.dropped)}: " + "; ".join(
        f"{name} ({why[:100]})" for name, why in outcome.dropped.items())
  return text + f" (geometric mean over the problems; {settings.warmup} warm-up, " \
                f"median of {settings.repeats} calls)."


def tune_group(settings: Settings, group: Group, problems, winners: list[dict], *, tiny: bool,
               log) -> list[dict]:
  """The table entries of one group: one per table key among `problems`."""
  schema = tuning.schema_for(settings.implementation)
  by_key: dict[tuple, list] = {}
  for problem in problems:
    key = schema.key(_spec(problem))
    by_key.setdefault(tuple((k, key[k]) for k in group.keys), []).append(problem)
  entries = []
  for entry_key, members in by_key.items():
    match = dict(entry_key)
    specs = [_spec(p) for p in members]
    fields_list = candidates(settings.implementation, group.name, match["head_dim"], tiny=tiny)
    default_name = None
    if not tiny:  # the current default is a candidate too
      with tuning.use_table(_overlay(settings, winners, None)):
        current = tuning.lookup(schema, schema.key(specs[0])).fields
      default = {name: current[name] for name in fields_list[0]}
      default_name = _name(default)
      if default not in fields_list:
        fields_list = [default] + fields_list
    log(f"{settings.implementation} {group.name} {match}: {len(fields_list)} candidates, "
        f"{len(members)} problems")
    kept, dropped = _distinct(settings, winners, fields_list, specs, log)
    outcome = Outcome({name: fields for name, (fields, _) in kept.items()}, dropped=dropped)
    sweep = _sweep_decode if group.mode == "decode" else _sweep_training
    sweep(settings, members, kept, outcome, log)
    ranking = outcome.ranking()
    if not ranking:
      log(f"  no candidate passed for {match}: no entry")
      continue
    best = ranking[0][0]
    log(f"  best {best}" + (f"; runner-up {ranking[1][0]}" if len(ranking) > 1 else ""))
    entries.append({"match": match, "config": outcome.names[best],
                    "reason": _reason(outcome, ranking, default_name, settings)})
  return entries


# ---- the command ---------------------------------------------------------------------

_TINY_TRAINING = {"triton": dict(seq_lens=[64], head_dims=[32], tokens=128, model_dim=64,
                                 dtype="float32", causal=[True]),
                  "mosaic_gpu": dict(seq_lens=[256], head_dims=[64], tokens=512,
                                     model_dim=128, dtype="bfloat16", causal=[True])}
_TINY_DECODE = {
    "triton": bench_decode.DecodeProblem(2, 128, 1, 4, 2, 32, page_size=16, dtype="float32"),
    "mosaic_gpu": bench_decode.DecodeProblem(2, 512, 1, 4, 2, 64, page_size=64,
                                             dtype="bfloat16")}


def main(argv=None, log=None):
  log = log or (lambda line: print(line, file=sys.stderr, flush=True))
  parser = argparse.ArgumentParser(prog="python -m flash_jax.tune",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--implementation", required=True, choices=sorted(GROUPS))
  parser.add_argument("--groups", nargs="+", default=None,
                      help="the kernels' field groups to sweep (default: all of the "
                           "implementation's: fwd dkv dq split)")
  parser.add_argument("--seq-lens", type=int, nargs="+", default=None,
                      help="training problems' sequence lengths (default 4096 16384)")
  parser.add_argument("--head-dims", type=int, nargs="+", default=None,
                      help="default 64 128 256")
  parser.add_argument("--causal", choices=["both", "true", "false"], default=None)
  parser.add_argument("--dtype", default=None, help="default bfloat16")
  parser.add_argument("--tokens", type=int, default=None, help="batch x seq (paper: 16384)")
  parser.add_argument("--model-dim", type=int, default=None, help="heads x head_dim (paper: 2048)")
  parser.add_argument("--decode-problems", type=int, nargs="*", default=None,
                      help="indices into flash_jax.bench_decode.DEFAULT_PROBLEMS (default: all)")
  parser.add_argument("--warmup", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--out", default=None, help="the table to write (default: "
                      "tuning_<implementation>_<device kind>.json)")
  parser.add_argument("--tiny", action="store_true",
                      help="CPU-sized problems, two candidates per group: a smoke test")
  args = parser.parse_args(argv)

  platform = jax.default_backend()
  kind = device.kind() or "unknown"
  if platform != "gpu" and not args.tiny:
    parser.error(f"no GPU here ({platform}): the sweep times GPU kernels; --tiny runs the "
                 "CPU smoke test")
  implementation = args.implementation
  if platform != "gpu" and not dispatch.get_implementation(implementation).interpretable:
    parser.error(f"{implementation} has no interpret mode: --tiny on CPU runs triton only")
  groups = {g.name: g for g in GROUPS[implementation]}
  chosen = args.groups or list(groups)
  unknown = [g for g in chosen if g not in groups]
  if unknown:
    parser.error(f"--groups: {unknown} are not groups of {implementation} ({list(groups)})")

  tiny = _TINY_TRAINING[implementation] if args.tiny else {}
  pick = lambda value, name, default: value if value is not None else tiny.get(name, default)
  causal = {"both": [False, True], "true": [True], "false": [False], None: None}[args.causal]
  training = [
      bench.Problem(s, d, c, mode, pick(args.tokens, "tokens", 16384),
                    pick(args.model_dim, "model_dim", 2048), pick(args.dtype, "dtype", "bfloat16"))
      for mode in ("fwd", "fwd_bwd")
      for d in pick(args.head_dims, "head_dims", [64, 128, 256])
      for s in pick(args.seq_lens, "seq_lens", [4096, 16384])
      for c in pick(causal, "causal", [False, True])]
  if args.decode_problems is not None:
    decode = [bench_decode.DEFAULT_PROBLEMS[i] for i in args.decode_problems]
  else:
    decode = [_TINY_DECODE[implementation]] if args.tiny else list(bench_decode.DEFAULT_PROBLEMS)
  settings = Settings(implementation, interpret=platform != "gpu",
                      warmup=args.warmup if args.warmup is not None else (1 if args.tiny else 3),
                      repeats=args.repeats if args.repeats is not None else (2 if args.tiny else 20),
                      protocol="call" if platform != "gpu" else "loop")

  date = datetime.date.today().isoformat()
  log(f"flash_jax {flash_jax.__version__} tune {implementation} on {kind} ({platform}), "
      f"jax {jax.__version__}, {date}; groups {chosen}")
  winners: list[dict] = []
  for name in chosen:
    group = groups[name]
    problems = decode if group.mode == "decode" else [p for p in training if p.mode == group.mode]
    winners += tune_group(settings, group, problems, winners, tiny=args.tiny, log=log)

  table = {"schema_version": tuning.SCHEMA_VERSION, "implementation": implementation,
           "device_kind": kind,
           "about": f"python -m flash_jax.tune {' '.join(argv if argv is not None else sys.argv[1:])}"
                    f" on {kind}, {date}, JAX {jax.__version__}, flash_jax "
                    f"{flash_jax.__version__}" + (" (--tiny: not a measurement)" if args.tiny else ""),
           "entries": winners}
  tuning.parse(table, "<flash_jax.tune output>")  # what the loader will accept
  out = args.out or f"tuning_{implementation}_{tuning.file_stem(kind)}.json"
  with open(out, "w") as f:
    f.write(tuning.dumps(table))
  print(f"{len(winners)} entries written to {out}; use it with "
        f"{tuning.ENV_VAR}={out} or flash_jax.tuning.use_table({out!r})")
  return table


if __name__ == "__main__":
  main()
