"""Per-block mask information, computed ahead of the kernels (tile skipping).

Each (query block, key block) tile is classified once, in jnp outside the kernels, as

    SKIP    no query of the block sees a key of the block: no compute, and no DMA;
    PARTIAL some pairs are hidden: the kernel builds the element mask;
    FULL    every pair is visible: the kernel skips the mask arithmetic.

from the masking rules (`masking.visible_kv_range`, `masking.tile_fully_visible`), the
ranges of segment ids per block, and a dense mask reduced per block. The tables reach
the kernels by scalar prefetch (SMEM) together with a *fetch index* per tile: the block
the K/V (or Q) index map should name. For a skipped tile it repeats the block of the
previous live tile, so the pipeline sees an unchanged block index and issues no copy
(the idea of splash attention's mask info; written anew here).

    causal, T = S, 4 x 4 blocks   states      fetch index of K/V along each row
                                  1 . . .     0 0 0 0
                                  2 1 . .     0 1 1 1
                                  2 2 1 .     0 1 2 2
                                  2 2 2 1     0 1 2 3
    (1 = PARTIAL: the diagonal needs the element mask; 2 = FULL; . = SKIP)

Tables are [Bi, Ni, outer, inner] int32 with Bi in {1, B} and Ni in {1, heads}: a
dimension is kept only when some rule varies along it (per-batch offsets, lengths or
segment ids; a per-head dense mask), so SMEM holds as little as possible. Segment ids
are bounded by their [min, max] per block: exact for sorted (packed) ids and
conservative (PARTIAL, never a wrong SKIP) otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax import masking
from flash_jax.spec import AttentionArrays, AttentionSpec

from flash_jax.kernels.mosaic_tpu.layout import Geometry

SKIP, PARTIAL, FULL = 0, 1, 2


def _per_batch(x):
  return None if x is None else x[:, None, None]  # [B] -> [B, 1, 1] against [1, nq, nk]


def _positional(spec: AttentionSpec, arrays: AttentionArrays, geo: Geometry):
  """(any visible, all visible) bool [B|1, nq, nk] from causal, window, offsets, lengths."""
  # Block bounds are 3-D like the per-batch scalars: no implicit rank promotion.
  q_lo = jnp.arange(geo.num_q_blocks, dtype=jnp.int32)[None, :, None] * geo.block_q  # [1,nq,1]
  q_hi = jnp.minimum(q_lo + geo.block_q, spec.q_len)  # padded rows are sliced off: ignore them
  k_lo = jnp.arange(geo.num_kv_blocks, dtype=jnp.int32)[None, None, :] * geo.block_kv  # [1,1,nk]
  k_hi = k_lo + geo.block_kv  # unclipped: a tile with padded keys is never FULL
  q_offset, q_length = _per_batch(arrays.q_offset), _per_batch(arrays.q_lengths)
  kv_length = _per_batch(arrays.kv_lengths)
  vis_lo, vis_hi = masking.visible_kv_range(
      q_lo, q_hi, kv_len=spec.kv_len, causal=spec.causal, window=spec.window,
      q_offset=q_offset, kv_length=kv_length)
  any_visible = jnp.maximum(vis_lo, k_lo) < jnp.minimum(vis_hi, k_hi)
  if q_length is not None:
    any_visible &= q_lo < q_length
  all_visible = masking.tile_fully_visible(
      q_lo, q_hi, k_lo, k_hi, kv_len=spec.kv_len, causal=spec.causal, window=spec.window,
      q_offset=q_offset, q_length=q_length, kv_length=kv_length)
  per_batch = any(x is not None for x in (q_offset, q_length, kv_length))
  shape = (spec.batch if per_batch else 1, geo.num_q_blocks, geo.num_kv_blocks)
  return jnp.broadcast_to(any_visible, shape), jnp.broadcast_to(all_visible, shape)


def _block_range(ids, length_padded: int, block: int):
  """int [B, L] -> (min, max) [B, n] per block; edge padding leaves both unchanged."""
  ids = jnp.pad(ids, ((0, 0), (0, length_padded - ids.shape[1])), mode="edge")
  ids = ids.reshape(ids.shape[0], -1, block)
  return ids.min(axis=-1), ids.max(axis=-1)


def _segments(arrays: AttentionArrays, geo: Geometry):
  """(any, all) bool [B, 1, nq, nk] from the [min, max] of the segment ids of each block."""
  q_min, q_max = _block_range(arrays.q_segment_ids, geo.q_len_padded, geo.block_q)
  kv_min, kv_max = _block_range(arrays.kv_segment_ids, geo.kv_len_padded, geo.block_kv)
  q_min, q_max = q_min[:, :, None], q_max[:, :, None]  # [B, nq, 1]
  kv_min, kv_max = kv_min[:, None, :], kv_max[:, None, :]  # [B, 1, nk]
  overlap = (q_min <= kv_max) & (kv_min <= q_max)
  one_segment = (q_min == q_max) & (kv_min == kv_max) & (q_min == kv_min)
  return overlap[:, None], one_segment[:, None]


def _reduce_blocks(x, axis: int, length_padded: int, block: int, pad_value: bool, reduce):
  """Reduces axis (T or S) of a 4-D bool array per block; a broadcast axis (size 1) stays."""
  if x.shape[axis] == 1:
    return x
  pads = [(0, 0)] * 4
  pads[axis] = (0, length_padded - x.shape[axis])
  x = jnp.pad(x, pads, constant_values=pad_value)
  x = x.reshape(x.shape[:axis] + (length_padded // block, block) + x.shape[axis + 1:])
  return reduce(x, axis=axis + 1)


def _dense_mask(mask, geo: Geometry):
  """(any, all) bool [B?, Nq?, nq|1, nk|1] of a dense mask. Padded rows count as visible
  for `all` (they are sliced off); padded keys as hidden."""
  any_rows = _reduce_blocks(mask, 2, geo.q_len_padded, geo.block_q, False, jnp.any)
  any_visible = _reduce_blocks(any_rows, 3, geo.kv_len_padded, geo.block_kv, False, jnp.any)
  all_rows = _reduce_blocks(mask, 2, geo.q_len_padded, geo.block_q, True, jnp.all)
  all_visible = _reduce_blocks(all_rows, 3, geo.kv_len_padded, geo.block_kv, False, jnp.all)
  return any_visible, all_visible


def block_states(spec: AttentionSpec, arrays: AttentionArrays, geo: Geometry) -> jax.Array:
  """int32 [Bi, Ni, nq, nk] of SKIP / PARTIAL / FULL for the query-major grids."""
  any_visible, all_visible = _positional(spec, arrays, geo)
  any_visible, all_visible = any_visible[:, None], all_visible[:, None]  # [B|1, 1, nq, nk]
  if arrays.q_segment_ids is not None:
    seg_any, seg_all = _segments(arrays, geo)
    any_visible, all_visible = any_visible & seg_any, all_visible & seg_all
  if arrays.mask is not None:
    mask_any, mask_all = _dense_mask(arrays.mask, geo)
    any_visible, all_visible = any_visible & mask_any, all_visible & mask_all
  states = jnp.where(any_visible, jnp.where(all_visible, FULL, PARTIAL), SKIP)
  shape = (states.shape[0], states.shape[1], geo.num_q_blocks, geo.num_kv_blocks)
  return jnp.broadcast_to(states, shape).astype(jnp.int32)


def kv_major(states: jax.Array, spec: AttentionSpec) -> jax.Array:
  """[Bi, Ni, nq, nk] -> [Bi, Nkv|1, nk, G * nq] for the dK/dV grid, whose reduction axis
  walks the G query heads of a key/value head, each over its nq query blocks."""
  bi, ni, nq, nk = states.shape
  t = jnp.swapaxes(states, 2, 3)  # [Bi, Ni, nk, nq]
  if ni == 1:
    return jnp.tile(t, (1, 1, 1, spec.group_size))
  t = t.reshape(bi, spec.num_kv_heads, spec.group_size, nk, nq)
  return jnp.transpose(t, (0, 1, 3, 2, 4)).reshape(bi, spec.num_kv_heads, nk, -1)


def fetch_indices(states: jax.Array) -> jax.Array:
  """Per tile, the block along the last axis to load: itself when live, else the last live
  block before it (already resident), else the first live one after it (prefetched once)."""
  n = states.shape[-1]
  index = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), states.shape)
  live = states != SKIP
  last_live = jax.lax.cummax(jnp.where(live, index, -1), axis=states.ndim - 1)
  first_live = jnp.argmax(live, axis=-1).astype(jnp.int32)[..., None]
  return jnp.where(last_live >= 0, last_live, first_live)


def table_offset(shape: tuple[int, int, int, int], b, h, outer, inner):
  """Flat index into a [Bi, Ni, outer, inner] table of a grid point (broadcast dims read 0)."""
  bi, ni, no, nn = shape
  b = b if bi > 1 else 0
  h = h if ni > 1 else 0
  return ((b * ni + h) * no + outer) * nn + inner
