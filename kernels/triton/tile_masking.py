"""The mask rules as one kernel program sees them: its batch row, tile ranges, tiles.

Built inside a kernel body from the feature refs (see `operands.feature_operands`).
Everything here calls `flash_jax.masking`; nothing re-states a rule:
  * `kv_tiles` / `q_tiles` bound the loop over the other sequence with
    `visible_kv_range` / `visible_q_range` (tiles outside are never loaded) and split it
    with `tile_fully_visible` into leading masked, unmasked and trailing masked tiles,
    so only boundary tiles pay for mask arithmetic;
  * `visible` builds a tile's bool visibility with `key_visibility` and the dense mask;
  * bias, dense-mask and segment-id tiles are loaded broadcast-aware from whole arrays.

Sequence tails: key columns >= S are hidden with `kv_bound`; query rows >= T are hidden
(as if q_length were T) where a kernel accumulates over query rows (dK/dV).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_jax import masking, split_kv
from flash_jax.config import next_power_of_two
from flash_jax.spec import AttentionSpec

from flash_jax.kernels.triton.operands import Refs


def cdiv(a, b):
  """Ceil division for non-negative ints or int32 scalars (truncating division suffices)."""
  if isinstance(a, int):
    return -(-a // b)
  return jax.lax.div(a + (b - 1), jnp.int32(b))


def floor_div(a, b):
  if isinstance(a, int):
    return a // b
  return jax.lax.div(a, jnp.int32(b))


def iota(n: int):
  return jnp.arange(n, dtype=jnp.int32)


def tile_mask(start, block: int, length: int, width: int | None = None,
              padded_width: int | None = None, *, check_rows: bool = True):
  """Load/store mask of a [block, padded_width] tile of rows [start, start + block):
  rows < length (when `check_rows` and `length` is not a multiple of `block`) and
  columns < width (when the padded width exceeds it). None when nothing is masked."""
  mask = None
  if check_rows and length % block:
    mask = (start + iota(block))[:, None] < length
    if padded_width is None:
      mask = mask[:, 0]
  if padded_width is not None and width != padded_width:
    cols = iota(padded_width)[None, :] < width
    mask = cols if mask is None else jnp.logical_and(mask, cols)
  return mask


def grid_mask(row_start, rows: int, row_len: int, col_start, cols: int, col_len: int):
  """Mask of a [rows, cols] tile of a [row_len, col_len] matrix: what lies inside it."""
  mask = None
  if row_len % rows:
    mask = (row_start + iota(rows))[:, None] < row_len
  if col_len % cols:
    col_mask = (col_start + iota(cols))[None, :] < col_len
    mask = col_mask if mask is None else jnp.logical_and(mask, col_mask)
  return mask


def load(ref_view, mask, other=0):
  """plgpu.load that reads `other` where masked (and takes no `other` without a mask)."""
  if mask is None:
    return plgpu.load(ref_view)
  return plgpu.load(ref_view, mask=mask, other=other)


def store(ref_view, value, mask):
  plgpu.store(ref_view, value.astype(ref_view.dtype), mask=mask)


@dataclasses.dataclass(frozen=True)
class TileRange:
  """Tiles [lo, hi) may hold visible pairs; [full_lo, full_hi) are wholly visible.

  keys: for key tiles, the keys [k_lo, k_hi) some row may see by position (None: all);
  the masked tiles load nothing outside it (`kv_load_mask`), so junk there stays out.
  """

  lo: Any
  full_lo: Any
  full_hi: Any
  hi: Any
  keys: tuple[Any, Any] | None = None

  def part(self, index, parts: int) -> "TileRange":
    """Part `index` of `parts` near-equal runs of whole tiles (split-KV); may be empty."""
    if parts == 1:
      return self
    lo, hi = split_kv.split_part(self.lo, self.hi, index, parts)
    full_lo = jnp.clip(self.full_lo, lo, hi)
    return TileRange(lo, full_lo, jnp.clip(self.full_hi, full_lo, hi), hi, self.keys)


def kv_load_mask(k_lo, block_kv: int, kv_len: int, width: int, padded_width: int, *,
                 masked: bool, keys=None):
  """Load mask of a [block_kv, padded_width] K or V tile: `tile_mask`, and on masked tiles
  only the keys in `keys` = [k_lo, k_hi) (zeros elsewhere: a junk key that no row sees
  cannot turn P = 0 times V into NaN)."""
  mask = tile_mask(k_lo, block_kv, kv_len, width, padded_width, check_rows=masked)
  if not masked or keys is None:
    return mask
  seen = masking.keys_in_range((k_lo + iota(block_kv))[:, None], keys)  # [bk, 1]
  mask = jnp.broadcast_to(seen, (block_kv, padded_width)) if mask is None else \
      jnp.logical_and(mask, seen)
  return mask



def visit_tiles(tiles: TileRange, make_step, carry):
  """Runs the masked, unmasked and masked parts of `tiles`; make_step(masked) -> body."""
  for lo, hi, masked in ((tiles.lo, tiles.full_lo, True), (tiles.full_lo, tiles.full_hi, False),
                         (tiles.full_hi, tiles.hi, True)):
    if isinstance(lo, int) and isinstance(hi, int) and lo >= hi:
      continue  # statically empty: emit no loop
    carry = jax.lax.fori_loop(lo, hi, make_step(masked), carry)
  return carry


@dataclasses.dataclass(frozen=True)
class TileMasking:
  spec: AttentionSpec
  refs: Refs
  batch: Any  # this program's batch index (traced int32)
  q_offset: Any  # traced scalar or None
  q_length: Any  # traced scalar, the static T (query tail bound), or None
  kv_length: Any  # traced scalar or None
  kv_bound: int | None  # static S when key tiles overhang S

  @classmethod
  def create(cls, spec: AttentionSpec, refs: Refs, batch, *, block_q: int, block_kv: int,
             bound_query_tail: bool) -> "TileMasking":
    """Loads this batch row's offsets and lengths. `bound_query_tail`: hide rows >= T."""
    q_offset = refs.q_offset[batch] if spec.has_q_offset else None
    q_length = refs.q_lengths[batch] if spec.has_q_lengths else None
    if bound_query_tail and spec.q_len % block_q:
      q_length = spec.q_len if q_length is None else jnp.minimum(q_length, spec.q_len)
    kv_length = refs.kv_lengths[batch] if spec.has_kv_lengths else None
    kv_bound = spec.kv_len if spec.kv_len % block_kv else None
    return cls(spec, refs, batch, q_offset, q_length, kv_length, kv_bound)

  # ---- which tiles to visit ------------------------------------------------------------

  @property
  def every_tile_masked(self) -> bool:
    """Segment ids and dense masks are not bounded by position: every tile is masked."""
    return self.spec.has_segment_ids or self.spec.has_mask

  @property
  def positional(self) -> dict:
    spec = self.spec
    return dict(causal=spec.causal, window=spec.window, q_offset=self.q_offset)

  @property
  def needs_masking(self) -> bool:
    """Static: False when every pair of every in-bounds tile is visible."""
    spec = self.spec
    return (spec.causal or spec.window is not None or self.every_tile_masked
            or self.q_length is not None or self.kv_length is not None
            or self.kv_bound is not None)

  def _split(self, lo, hi, count: int, fully_visible, keys=None) -> TileRange:
    """Splits tiles [lo, hi) around the contiguous run where `fully_visible(index)` holds."""
    if self.every_tile_masked:
      return TileRange(lo, hi, hi, hi, keys)
    index = iota(max(16, next_power_of_two(count)))
    full = jnp.logical_and(fully_visible(index), index < count)
    first = jnp.min(jnp.where(full, index, count))
    last = jnp.max(jnp.where(full, index + 1, 0))
    full_lo = jnp.clip(first, lo, hi)
    return TileRange(lo, full_lo, jnp.clip(last, full_lo, hi), hi, keys)

  def seen_keys(self, q_lo, q_hi):
    """Keys [k_lo, k_hi) some row of [q_lo, q_hi) may see by position, or None (all)."""
    if not self.needs_masking:
      return None
    q_hi = jnp.minimum(q_hi, self.spec.q_len)  # rows past T (a tail block's padding) see none
    return masking.visible_kv_range(q_lo, q_hi, kv_len=self.spec.kv_len,
                                    kv_length=self.kv_length, q_length=self.q_length,
                                    **self.positional)

  def kv_tiles(self, q_lo, block_q: int, block_kv: int) -> TileRange:
    """Key tiles that query rows [q_lo, q_lo + block_q) visit (forward and dQ)."""
    spec = self.spec
    count = cdiv(spec.kv_len, block_kv)
    if not self.needs_masking:
      return TileRange(0, 0, count, count)
    k_lo, k_hi = masking.visible_kv_range(
        q_lo, q_lo + block_q, kv_len=spec.kv_len, kv_length=self.kv_length, **self.positional)
    if self.q_length is not None:  # rows past the query length see nothing
      k_hi = jnp.where(q_lo < self.q_length, k_hi, k_lo)
    lo = floor_div(k_lo, block_kv)
    hi = jnp.where(k_hi > k_lo, cdiv(k_hi, block_kv), lo)
    return self._split(lo, hi, count, lambda j: masking.tile_fully_visible(
        q_lo, q_lo + block_q, j * block_kv, (j + 1) * block_kv, kv_len=spec.kv_len,
        q_length=self.q_length, kv_length=self.kv_length, **self.positional),
        keys=self.seen_keys(q_lo, q_lo + block_q))

  def q_tiles(self, k_lo, block_kv: int, block_q: int) -> TileRange:
    """Query tiles that key columns [k_lo, k_lo + block_kv) visit (dK/dV)."""
    spec = self.spec
    count = cdiv(spec.q_len, block_q)
    if not self.needs_masking:
      return TileRange(0, 0, count, count)
    q_lo, q_hi = masking.visible_q_range(
        k_lo, k_lo + block_kv, q_len=spec.q_len, q_length=self.q_length, **self.positional)
    if self.kv_length is not None:  # keys past the key length are seen by no row
      q_hi = jnp.where(k_lo < self.kv_length, q_hi, q_lo)
    lo = floor_div(q_lo, block_q)
    hi = jnp.where(q_hi > q_lo, cdiv(q_hi, block_q), lo)
    return self._split(lo, hi, count, lambda i: masking.tile_fully_visible(
        i * block_q, (i + 1) * block_q, k_lo, k_lo + block_kv, kv_len=spec.kv_len,
        q_length=self.q_length, kv_length=self.kv_length, **self.positional))

  # ---- per-tile data -------------------------------------------------------------------

  def q_segments(self, q_lo, block_q: int):
    """[block_q] int32 segment ids of the query rows, or None."""
    if not self.spec.has_segment_ids:
      return None
    ref = self.refs.q_segment_ids.at[self.batch, pl.ds(q_lo, block_q)]
    return load(ref, tile_mask(q_lo, block_q, self.spec.q_len))

  def kv_segments(self, k_lo, block_kv: int):
    """[block_kv] int32 segment ids of the key columns, or None."""
    if not self.spec.has_segment_ids:
      return None
    ref = self.refs.kv_segment_ids.at[self.batch, pl.ds(k_lo, block_kv)]
    return load(ref, tile_mask(k_lo, block_kv, self.spec.kv_len))

  def _broadcast_tile(self, ref, shape, head, q_lo, block_q, k_lo, block_kv):
    """Tile [block_q | 1, block_kv | 1] of a 4-D array broadcastable to [B, Nq, T, S]."""
    spec = self.spec
    zero = jnp.int32(0)  # a traced index: interpret mode's load rule wants arrays here
    batch = self.batch if shape[0] > 1 else zero
    head = head if shape[1] > 1 else zero
    # A broadcast axis reads its single element: the tile keeps a dim of 1 there.
    rows, block_q, length_q = ((pl.ds(q_lo, block_q), block_q, spec.q_len) if shape[2] > 1
                               else (pl.ds(0, 1), 1, 1))
    cols, block_kv, length_kv = ((pl.ds(k_lo, block_kv), block_kv, spec.kv_len) if shape[3] > 1
                                 else (pl.ds(0, 1), 1, 1))
    mask = grid_mask(q_lo, block_q, length_q, k_lo, block_kv, length_kv)
    return load(ref.at[batch, head, rows, cols], mask)

  def bias(self, head, q_lo, block_q, k_lo, block_kv):
    """Bias tile (its own dtype, broadcastable to [block_q, block_kv]), or None."""
    if not self.spec.has_bias:
      return None
    return self._broadcast_tile(self.refs.bias, self.spec.bias_shape, head, q_lo, block_q,
                                k_lo, block_kv)

  def dense_mask(self, head, q_lo, block_q, k_lo, block_kv):
    """Bool tile of the dense mask (broadcastable to [block_q, block_kv]), or None."""
    if not self.spec.has_mask:
      return None
    tile = self._broadcast_tile(self.refs.mask, self.spec.mask_shape, head, q_lo, block_q,
                                k_lo, block_kv)
    return tile != 0

  def visible(self, q_idx, k_idx, *, q_segments=None, kv_segments=None, dense=None):
    """Bool visibility of a tile; q_idx/k_idx (and the segment ids beside them) broadcast."""
    visible = masking.key_visibility(
        q_idx, k_idx, q_segment_ids=q_segments, kv_segment_ids=kv_segments,
        q_length=self.q_length, kv_length=self.kv_length, kv_bound=self.kv_bound,
        **self.positional)
    return masking.visible_and(visible, dense)

  def dropout(self, head, q_idx, k_idx):
    """float32 keep / (1 - rate) multiplier of a tile (indices broadcast), or None."""
    spec = self.spec
    if not spec.has_dropout:
      return None
    keep = masking.dropout_keep(self.refs.dropout_seed[0], self.batch, head, q_idx, k_idx,
                                spec.dropout_rate)
    return masking.dropout_multiplier(keep, spec.dropout_rate)
