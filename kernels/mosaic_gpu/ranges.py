"""Which key/value blocks a tile of query rows visits, and which of those need no mask.

Tile skipping (FlashAttention-2 section 3.1.1, FlashAttention-3 section 3): blocks
outside `masking.visible_kv_range` are never loaded; inside it, blocks that every row
of the tile fully sees (per `masking.tile_fully_visible`) skip the mask arithmetic.
All functions take Python ints or traced int32 scalars, so they run in kernel bodies
and in unit tests (tests/test_mosaic_gpu.py checks them against `masking`).
Only non-negative operands reach the integer divisions: lax.div truncates toward zero.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from flash_jax import masking


def _div(a, b: int):
  """floor(a / b) for a >= 0."""
  return a // b if isinstance(a, int) else lax.div(a, jnp.int32(b))


def _cdiv(a, b: int):
  """ceil(a / b) for a >= 0."""
  return _div(a + (b - 1), b)


def _max(a, b):
  return max(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.maximum(a, b)


def _min(a, b):
  return min(a, b) if isinstance(a, int) and isinstance(b, int) else jnp.minimum(a, b)


def visited_kv_blocks(q_lo, q_hi, *, block_kv: int, kv_len: int, causal: bool, window):
  """Blocks [lo, hi) of `block_kv` keys that some row of [q_lo, q_hi) sees."""
  k_lo, k_hi = masking.visible_kv_range(q_lo, q_hi, kv_len=kv_len, causal=causal, window=window)
  lo, hi = _div(k_lo, block_kv), _cdiv(k_hi, block_kv)
  return lo, _max(hi, lo)


def unmasked_kv_blocks(q_lo, q_hi, lo, hi, *, block_kv: int, kv_len: int, causal: bool,
                       window):
  """Blocks [f_lo, f_hi), inside [lo, hi), that rows [q_lo, q_hi) fully see.

  The conditions are `masking.tile_fully_visible` solved for the block index j of
  keys [j * block_kv, (j + 1) * block_kv):
    keys in range        (j + 1) * block_kv <= kv_len
    causal               (j + 1) * block_kv - 1 <= q_lo
    window right R       (j + 1) * block_kv - 1 <= q_lo + R
    window left L        j * block_kv >= q_hi - 1 - L
  """
  f_lo, f_hi = lo, _min(hi, kv_len // block_kv)
  if causal:
    f_hi = _min(f_hi, _div(q_lo + 1, block_kv))
  if window is not None:
    left, right = window
    if right is not None:
      f_hi = _min(f_hi, _div(q_lo + right + 1, block_kv))
    if left is not None:
      f_lo = _max(f_lo, _cdiv(_max(q_hi - 1 - left, 0), block_kv))
  f_lo = _min(_max(f_lo, lo), hi)
  f_hi = _min(_max(f_hi, f_lo), hi)
  return f_lo, f_hi


def visited_q_blocks(k_lo, k_hi, *, block_q: int, q_len: int, kv_len: int, causal: bool,
                     window):
  """Query blocks [lo, hi) of `block_q` rows of which some row sees a key of [k_lo, k_hi)."""
  q_lo, q_hi = masking.visible_q_range(_min(k_lo, kv_len), _min(k_hi, kv_len), q_len=q_len,
                                       causal=causal, window=window)
  lo, hi = _div(q_lo, block_q), _cdiv(q_hi, block_q)
  return lo, _max(hi, lo)


def unmasked_q_blocks(k_lo, k_hi, lo, hi, *, block_q: int, kv_len: int, causal: bool, window):
  """Query blocks [f_lo, f_hi), inside [lo, hi), whose rows all fully see keys [k_lo, k_hi).

  The dual of `unmasked_kv_blocks`: `masking.tile_fully_visible` solved for the block
  index i of rows [i * block_q, (i + 1) * block_q):
    keys in range        k_hi <= kv_len (else no block is unmasked)
    causal               k_hi - 1 <= i * block_q
    window right R       k_hi - 1 - R <= i * block_q
    window left L        (i + 1) * block_q - 1 - L <= k_lo
  """
  f_lo, f_hi = lo, hi
  if isinstance(k_hi, int):
    f_hi = f_hi if k_hi <= kv_len else f_lo
  else:
    f_hi = jnp.where(k_hi <= kv_len, f_hi, f_lo)
  if causal:
    f_lo = _max(f_lo, _cdiv(_max(k_hi - 1, 0), block_q))
  if window is not None:
    left, right = window
    if right is not None:
      f_lo = _max(f_lo, _cdiv(_max(k_hi - 1 - right, 0), block_q))
    if left is not None:
      f_hi = _min(f_hi, _div(k_lo + 1 + left, block_q))
  f_lo = _min(_max(f_lo, lo), hi)
  f_hi = _min(_max(f_hi, f_lo), hi)
  return f_lo, f_hi
