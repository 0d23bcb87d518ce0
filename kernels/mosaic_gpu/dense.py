"""Bias and dense bool masks as the Mosaic GPU kernels receive and read them.

Both are [B?, Nq?, T, S] arrays (size-1 batch and head dims stay broadcast). One value per
key, [B?, Nq?, 1, S] (key padding, a per-key bias), stays a vector [B?, Nq?, S], and one
per query, [B?, Nq?, T, 1] (query padding), a vector [B?, Nq?, T]: each visited tile
reads its slice and broadcasts it over the tile's other axis, so memory stays linear in
T and S (`vector_kind`). A [.., 1, 1] array is a key vector of one value. The consumer
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
    kind = vector_kind(x.shape)
    if kind == "key":  # [B?, N?, S_pad]
      x = jnp.broadcast_to(x[:, :, 0], (b, n, spec.kv_len))
      return tiles.pad_axis(x, 2, s_pad, pad_value)
    if kind == "query":  # [B?, N?, T_pad]
      return tiles.pad_axis(x[:, :, :, 0], 2, t_pad, pad_value)
    x = jnp.broadcast_to(x, (b, n, spec.q_len, spec.kv_len))
    x = tiles.pad_axis(tiles.pad_axis(x, 2, t_pad, pad_value), 3, s_pad, pad_value)
    return jnp.swapaxes(x, 2, 3) if transposed else x  # [B?, N?, T_pad, S_pad] (or S, T)

  if spec.has_bias:
    names.append(BIAS)
    # Vectors load in float32 (4-byte elements: one per thread and row or column).
    vector = vector_kind(bias.shape) is not None
    values.append(full(bias.astype(jnp.float32) if vector else bias, 0))
  if spec.has_mask:
    kind = vector_kind(mask.shape)
    mask = full(mask.astype(jnp.int8 if kind is None else jnp.int32), 0)
    rows, cols = (t_pad, s_pad) if not transposed else (s_pad, t_pad)
    if kind is None:  # [B?, N?, row tiles, col blocks]
      any_true = (mask.reshape(*mask.shape[:2], rows // rows_per_cta, rows_per_cta,
                               cols // block_cols, block_cols) != 0).any(axis=(3, 5))
    elif tile_axis(kind, transposed) == 1:  # every row tile visits the vector's blocks
      any_true = (mask.reshape(*mask.shape[:2], 1, cols // block_cols, block_cols)
                  != 0).any(axis=-1)
    else:  # a row tile visits every column block, or none
      any_true = (mask.reshape(*mask.shape[:2], rows // rows_per_cta, 1, rows_per_cta)
                  != 0).any(axis=-1)
    any_true = jnp.broadcast_to(any_true, mask.shape[:2] + (rows // rows_per_cta,
                                                           cols // block_cols))
    names += [MASK, MASK_BLOCKS]
    values += [mask, block_ranges(any_true)]
  return tuple(names), tuple(values)


def vector_kind(shape) -> str | None:
  """"key" for a bias or mask of one value per key ([B?, N?, 1, S], S >= 1), "query" for
  one per query ([B?, N?, T, 1], T > 1), None for a full [.., T, S] one."""
  if shape[2] == 1:
    return "key"
  return "query" if shape[3] == 1 else None


def tile_axis(kind: str, transposed: bool) -> int:
  """The tile axis a vector runs along: tiles are queries x keys, or keys x queries
  when transposed (the dK/dV kernel)."""
  return (1 if kind == "key" else 0) ^ int(transposed)


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

  bias: Any  # GMEM ref [rows, cols] of this batch row and head (a [T] or [S] vector), or None
  mask: Any
  blocks: Any  # GMEM ref [row tiles, 2] (see `block_ranges`), or None
  transposed: bool  # tiles are keys x queries (the dK/dV kernel)
  bias_kind: str | None = None  # `vector_kind` of the bias and of the mask
  mask_kind: str | None = None

  @classmethod
  def read(cls, spec: AttentionSpec, refs: dict, batch, head, *,
           transposed: bool = False) -> "DenseTiles":
    def at(name, shape):
      if name not in refs:
        return None
      return refs[name].at[0 if shape[0] == 1 else batch, 0 if shape[1] == 1 else head]
    kind = lambda name, shape: vector_kind(shape) if name in refs else None
    return cls(at(BIAS, spec.bias_shape), at(MASK, spec.mask_shape),
               at(MASK_BLOCKS, spec.mask_shape), transposed,
               kind(BIAS, spec.bias_shape), kind(MASK, spec.mask_shape))

  @property
  def has_mask(self) -> bool:
    return self.mask is not None

  def _tile(self, ref, kind, row_lo, rows: int, col_lo, cols: int):
    if kind is None:
      return compat.load(ref.at[pl.ds(row_lo, rows), pl.ds(col_lo, cols)],
                         compat.wgmma_layout(), optimized=False)
    # A vector: its slice along the tile axis it runs on, broadcast over the other.
    axis = tile_axis(kind, self.transposed)
    lo, length = (row_lo, rows) if axis == 0 else (col_lo, cols)
    layout = compat.row_layout() if axis == 0 else compat.col_layout()
    vector = compat.load(ref.at[pl.ds(lo, length)], layout, optimized=False)
    return lax.broadcast_in_dim(vector, (rows, cols), [axis])

  def bias_tile(self, row_lo, rows: int, col_lo, cols: int):
    """The bias tile (its dtype) [rows, cols] in the wgmma layout, or None."""
    if self.bias is None:
      return None
    return self._tile(self.bias, self.bias_kind, row_lo, rows, col_lo, cols)

  def visible(self, row_lo, rows: int, col_lo, cols: int):
    """Bool visibility [rows, cols] by the mask, or None."""
    if self.mask is None:
      return None
    return self._tile(self.mask, self.mask_kind, row_lo, rows, col_lo, cols) != 0

  def block_range(self, row_tile, lo, hi):
    """[lo, hi) narrowed to the blocks where row tile `row_tile` has a True mask entry."""
    if self.blocks is None:
      return lo, hi
    first, end = self.blocks[row_tile, 0], self.blocks[row_tile, 1]
    lo = jnp.maximum(lo, first)
    return lo, jnp.maximum(lo, jnp.minimum(hi, end))
