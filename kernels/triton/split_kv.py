"""Split-KV forward kernel (FlashDecoding) with GQA packing, over contiguous or paged K/V.

For decode-shaped calls (`flash_jax.split_kv.decode_shaped`: a few new tokens against a
long cache) the forward kernel's grid of (query block, batch, head) programs cannot fill
the GPU, and each query head re-reads its K/V head. Here:

  * GQA packing: the T tokens x G query heads that share one K/V head are the rows of one
    query tile (row r = token r // G, head r % G of the group), so a K/V tile is read
    once per K/V head and the products run on tensor cores (rows padded to >= 16).
  * Split-KV: the key blocks a batch row can see are divided into `num_splits` ranges of
    whole blocks, one program each: grid (splits x row blocks, B, Nkv). Each program runs
    the online softmax (FlashAttention-2 section 3.1.1) over its range and writes a float32
    partial output and lse; `flash_jax.split_kv.merge` combines the splits by lse.
  * Paged K/V: key j of sequence b lives at page block_tables[b, j // page_size], slot
    j % page_size. A tile of block_kv keys is a slice of one page when the page size is a
    multiple of block_kv; otherwise each row finds its page through the table. Rows are
    read in place (no contiguous copy), and table entries and cache rows at or past the
    sequence's length are never read (masked loads).

Values past kv_lengths are loaded as zeros, so junk there (NaN, inf) cannot reach the
output through P = 0 times V. Masking follows `TileMasking` (the rules of
`flash_jax.masking`); only boundary tiles build a visibility mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flash_jax import masking, split_kv, tiles
from flash_jax.spec import AttentionArrays, AttentionSpec

from flash_jax.kernels.triton import tile_math
from flash_jax.kernels.triton.config import TritonConfig, padded_head_dim
from flash_jax.kernels.triton.operands import Operand, Output, Refs, call, whole
from flash_jax.kernels.triton.tile_masking import (TileMasking, cdiv, floor_div, iota,
                                                    kv_load_mask, load, store, tile_mask,
                                                    visit_tiles)


def _slices_pages(spec: AttentionSpec, block_kv: int) -> bool:
  """Whether each key tile is a slice of one page (the page size a multiple of block_kv)."""
  return spec.paged and spec.page_size % block_kv == 0


def _kv_tile(ref, masks: TileMasking, spec: AttentionSpec, k_lo, block_kv: int, width: int,
             padded_width: int, masked: bool, keys, page=None):
  """The [block_kv, padded_width] K or V tile of keys [k_lo, k_lo + block_kv) of this
  program's batch row. On masked tiles only the keys some row may see (`keys`, from
  `TileMasking.seen_keys`: within kv_lengths, causal and window) are read; the others
  load as 0, so junk there cannot turn P = 0 times V into NaN. `page`: the tile's page
  id when the tile is a slice of one page (`_slices_pages`)."""
  if not spec.paged:
    return load(ref.at[pl.ds(k_lo, block_kv), :],
                kv_load_mask(k_lo, block_kv, spec.kv_len, width, padded_width, masked=masked,
                             keys=keys))
  k_idx = k_lo + iota(block_kv)  # [bk]
  # Unmasked tiles lie wholly below the length (`tile_fully_visible`): no row mask.
  seen = masking.keys_in_range(k_idx, keys) if masked else None  # [bk]
  mask = tile_mask(k_lo, block_kv, block_kv, width, padded_width)  # head-dim padding only
  if seen is not None:
    mask = seen[:, None] if mask is None else jnp.logical_and(mask, seen[:, None])
  if page is not None:  # the tile is a slice of one page
    return load(ref.at[page, pl.ds(k_lo % spec.page_size, block_kv), :], mask)
  # Rows across pages: each row's page through the table (entries of rows no query sees,
  # those past the length among them, are not read), its row read in place.
  page_size = spec.page_size
  page = load(masks.refs.block_tables.at[masks.batch, floor_div(k_idx, page_size)], seen,
              other=0)  # [bk]
  slot = k_idx - floor_div(k_idx, page_size) * page_size
  return load(ref.at[page[:, None], slot[:, None], iota(padded_width)[None, :]], mask)


def _split_kv_kernel(refs: Refs, *, spec: AttentionSpec, config: TritonConfig,
                     interpret: bool):
  block_rows, block_kv, splits = config.block_q_split, config.block_kv_split, config.num_splits
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  program, batch = pl.program_id(0), pl.program_id(1)
  split, row_block = jax.lax.rem(program, jnp.int32(splits)), floor_div(program, splits)
  group, rows = spec.group_size, spec.packed_rows
  masks = TileMasking.create(spec, refs, batch, block_q=1, block_kv=block_kv,
                             bound_query_tail=False)

  r_lo = row_block * block_rows
  q = load(refs.q.at[pl.ds(r_lo, block_rows), :],
           tile_mask(r_lo, block_rows, rows, spec.head_dim, head_dim))  # [br, H]
  token = floor_div(r_lo + iota(block_rows), group)[:, None]  # [br, 1] query row index
  # The tokens of this row block see keys of tiles [lo, hi); this split takes a share.
  t_lo = floor_div(r_lo, group)
  t_hi = jnp.minimum(cdiv(r_lo + block_rows, group), spec.q_len)
  tile_range = masks.kv_tiles(t_lo, t_hi - t_lo, block_kv).part(split, splits)

  # Tiles that slice one page read its id from the table once for K and V; with
  # `prefetch_pages` one step ahead (the carry), so that its latency hides behind a tile.
  # The index is clamped to the sequence's last page: entries past it are never read.
  slices_pages = _slices_pages(spec, block_kv)
  prefetch = slices_pages and config.prefetch_pages

  def page_of(kv_block):
    last = jnp.maximum(cdiv(masks.kv_length, spec.page_size) - 1, 0)
    return refs.block_tables[batch, jnp.minimum(floor_div(kv_block * block_kv, spec.page_size),
                                                last)]

  def make_step(masked: bool):
    def step(kv_block, carry):
      row_max, row_sum, acc, *prefetched = carry  # [br], [br], [br, Hv], (this tile's page)
      tile_page = prefetched[0] if prefetch else (page_of(kv_block) if slices_pages else None)
      k_lo = kv_block * block_kv
      k = _kv_tile(refs.k, masks, spec, k_lo, block_kv, spec.head_dim, head_dim, masked,
                   tile_range.keys, tile_page)
      v = _kv_tile(refs.v, masks, spec, k_lo, block_kv, spec.head_dim_v, head_dim_v, masked,
                   tile_range.keys, tile_page)
      next_page = (page_of(kv_block + 1),) if prefetch else ()
      scores = tile_math.dot_t(q, k)  # [br, bk] float32
      if not masked and spec.softcap is None and spec.scale > 0:
        # Plain logits c * scores, c > 0: the scale folds into the max subtraction.
        c = spec.scale * tile_math.LOG2E
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1) * c)
        p = tile_math.exp2(scores * c - new_max[:, None], interpret)
      else:
        logits, _ = tile_math.kernel_logits(scores, spec, None)  # [br, bk] base 2
        visible = None
        if masked:
          visible = masks.visible(token, (k_lo + iota(block_kv))[None, :])
          logits = masking.masked_logits(logits, visible)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        p = tile_math.masked_exp2(logits, new_max[:, None], visible, spec, interpret)
      rescale = tile_math.exp2_of_difference(row_max - new_max, spec, interpret)
      row_sum = rescale * row_sum + jnp.sum(p, axis=1)
      acc = acc * rescale[:, None] + tile_math.dot(p.astype(v.dtype), v)
      return (new_max, row_sum, acc) + next_page
    return step

  init = (jnp.full((block_rows,), masking.MASK_VALUE, jnp.float32),
          jnp.zeros((block_rows,), jnp.float32),
          jnp.zeros((block_rows, head_dim_v), jnp.float32))
  if prefetch:
    init += (page_of(tile_range.lo),)
  row_max, row_sum, acc, *_ = visit_tiles(tile_range, make_step, init)

  out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]  # a split that saw nothing: 0
  store(refs.partial_out.at[pl.ds(r_lo, block_rows), :], out,
        tile_mask(r_lo, block_rows, rows, spec.head_dim_v, head_dim_v))
  lse = tiles.lse_from_stats(tile_math.to_natural(row_max, spec), row_sum)  # -inf if empty
  store(refs.partial_lse.at[pl.ds(r_lo, block_rows)], lse, tile_mask(r_lo, block_rows, rows))


def split_kv_forward(q, k, v, arrays: AttentionArrays, spec: AttentionSpec,
                     config: TritonConfig, interpret: bool):
  """q [B, T, Nq, H]; k, v [B, S, Nkv, H|Hv] or pages [P, page_size, Nkv, H|Hv]
  -> out [B, T, Nq, Hv] in q's dtype, lse [B, Nq, T] float32."""
  rows, splits = spec.packed_rows, config.num_splits
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  if spec.paged:
    kv_block = lambda width: pl.BlockSpec((spec.num_pages, spec.page_size, None, width),
                                          lambda p, b, h: (0, 0, h, 0))
  else:
    kv_block = lambda width: pl.BlockSpec((None, spec.kv_len, None, width),
                                          lambda p, b, h: (b, 0, h, 0))
  split_of = lambda p: jax.lax.rem(p, jnp.int32(splits))
  inputs = [
      Operand("q", tiles.pack_queries(q, spec),
              pl.BlockSpec((None, None, rows, head_dim), lambda p, b, h: (b, h, 0, 0))),
      Operand("k", k, kv_block(head_dim)),
      Operand("v", v, kv_block(head_dim_v)),
  ]
  for name in ("q_offset", "q_lengths", "kv_lengths", "block_tables"):
    if getattr(arrays, name) is not None:
      inputs.append(whole(name, getattr(arrays, name)))
  partial_shape = (spec.batch, spec.num_kv_heads, splits, rows)
  outputs = [
      Output("partial_out", jax.ShapeDtypeStruct(partial_shape + (spec.head_dim_v,), jnp.float32),
             pl.BlockSpec((None, None, None, rows, head_dim_v),
                          lambda p, b, h: (b, h, split_of(p), 0, 0))),
      Output("partial_lse", jax.ShapeDtypeStruct(partial_shape, jnp.float32),
             pl.BlockSpec((None, None, None, rows), lambda p, b, h: (b, h, split_of(p), 0))),
  ]
  row_blocks = cdiv(rows, config.block_q_split)
  partial_out, partial_lse = call(
      functools.partial(_split_kv_kernel, spec=spec, config=config, interpret=interpret),
      inputs=inputs, outputs=outputs, grid=(splits * row_blocks, spec.batch, spec.num_kv_heads),
      name="flash_jax_triton_split_kv", num_warps=config.num_warps_split,
      num_stages=config.num_stages_split, interpret=interpret)
  out, lse = split_kv.merge(partial_out, partial_lse, axis=2)  # [B, Nkv, R, Hv], [B, Nkv, R]
  return (tiles.unpack_rows(out, spec).astype(q.dtype),
          jnp.transpose(tiles.unpack_rows(lse, spec), (0, 2, 1)))
