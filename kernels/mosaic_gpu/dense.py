"""Bias and dense bool masks as the Mosaic GPU kernels receive and read them.

Both are [B?, Nq?, T, S] arrays (size-1 batch and head dims stay broadcast). One row per
key, [B?, Nq?, 1, S] (key padding, a per-key bias), stays a vector [B?, Nq?, S]: each
visited block reads its [block] slice and broadcasts it over the tile's rows, so memory
stays linear in S. A size-1 key dim is broadcast to full length first. The consumer
warpgroups load the [64, block] tile of each visited block straight from global memory
into the wgmma register layout (`plgpu.load`), issued beside the Q K^T wgmma so that the
load overlaps the matmul (FlashAttention-2's register-level loads, no shared memory: the
K/V rings keep every byte of it). The dK/dV kernel, whose tiles are S^T [keys, queries], reads a
transposed copy ([.., S, T]): one extra pass over the bias/mask per backward.

Bias: added to the scaled logits in float32 (`masking.transform_logits`, which floors
it). Mask: int8 tiles, int32 key vectors (bool is no load type), False hides the key. Blocks of a CTA's
rows before the first and after the last block with a True entry are not visited
(`block_ranges`, computed once per call from the mask: all-False leading and trailing
tiles, the usual causal-like and padding patterns, cost neither loads nor matmuls).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax import lax
import jax.experimental.pallas as pl

from flash_jax import masking, tiles
from flash_jax.spec import AttentionSpec
from flash_jax.kernels.mosaic_gpu import compat

BIAS, MASK, MASK_BLOCKS = "bias", "mask", "mask_blocks"


def inputs(bias, mask, spec: AttentionSpec, *, t_pad: int, s_pad: int, rows_per_cta: int,
           block_cols: int, transposed: bool = False) -> tuple[tuple[str, ...], tuple[Any, ...]]:
  """(names, arrays) of the bias / mask inputs a kernel takes after its feature inputs.

  Tiles are [rows_per_cta of the CTA's rows, block_cols of the visited block]: queries x
  keys, or keys x queries when `transposed` (the dK/dV kernel). Padding is zero (a
  padded entry is hidden by kv_bound or belongs to a dropped row).
  """
  names, values = [], []

  def full(x, pad_value):
    b, n = x.shape[:2]
    if is_key_vector(x.shape):  # [B?, N?, S_pad]
      return tiles.pad_axis(x[:, :, 0], 2, s_pad, pad_value)
    x = jnp.broadcast_to(x, (b, n, spec.q_len, spec.kv_len))
    x = tiles.pad_axis(tiles.pad_axis(x, 2, t_pad, pad_value), 3, s_pad, pad_value)
    return jnp.swapaxes(x, 2, 3) if transposed else x  # [B?, N?, T_pad, S_pad] (or S, T)

  if spec.has_bias:
    names.append(BIAS)
    # Key vectors load in float32 (4-byte elements: one per thread and column).
    values.append(full(bias.astype(jnp.float32) if is_key_vector(bias.shape) else bias, 0))
  if spec.has_mask:
    vector = is_key_vector(mask.shape)
    mask = full(mask.astype(jnp.int32 if vector else jnp.int8), 0)
    rows, cols = (t_pad, s_pad) if not transposed else (s_pad, t_pad)
    if not vector:  # [B?, N?, row tiles, col blocks]
      any_true = (mask.reshape(*mask.shape[:2], rows // rows_per_cta, rows_per_cta,
                               cols // block_cols, block_cols) != 0).any(axis=(3, 5))
    elif not transposed:  # every row tile sees the key blocks the vector has
      any_true = (mask.reshape(*mask.shape[:2], 1, cols // block_cols, block_cols)
                  != 0).any(axis=-1)
    else:  # a tile of key rows visits every query block, or none
      any_true = (mask.reshape(*mask.shape[:2], rows // rows_per_cta, 1, rows_per_cta)
                  != 0).any(axis=-1)
    any_true = jnp.broadcast_to(any_true, mask.shape[:2] + (rows // rows_per_cta,
                                                           cols // block_cols))
    names += [MASK, MASK_BLOCKS]
    values += [mask, block_ranges(any_true)]
  return tuple(names), tuple(values)


def is_key_vector(shape) -> bool:
  """A bias or mask of one row per key: [B?, N?, 1, S] with S > 1."""
  return shape[2] == 1 and shape[3] > 1


def block_ranges(any_true):
  """bool [B?, N?, R, C] (does row tile r have a True entry in column block c) -> int32
  [B?, N?, R, 2]: per row tile, the first block with a True entry and one past the last
  (0, 0 when none)."""
  num_blocks = any_true.shape[-1]
  seen = any_true.any(axis=-1)
  first = jnp.argmax(any_true, axis=-1)
  end = num_blocks - jnp.argmax(any_true[..., ::-1], axis=-1)
  return jnp.stack([jnp.where(seen, first, 0), jnp.where(seen, end, 0)], -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DenseTiles:
  """The bias and mask of one (batch row, query head), read tile by tile in a kernel."""

  bias: Any  # GMEM ref [rows, cols] of this batch row and head ([S] key vector), or None
  mask: Any
  blocks: Any  # GMEM ref [row tiles, 2] (see `block_ranges`), or None
  transposed: bool  # tiles are keys x queries (the dK/dV kernel)

  @classmethod
  def read(cls, spec: AttentionSpec, refs: dict, batch, head, *,
           transposed: bool = False) -> "DenseTiles":
    def at(name, shape):
      if name not in refs:
        return None
      return refs[name].at[0 if shape[0] == 1 else batch, 0 if shape[1] == 1 else head]
    return cls(at(BIAS, spec.bias_shape), at(MASK, spec.mask_shape),
               at(MASK_BLOCKS, spec.mask_shape), transposed)

  @property
  def has_mask(self) -> bool:
    return self.mask is not None

  def _tile(self, ref, row_lo, rows: int, col_lo, cols: int):
    if len(ref.shape) == 2:
      return compat.load(ref.at[pl.ds(row_lo, rows), pl.ds(col_lo, cols)],
                         compat.wgmma_layout(), optimized=False)
    # A key vector: the keys run along the columns, or the rows when transposed.
    key_lo, keys, axis = (row_lo, rows, 0) if self.transposed else (col_lo, cols, 1)
    layout = compat.row_layout() if self.transposed else compat.col_layout()
    vector = compat.load(ref.at[pl.ds(key_lo, keys)], layout, optimized=False)
    return lax.broadcast_in_dim(vector, (rows, cols), [axis])

  def bias_tile(self, row_lo, rows: int, col_lo, cols: int):
    """The bias tile (its dtype) [rows, cols] in the wgmma layout, or None."""
    return None if self.bias is None else self._tile(self.bias, row_lo, rows, col_lo, cols)

  def visible(self, row_lo, rows: int, col_lo, cols: int):
    """Bool visibility [rows, cols] by the mask, or None."""
    if self.mask is None:
      return None
    return self._tile(self.mask, row_lo, rows, col_lo, cols) != 0

  def block_range(self, row_tile, lo, hi):
    """[lo, hi) narrowed to the blocks where row tile `row_tile` has a True mask entry."""
    if self.blocks is None:
      return lo, hi
    first, end = self.blocks[row_tile, 0], self.blocks[row_tile, 1]
    lo = jnp.maximum(lo, first)
    return lo, jnp.maximum(lo, jnp.minimum(hi, end))
