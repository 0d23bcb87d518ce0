"""Which key/value blocks a tile of query rows visits, and which of those need no mask.

Tile skipping (FlashAttention-2 section 3.1.1, FlashAttention-3 section 3): blocks
outside `masking.visible_kv_range` are never loaded; inside it, blocks that every row
of the tile fully sees (per `masking.tile_fully_visible`) skip the mask arithmetic.
The rules are the positional ones of `masking`: causal, window, q_offset (query row i
sits at key position i + q_offset) and the per-batch lengths q_length / kv_length
(None when off). Segment ids are not positional: with them, kernels mask every block.
All functions take Python ints or traced int32 scalars, so they run in kernel bodies
and in unit tests (tests/test_mosaic_gpu.py checks them against `masking`).
Only non-negative operands reach the integer divisions (lax.div truncates toward zero):
shifted positions are clamped at 0 first, which the final clamps to [lo, hi) absorb.
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


def _where(cond, a, b):
  if isinstance(cond, bool):
    return a if cond else b
  return jnp.where(cond, a, b)


def _shift(x, offset):
  return x if offset is None else x + offset


def visited_kv_blocks(q_lo, q_hi, *, block_kv: int, kv_len: int, causal: bool, window,
                      q_offset=None, q_length=None, kv_length=None):
  """Blocks [lo, hi) of `block_kv` keys that some row of [q_lo, q_hi) sees.

  Rows at or past q_length see nothing, so they neither widen the range nor, when the
  whole tile lies past it, leave any block to visit.
  """
  if q_length is not None:
    q_hi = _min(q_hi, q_length)
  k_lo, k_hi = masking.visible_kv_range(q_lo, q_hi, kv_len=kv_len, causal=causal, window=window,
                                        q_offset=q_offset, kv_length=kv_length)
  lo, hi = _div(k_lo, block_kv), _cdiv(k_hi, block_kv)
  hi = _max(hi, lo)
  if q_length is not None:
    hi = _where(q_lo < q_hi, hi, lo)
  return lo, hi


def unmasked_kv_blocks(q_lo, q_hi, lo, hi, *, block_kv: int, kv_len: int, causal: bool,
                       window, q_offset=None, q_length=None, kv_length=None):
  """Blocks [f_lo, f_hi), inside [lo, hi), that rows [q_lo, q_hi) fully see.

  The conditions are `masking.tile_fully_visible` solved for the block index j of
  keys [j * block_kv, (j + 1) * block_kv), with positions p = row + q_offset:
    keys in range        (j + 1) * block_kv <= kv_len, and <= kv_length
    rows in range        q_hi <= q_length (else no block is unmasked)
    causal               (j + 1) * block_kv - 1 <= p(q_lo)
    window right R       (j + 1) * block_kv - 1 <= p(q_lo) + R
    window left L        j * block_kv >= p(q_hi - 1) - L
  """
  p_lo, p_last = _shift(q_lo, q_offset), _shift(q_hi - 1, q_offset)
  f_lo, f_hi = lo, _min(hi, kv_len // block_kv)
  if kv_length is not None:
    f_hi = _min(f_hi, _div(_max(kv_length, 0), block_kv))
  if causal:
    f_hi = _min(f_hi, _div(_max(p_lo + 1, 0), block_kv))
  if window is not None:
    left, right = window
    if right is not None:
      f_hi = _min(f_hi, _div(_max(p_lo + right + 1, 0), block_kv))
    if left is not None:
      f_lo = _max(f_lo, _cdiv(_max(p_last - left, 0), block_kv))
  if q_length is not None:
    f_hi = _where(q_hi <= q_length, f_hi, f_lo)
  f_lo = _min(_max(f_lo, lo), hi)
  f_hi = _min(_max(f_hi, f_lo), hi)
  return f_lo, f_hi


def visited_q_blocks(k_lo, k_hi, *, block_q: int, q_len: int, kv_len: int, causal: bool,
                     window, q_offset=None, q_length=None, kv_length=None):
  """Query blocks [lo, hi) of `block_q` rows of which some row sees a key of [k_lo, k_hi).

  Keys at or past kv_len (padding) or kv_length are seen by no row.
  """
  k_lo, k_hi = _min(k_lo, kv_len), _min(k_hi, kv_len)
  if kv_length is not None:
    k_hi = _min(k_hi, kv_length)
  q_lo, q_hi = masking.visible_q_range(k_lo, k_hi, q_len=q_len, causal=causal, window=window,
                                       q_offset=q_offset, q_length=q_length)
  lo, hi = _div(q_lo, block_q), _cdiv(q_hi, block_q)
  return lo, _where(k_lo < k_hi, _max(hi, lo), lo)


def unmasked_q_blocks(k_lo, k_hi, lo, hi, *, block_q: int, kv_len: int, causal: bool, window,
                      q_offset=None, q_length=None, kv_length=None):
  """Query blocks [f_lo, f_hi), inside [lo, hi), whose rows all fully see keys [k_lo, k_hi).

  The dual of `unmasked_kv_blocks`: `masking.tile_fully_visible` solved for the block
  index i of rows [i * block_q, (i + 1) * block_q), positions p = row + q_offset:
    keys in range        k_hi <= kv_len and k_hi <= kv_length (else no block is unmasked)
    rows in range        (i + 1) * block_q <= q_length
    causal               k_hi - 1 <= p(i * block_q)
    window right R       k_hi - 1 - R <= p(i * block_q)
    window left L        p((i + 1) * block_q - 1) - L <= k_lo
  """
  offset = 0 if q_offset is None else q_offset
  f_lo, f_hi = lo, hi
  keys_in_range = k_hi <= kv_len
  if kv_length is not None:
    keys_in_range = jnp.logical_and(keys_in_range, k_hi <= kv_length)
  f_hi = _where(keys_in_range, f_hi, f_lo)
  if q_length is not None:
    f_hi = _min(f_hi, _div(_max(q_length, 0), block_q))
  if causal:
    f_lo = _max(f_lo, _cdiv(_max(k_hi - 1 - offset, 0), block_q))
  if window is not None:
    left, right = window
    if right is not None:
      f_lo = _max(f_lo, _cdiv(_max(k_hi - 1 - right - offset, 0), block_q))
    if left is not None:
      f_hi = _min(f_hi, _div(_max(k_lo + 1 + left - offset, 0), block_q))
  f_lo = _min(_max(f_lo, lo), hi)
  f_hi = _min(_max(f_hi, f_lo), hi)
  return f_lo, f_hi
