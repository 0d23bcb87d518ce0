"""Decode benchmark: `python -m flash_jax.bench --decode`.

A few new query tokens (T = 1, or 16 for speculative decoding) against long K/V caches
with ragged lengths (75-100% of S), contiguous and paged (page_size 64, shuffled page
tables), beside `jax.nn.dot_product_attention` (cuDNN and XLA, with
`key_value_seq_lengths`) in one process. Decoding reads the cache and does little
arithmetic, so the measure is bandwidth: TB/s of the K/V bytes that must be read (each
sequence's first kv_lengths[b] keys and values, once per K/V head) over the time.

Protocol "loop" (the default) times each contender inside one compiled loop of
`CALLS_PER_LOOP` calls (the way a serving step runs it: no host round trip per call),
alternating two input sets so that no cache fits in L2; the loop's queries are fed from
the previous output so that XLA cannot hoist the calls. Protocol "call" times one jitted
call per host dispatch instead (launch and host overhead included). The median over
repeats, contenders in turn (`bench.time_contenders`).
jax.nn cannot align a causal mask bottom-right, so its contenders run with
is_causal=False: for T = 1 that is the same function, for T = 16 it reads the same bytes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import flash_jax
from flash_jax import bench

CALLS_PER_LOOP = 20
# Rated HBM bandwidth by device kind (vendor datasheets), for the fraction column.
RATED_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12}


@dataclasses.dataclass(frozen=True)
class DecodeProblem:
  batch: int
  kv_len: int  # S: the cache's capacity; lengths are 75-100% of it
  q_len: int  # T new tokens
  num_q_heads: int
  num_kv_heads: int
  head_dim: int
  page_size: int = 64
  dtype: str = "bfloat16"

  @property
  def label(self) -> str:
    heads = f"{self.num_q_heads}/{self.num_kv_heads}"
    return f"B={self.batch} S={self.kv_len} T={self.q_len} h{heads} d{self.head_dim}"


# The problems: GQA 32/8 at d128 for three batch/cache shapes, speculative T=16,
# MQA, MHA, and the other head dims.
DEFAULT_PROBLEMS = (
    DecodeProblem(1, 131072, 1, 32, 8, 128),
    DecodeProblem(8, 32768, 1, 32, 8, 128),
    DecodeProblem(64, 4096, 1, 32, 8, 128),
    DecodeProblem(8, 32768, 16, 32, 8, 128),
    DecodeProblem(32, 8192, 1, 16, 1, 128),
    DecodeProblem(16, 16384, 1, 16, 16, 128),
    DecodeProblem(8, 32768, 1, 32, 8, 64),
    DecodeProblem(8, 32768, 1, 32, 8, 256),
)
CPU_PROBLEMS = (DecodeProblem(2, 512, 1, 8, 2, 64, page_size=16, dtype="float32"),
                DecodeProblem(2, 512, 4, 8, 2, 64, page_size=16, dtype="float32"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeInputs:
  q: jax.Array  # [B, T, Nq, H]
  k: jax.Array  # [B, S, Nkv, H]
  v: jax.Array  # [B, S, Nkv, H]
  lengths: jax.Array  # [B] int32
  k_pages: jax.Array  # [P, page_size, Nkv, H]
  v_pages: jax.Array
  block_tables: jax.Array  # [B, S / page_size] int32, shuffled


def make_inputs(problem: DecodeProblem, seed: int) -> DecodeInputs:
  """Random caches (contiguous and paged, the same tokens), lengths 75-100% of S."""
  p = problem
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  dtype = jnp.dtype(p.dtype)
  q = jax.random.normal(keys[0], (p.batch, p.q_len, p.num_q_heads, p.head_dim), dtype)
  k = jax.random.normal(keys[1], (p.batch, p.kv_len, p.num_kv_heads, p.head_dim), dtype)
  v = jax.random.normal(keys[2], (p.batch, p.kv_len, p.num_kv_heads, p.head_dim), dtype)
  rng = np.random.RandomState(seed)
  lengths = jnp.asarray(rng.randint(int(0.75 * p.kv_len), p.kv_len + 1, p.batch), jnp.int32)
  pages_per_seq = -(-p.kv_len // p.page_size)
  tables = rng.permutation(p.batch * pages_per_seq).reshape(p.batch, pages_per_seq)
  tables = jnp.asarray(tables, jnp.int32)
  pool = (p.batch * pages_per_seq, p.page_size, p.num_kv_heads, p.head_dim)
  k_pages, v_pages = flash_jax.write_kv_pages(jnp.zeros(pool, dtype), jnp.zeros(pool, dtype),
                                              tables, 0, k, v)
  return DecodeInputs(q, k, v, lengths, k_pages, v_pages, tables)


def kv_bytes(problem: DecodeProblem, lengths) -> float:
  """Bytes of K and V that must be read: every stored token's key and value, once."""
  item = jnp.dtype(problem.dtype).itemsize
  return float(np.sum(np.asarray(lengths))) * problem.num_kv_heads * 2 * problem.head_dim * item


def contenders(platform: str, implementation=None, block_sizes=None) -> dict:
  """name -> fn(inputs) -> out [B, T, Nq, H]."""
  def contiguous(x):
    return flash_jax.flash_attention(
        x.q, x.k, x.v, causal=True, kv_lengths=x.lengths, q_offset=x.lengths - x.q.shape[1],
        implementation=implementation, block_sizes=block_sizes)

  def paged(x):
    return flash_jax.paged_attention(x.q, x.k_pages, x.v_pages, x.block_tables, x.lengths,
                                     implementation=implementation, block_sizes=block_sizes)

  def jax_nn(name):
    return lambda x: jax.nn.dot_product_attention(
        x.q, x.k, x.v, key_value_seq_lengths=x.lengths, implementation=name)

  fns = {"flash_jax": contiguous, "flash_jax paged": paged, "jax.nn[xla]": jax_nn("xla")}
  if platform == "gpu":
    fns["jax.nn[cudnn]"] = jax_nn("cudnn")
  return fns


def looped(fn, calls: int = CALLS_PER_LOOP):
  """jit of `calls` calls of fn over two alternating input sets, each call's queries fed
  from the last output (so that no call can be hoisted); returns the final queries."""
  def run(a: DecodeInputs, b: DecodeInputs):
    def body(_, q):
      for x in (a, b):
        out = fn(dataclasses.replace(x, q=q))
        q = q + out.astype(q.dtype) * jnp.asarray(1e-3, q.dtype)
      return q
    return jax.lax.fori_loop(0, calls // 2, body, a.q)
  return jax.jit(run)


def measure(problems, fns, *, warmup: int, repeats: int, protocol: str = "loop", log=print):
  """Rows of (problem, contender, us per call, TB/s of K/V bytes) for every pair.

  protocol "loop": calls inside one compiled loop (`looped`); "call": one jitted call per
  host dispatch, synchronized, so each time includes the launch and host overhead."""
  rows = []
  for problem in problems:
    sets = (make_inputs(problem, 0), make_inputs(problem, 1))
    if protocol == "loop":
      timed, arg_sets, calls = {n: looped(fn) for n, fn in fns.items()}, [sets], CALLS_PER_LOOP
    else:
      timed, arg_sets, calls = {n: jax.jit(fn) for n, fn in fns.items()}, [(x,) for x in sets], 1
    seconds, failed = bench.time_contenders(timed, arg_sets, warmup=warmup, repeats=repeats)
    moved = (kv_bytes(problem, sets[0].lengths) + kv_bytes(problem, sets[1].lengths)) / 2
    for name in fns:
      row = dict(dataclasses.asdict(problem), implementation=name, protocol=protocol)
      if name in seconds:
        per_call = seconds[name] / calls
        row.update(us=per_call * 1e6, tbps=moved / per_call / 1e12)
      else:
        row.update(status=bench.error_text(failed[name]))
      rows.append(row)
      cell = f"{row['us']:9.1f} us {row['tbps']:6.2f} TB/s" if "us" in row else row["status"]
      log(f"{problem.label:34} {name:>16}: {cell}")
  return rows


# The contenders' column order in tables.
TABLE_ORDER = ("flash_jax", "flash_jax paged", "jax.nn[cudnn]", "jax.nn[xla]")


def table(rows, device_kind: str) -> str:
  """A markdown row per problem: each contender's microseconds, TB/s of K/V bytes (share
  of the card's rated bandwidth) and ratio to cuDNN (its time over theirs)."""
  rated = RATED_BANDWIDTH.get(device_kind)
  problems: dict[tuple, dict] = {}
  for r in rows:
    key = (r["batch"], r["kv_len"], r["q_len"], r["num_q_heads"], r["num_kv_heads"],
           r["head_dim"])
    problems.setdefault(key, {})[r["implementation"]] = r
  names = [n for n in TABLE_ORDER if any(n in p for p in problems.values())]
  names += sorted({n for p in problems.values() for n in p} - set(names))
  lines = ["| B | S | T | heads q/kv | d | " + " | ".join(f"`{n}`" for n in names) + " |",
           "| ---: | ---: | ---: | --- | ---: | " + " | ".join("---" for _ in names) + " |"]
  for (b, s, t, nq, nkv, d), by_name in problems.items():
    base = by_name.get("jax.nn[cudnn]", {}).get("us")
    cells = []
    for name in names:
      r = by_name.get(name, {})
      if "us" not in r:
        cells.append("–")
        continue
      cell = f"{r['us']:.0f} µs, {r['tbps']:.2f} TB/s"
      if rated:
        cell += f" ({r['tbps'] * 1e12 / rated:.0%})"
      if base and name != "jax.nn[cudnn]":
        cell += f", {base / r['us']:.2f}×"
      cells.append(cell)
    lines.append(f"| {b} | {s} | {t} | {nq}/{nkv} | {d} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
