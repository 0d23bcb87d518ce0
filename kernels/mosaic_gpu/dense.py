"""Bias and dense bool masks as the Mosaic GPU kernels receive and read them.

Both are [B?, Nq?, T, S] arrays (size-1 batch and head dims stay broadcast; size-1 query
or key dims are broadcast to full length first). The consumer warpgroups load the
[64, block] tile of each visited block straight from global memory into the wgmma
register layout (`plgpu.load`), issued beside the Q K^T wgmma so that the load overlaps
the matmul (FlashAttention-2's register-level loads, no shared memory: the K/V rings
keep every byte of it). The dK/dV kernel, whose tiles are S^T [keys, queries], reads a
transposed copy ([.., S, T]): one extra pass over the bias/mask per backward.

Bias: added to the scaled logits in float32 (`masking.transform_logits`, which floors
it). Mask: int8 (bool is not a TMA/load type), False hides the key. Blocks of a CTA's
rows before the first and after the last block with a True entry are not visited
(`block_ranges`, computed once per call from the mask: all-False leading and trailing
tiles, the usual causal-like and padding patterns, cost neither loads nor matmuls).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
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
    x = jnp.broadcast_to(x, (b, n, spec.q_len, spec.kv_len))
    x = tiles.pad_axis(tiles.pad_axis(x, 2, t_pad, pad_value), 3, s_pad, pad_value)
    return jnp.swapaxes(x, 2, 3) if transposed else x  # [B?, N?, T_pad, S_pad] (or S, T)

  if spec.has_bias:
    names.append(BIAS)
    values.append(full(bias, 0))
  if spec.has_mask:
    mask = full(mask.astype(jnp.int8), 0)
    names += [MASK, MASK_BLOCKS]
    values += [mask, block_ranges(mask, rows_per_cta, block_cols)]
  return tuple(names), tuple(values)


def block_ranges(mask, rows: int, cols: int):
  """int8 [B?, N?, R, C] -> int32 [B?, N?, R / rows, 2]: per tile of `rows` rows, the
  first block of `cols` columns with a True entry and one past the last (0, 0 when
  none)."""
  b, n, r, c = mask.shape
  any_true = (mask.reshape(b, n, r // rows, rows, c // cols, cols) != 0).any(axis=(3, 5))
  num_blocks = any_true.shape[-1]
  seen = any_true.any(axis=-1)
  first = jnp.argmax(any_true, axis=-1)
  end = num_blocks - jnp.argmax(any_true[..., ::-1], axis=-1)
  return jnp.stack([jnp.where(seen, first, 0), jnp.where(seen, end, 0)], -1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class DenseTiles:
  """The bias and mask of one (batch row, query head), read tile by tile in a kernel."""

  bias: Any  # GMEM ref [rows, cols] of this batch row and head, or None
  mask: Any
  blocks: Any  # GMEM ref [row tiles, 2] (see `block_ranges`), or None

  @classmethod
  def read(cls, spec: AttentionSpec, refs: dict, batch, head) -> "DenseTiles":
    def at(name, shape):
      if name not in refs:
        return None
      return refs[name].at[0 if shape[0] == 1 else batch, 0 if shape[1] == 1 else head]
    return cls(at(BIAS, spec.bias_shape), at(MASK, spec.mask_shape),
               at(MASK_BLOCKS, spec.mask_shape))

  @property
  def has_mask(self) -> bool:
    return self.mask is not None

  def _tile(self, ref, row_lo, rows: int, col_lo, cols: int):
    return compat.load_tile(ref.at[pl.ds(row_lo, rows), pl.ds(col_lo, cols)],
                            compat.wgmma_layout())

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
