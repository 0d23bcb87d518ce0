"""Decode kernel over a paged (or contiguous) K/V cache, with GQA packing.

    q [B, T, Nq, H] -> packed rows [B, Nkv, T * G, H]  (row r: token r // G, head r % G)
    k_pages [P, page_size, Nkv, H], v_pages [P, page_size, Nkv, Hv]   token-major pool
    grid (B, row blocks, steps): step j reads table slots j * n ... j * n + n - 1

Each grid step DMAs `pages_per_step` (n) whole pages [page_size, Nkv, H] of K and of V
straight from the pool: one BlockSpec per page stream, whose index map reads the page id
from a scalar-prefetched fetch table (`page_info.fetch_table`, derived from the block
table). A page block holds every K/V head, so its last two dims are the pool's own
(Nkv, H) and satisfy Mosaic's tiling rule for any head count and head dim, and a page is
read once for all heads; the kernel loops over the K/V heads inside. Slots that no row
sees (past the sequence's last page, before a window, an empty sequence) repeat the
previous block index, so no DMA is issued, and their compute is skipped (`pl.when`).

Per K/V head the G query heads and T tokens are the rows of one tile (GQA packing), so a
page is read once per K/V head, not G times, and the matrix unit sees T * G rows. The
online softmax (FlashAttention-2 section 3.1.1) runs in float32 VMEM scratch across the
steps; O and lse are written on the last step. Fully visible pages skip the mask;
partial ones mask with `flash_jax.masking` and zero V rows past kv_lengths, so junk
there (NaN, inf) never meets a probability. float16 pages are DMA'd as they are and
DMA'd as their int16 bits (Mosaic loads no float16 vectors) and decoded to float32 in
VMEM (`_float16_from_bits`), so no converted copy of the pool is made.

A contiguous cache [B, S, Nkv, H] takes the same kernel with "pages" that are chunks of
each sequence (block (chunk, Nkv, H) at chunk index j of batch b).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax import masking, tiles, vmapping
from flash_jax.spec import AttentionArrays, AttentionSpec

from flash_jax.kernels.mosaic_tpu import launch, layout, page_info
from flash_jax.kernels.mosaic_tpu.config import LANES
from flash_jax.kernels.mosaic_tpu.page_info import PagedGeometry

DIMENSION_SEMANTICS = ("parallel", "parallel", "arbitrary")


def row_tokens(geo: PagedGeometry):
  """int32 [R_pad, 128]: the token of each packed row, lane-replicated (padded rows repeat
  the last token; they are sliced off)."""
  rows = jnp.minimum(jnp.arange(geo.rows_padded, dtype=jnp.int32), geo.rows - 1)
  return jnp.broadcast_to((rows // geo.spec.group_size)[:, None], (geo.rows_padded, LANES))


def _float16_from_bits(bits):
  """int16 bits of float16 values -> float32, exactly (zeros, subnormals, inf, NaN)."""
  h = bits.astype(jnp.int32) & 0xFFFF
  sign, exponent, mantissa = h & 0x8000, (h >> 10) & 0x1F, h & 0x3FF
  normal = ((exponent + (127 - 15)) << 23) | (mantissa << 13)
  special = 0x7F800000 | (mantissa << 13)  # inf and NaN
  bits32 = (sign << 16) | jnp.where(exponent == 0x1F, special, normal)
  value = jax.lax.bitcast_convert_type(bits32, jnp.float32)
  # Subnormals (and zeros) by integer conversion: no float32 subnormal is formed.
  tiny = mantissa.astype(jnp.float32) * jnp.float32(2.0 ** -24)
  tiny = jnp.where(sign != 0, -tiny, tiny)
  return jnp.where(exponent == 0, tiny, value)


def _load_head(ref, h, compute_dtype):
  """[rows, Nkv, D] page block -> float [rows, D] of K/V head h (a static index: Mosaic
  must prove the sublane offset of the strided load)."""
  x = ref[:, h, :]
  if x.dtype == jnp.int16:  # float16 bits
    return _float16_from_bits(x)
  return x.astype(compute_dtype)


def _columns(x, width: int):
  """A lane-replicated [rows, 128] statistic against a [rows, width] tile."""
  if width % LANES == 0:
    return jnp.tile(x, (1, width // LANES))
  return x[:, :1]  # broadcasts along the lanes


def _attend_page(refs, k_ref, v_ref, k_start, scalars, *, geo: PagedGeometry, compute_dtype,
                 masked: bool):
  """Online-softmax update of every K/V head's rows with one page of keys."""
  spec, page = geo.spec, geo.page_size
  shape = (geo.block_rows, page)
  visible = stored = None
  if masked:
    tokens = _columns(refs["row_tokens"][...], page)  # [br, page | 1]
    k_idx = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    kv_length = scalars(layout.KV_LENGTH)
    visible = masking.key_visibility(
        tokens, k_idx, causal=spec.causal, window=spec.window,
        q_offset=scalars(layout.Q_OFFSET), kv_length=kv_length,
        q_length=scalars(layout.Q_LENGTH) if spec.has_q_lengths else None)
    # Keys no row of the block sees (past the length, past the last query under causal,
    # outside the window) may hold junk (NaN, inf): never multiplied, even by P = 0.
    first_token = jnp.min(refs["row_tokens"][:, :1], axis=0, keepdims=True)  # [1, 1]
    last_token = jnp.max(refs["row_tokens"][:, :1], axis=0, keepdims=True)
    seen = masking.visible_kv_range(
        first_token, jnp.minimum(last_token + 1, spec.q_len), kv_len=spec.kv_len,
        causal=spec.causal, window=spec.window, q_offset=scalars(layout.Q_OFFSET),
        kv_length=kv_length,
        q_length=scalars(layout.Q_LENGTH) if spec.has_q_lengths else None)
    stored = masking.keys_in_range(
        k_start + jax.lax.broadcasted_iota(jnp.int32, (page, spec.head_dim_v), 0), seen)

  for h in range(spec.num_kv_heads):
    q = refs["q"][h]  # [br, H]
    k = _load_head(k_ref, h, compute_dtype)  # [page, H]
    v = _load_head(v_ref, h, compute_dtype)  # [page, Hv]
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    s = masking.transform_logits(s, scale=spec.scale, softcap=spec.softcap)  # [br, page]
    if masked:
      s = masking.masked_logits(s, visible)
      v = jnp.where(stored, v, jnp.zeros((), v.dtype))
    row_max = refs["row_max"][h]  # [br, 128]
    new_max = jnp.maximum(row_max, jnp.max(s, axis=-1, keepdims=True))
    rescale = jnp.exp(row_max - new_max)
    p = masking.masked_exp(s, _columns(new_max, page), visible)  # exactly 0 where hidden
    refs["row_sum"][h] = rescale * refs["row_sum"][h] + jnp.sum(p, axis=-1, keepdims=True)
    refs["row_max"][h] = new_max
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)  # [br, Hv]
    refs["acc"][h] = _columns(rescale, spec.head_dim_v) * refs["acc"][h] + pv


def _paged_kernel(fetch_ref, ranges_ref, batch_ref, *refs, geo: PagedGeometry, names,
                  compute_dtype):
  del fetch_ref  # read by the index maps only
  refs = dict(zip(names, refs))
  spec, n = geo.spec, geo.pages_per_step
  batch, row_block, step = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  base = (batch * geo.num_row_blocks + row_block) * page_info.NUM_RANGE_FIELDS
  live_lo, live_hi = ranges_ref[base + page_info.LIVE_LO], ranges_ref[base + page_info.LIVE_HI]
  full_lo, full_hi = ranges_ref[base + page_info.FULL_LO], ranges_ref[base + page_info.FULL_HI]
  scalars = lambda field: batch_ref[batch * layout.NUM_BATCH_SCALARS + field]

  @pl.when(step == 0)
  def _init():
    refs["row_max"][...] = jnp.full(refs["row_max"].shape, masking.MASK_VALUE, jnp.float32)
    refs["row_sum"][...] = jnp.zeros(refs["row_sum"].shape, jnp.float32)
    refs["acc"][...] = jnp.zeros(refs["acc"].shape, jnp.float32)

  for i in range(n):
    slot = step * n + i
    live = jnp.logical_and(slot >= live_lo, slot < live_hi)
    full = jnp.logical_and(slot >= full_lo, slot < full_hi)
    attend = functools.partial(_attend_page, refs, refs[f"k{i}"], refs[f"v{i}"],
                               slot * geo.page_size, scalars, geo=geo,
                               compute_dtype=compute_dtype)
    pl.when(full)(lambda: attend(masked=False))
    pl.when(jnp.logical_and(live, jnp.logical_not(full)))(lambda: attend(masked=True))

  @pl.when(step == geo.num_steps - 1)
  def _finish():
    row_max, row_sum = refs["row_max"][...], refs["row_sum"][...]  # [Nkv, br, 128]
    norm = jnp.where(row_sum > 0, row_sum, 1.0)[:, :, :1]
    refs["out"][...] = (refs["acc"][...] / norm).astype(refs["out"].dtype)  # unseen rows: 0
    refs["lse"][...] = tiles.lse_from_stats(row_max, row_sum)  # -inf where nothing was seen


def _page_spec(geo: PagedGeometry, width: int, stream: int, paged: bool) -> pl.BlockSpec:
  """One page [page_size, Nkv, width] of stream `stream`, named by the fetch table."""
  n, steps, rb = geo.pages_per_step, geo.num_steps, geo.num_row_blocks

  def index_map(batch, row_block, step, fetch, *_):
    page = fetch[((batch * rb + row_block) * steps + step) * n + stream]
    return (page, 0, 0, 0) if paged else (batch, page, 0, 0)

  block = (None, geo.page_size, geo.spec.num_kv_heads, width)
  return pl.BlockSpec(block, index_map)


def decode_attention(q, k, v, arrays: AttentionArrays, geo: PagedGeometry, *, interpret,
                     vmem_limit_bytes=None):
  """q [B, T, Nq, H]; k, v pools [P, page_size, Nkv, H|Hv] (spec.paged) or caches
  [B, S, Nkv, H|Hv] -> out [B, T, Nq, Hv] in q's dtype, lse [B, Nq, T] float32."""
  spec, n = geo.spec, geo.pages_per_step
  # TPU matrix units take bfloat16 and float32: float16 widens to float32 in VMEM.
  compute_dtype = jnp.float32 if spec.jnp_dtype == jnp.float16 else spec.jnp_dtype
  if spec.jnp_dtype == jnp.float16:  # same-width bitcasts: no copy of the pool
    k, v = (jax.lax.bitcast_convert_type(x, jnp.int16) for x in (k, v))
  if spec.paged:
    tables, num_pages = arrays.block_tables, spec.num_pages
  else:
    tables = jnp.broadcast_to(jnp.arange(geo.num_slots, dtype=jnp.int32),
                              (spec.batch, geo.num_slots))
    num_pages = geo.num_slots
  ranges = page_info.slot_ranges(spec, arrays, geo)
  fetch = page_info.fetch_table(tables, ranges, geo, num_pages, shared_pool=spec.paged)

  rows = tiles.pad_axis(tiles.pack_queries(q.astype(compute_dtype), spec), 2, geo.rows_padded)
  heads, br = spec.num_kv_heads, geo.block_rows
  row_block = lambda width: pl.BlockSpec((None, heads, br, width),
                                         lambda b, r, *_: (b, 0, r, 0))
  inputs = [("q", rows, row_block(spec.head_dim)),
            ("row_tokens", row_tokens(geo), pl.BlockSpec((br, LANES), lambda b, r, *_: (r, 0)))]
  inputs += [(f"k{i}", k, _page_spec(geo, spec.head_dim, i, spec.paged)) for i in range(n)]
  inputs += [(f"v{i}", v, _page_spec(geo, spec.head_dim_v, i, spec.paged)) for i in range(n)]
  out_rows = (spec.batch, heads, geo.rows_padded)
  outputs = [("out", jax.ShapeDtypeStruct(out_rows + (spec.head_dim_v,), compute_dtype),
              row_block(spec.head_dim_v)),
             ("lse", jax.ShapeDtypeStruct(out_rows + (LANES,), jnp.float32), row_block(LANES))]
  scratch = [("row_max", pltpu.VMEM((heads, br, LANES), jnp.float32)),
             ("row_sum", pltpu.VMEM((heads, br, LANES), jnp.float32)),
             ("acc", pltpu.VMEM((heads, br, spec.head_dim_v), jnp.float32))]
  names = [name for name, *_ in inputs + outputs + scratch]

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(spec.batch, geo.num_row_blocks, geo.num_steps),
      in_specs=[s for *_, s in inputs], out_specs=[s for *_, s in outputs],
      scratch_shapes=[s for _, s in scratch])
  params = launch.interpret_params(interpret)
  run = pl.pallas_call(
      functools.partial(_paged_kernel, geo=geo, names=names, compute_dtype=compute_dtype),
      grid_spec=grid_spec, out_shape=[s for _, s, _ in outputs],
      name="flash_jax_mosaic_tpu_paged" if spec.paged else "flash_jax_mosaic_tpu_decode",
      compiler_params=pltpu.CompilerParams(dimension_semantics=DIMENSION_SEMANTICS,
                                           vmem_limit_bytes=vmem_limit_bytes),
      cost_estimate=_cost(geo, [x for name, x, _ in inputs if name in ('q', 'row_tokens')],
                          [s for _, s, _ in outputs]),
      interpret=params)
  if params:
    run = vmapping.map_when_vmapped(run)
  scalars = (fetch.reshape(-1), ranges.reshape(-1), layout.batch_scalars(arrays, spec))
  out, lse = run(*scalars, *[x for _, x, _ in inputs])
  out = tiles.unpack_rows(out[:, :, :geo.rows], spec)  # [B, T, Nq, Hv]
  lse = tiles.unpack_rows(lse[:, :, :geo.rows, 0], spec)  # [B, T, Nq]
  return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))


def _cost(geo: PagedGeometry, inputs, outputs) -> pl.CostEstimate:
  """For XLA's scheduler: the FLOPs and exps of every key of every sequence (an upper
  bound), and the bytes of q, the outputs and each sequence's K/V read once (the pool
  itself is larger: only the pages of the tables are read)."""
  spec = geo.spec
  pairs = spec.batch * spec.num_q_heads * spec.q_len * spec.kv_len
  flops = 2 * pairs * (spec.head_dim + spec.head_dim_v)
  kv_bytes = (spec.batch * spec.kv_len * spec.num_kv_heads * (spec.head_dim + spec.head_dim_v)
              * spec.jnp_dtype.itemsize)
  nbytes = kv_bytes + sum(launch.num_bytes(x) for x in (*inputs, *outputs))
  return pl.CostEstimate(flops=int(flops), transcendentals=int(pairs), bytes_accessed=int(nbytes))
