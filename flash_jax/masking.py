"""The masking rules of flash_jax, written once.

Every implementation (the materializing reference, the chunked jnp fallback and the
Pallas kernels) builds its logits, visibility and dropout from these functions, so all
of them compute the same function. They are plain jnp on broadcastable int32 arrays
and therefore also run inside Pallas kernel bodies, on a [block_q, block_kv] tile.
Array arguments share one rank (scalars aside) and broadcast only over size-1 dims:
nothing here relies on rank promotion, so callers work under
`jax_numpy_rank_promotion="raise"`.

Coordinates: query row i (0 <= i < T) sits at key position p(i) = i + q_offset. Query i
sees key j (0 <= j < S) when every active rule allows it:

    causal          j <= p(i)
    window (L, R)   p(i) - L <= j <= p(i) + R         (a None side is unbounded)
    segment ids     q_segment_ids[i] == kv_segment_ids[j]
    lengths         i < q_length  and  j < kv_length
    dense mask      mask[b, h, i, j]                   (applied by each implementation)

    Causal, T=4, S=6, q_offset=2 (chunked prefill: the 4 queries are the last 4 keys):
        keys  0 1 2 3 4 5
      q0 (p=2) x x x . . .
      q1 (p=3) x x x x . .
      q2 (p=4) x x x x x .
      q3 (p=5) x x x x x x

A row that sees no key produces output 0 and lse -inf. Masked logits take the finite
MASK_VALUE and masked probabilities are zeroed explicitly with `where`, so no -inf
arithmetic, and no NaN, can arise (online softmax, FlashAttention-2 section 3.1.1).

Bias: a finite bias is a logit, however negative: a row whose keys all carry -1e30
attends to them uniformly, as jax.nn does. Finite values below BIAS_FLOOR count as
BIAS_FLOOR (gradient 0 there), so that every finite logit stays above MASK_VALUE and
finite in base 2. A bias of -inf hides its key, as a False mask entry does (soft-cap
included); a row whose keys are all hidden that way sees nothing. Running maxima start
at MASK_VALUE, so -inf logits only ever meet finite maxima: exp(-inf - m) = 0.

Junk keys: a key that no query row sees by the positional rules (lengths, causal and
window with q_offset: the unused tail of a KV cache) is zeroed before it is used, so
NaN or inf there reach no output and no gradient (its dk, dv are 0). Keys hidden only by
segment ids or a dense mask are zeroed by the pure-JAX implementations too, not by the
Pallas kernels; keys hidden by a -inf bias must be finite everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Large, finite and far from overflow when a running max is subtracted from it.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# The lowest finite bias: below MASK_VALUE / log2(e) (kernels that work in base 2 mask
# after the change of base) with room for q.k, so a visible logit is never taken for a
# masked one, and float32's lowest value is still a logit.
BIAS_FLOOR = -1e38


def visible_and(a, b):
  """The conjunction of two visibilities, either None when everything is visible."""
  if a is None:
    return b
  return a if b is None else jnp.logical_and(a, b)


def key_visibility(q_idx, k_idx, *, causal=False, window=None, q_offset=None,
                   q_segment_ids=None, kv_segment_ids=None, q_length=None,
                   kv_length=None, kv_bound=None):
  """Bool array: may query row `q_idx` see key `k_idx`? None when every key is visible.

  q_idx, k_idx: broadcastable int32 index arrays of one rank (e.g. [bq, 1] and [1, bk]).
  q_offset, q_length, kv_length: scalars or arrays of that rank broadcastable against them.
  q_segment_ids broadcasts with q_idx, kv_segment_ids with k_idx.
  kv_bound: static S; hides padded key columns k_idx >= S of a tail tile.
  """
  visible = None
  q_pos = q_idx if q_offset is None else q_idx + q_offset
  if causal:
    visible = visible_and(visible, k_idx <= q_pos)
  if window is not None:
    left, right = window
    if left is not None:
      visible = visible_and(visible, k_idx >= q_pos - left)
    if right is not None:
      visible = visible_and(visible, k_idx <= q_pos + right)
  if q_segment_ids is not None:
    visible = visible_and(visible, q_segment_ids == kv_segment_ids)
  if q_length is not None:
    visible = visible_and(visible, q_idx < q_length)
  if kv_length is not None:
    visible = visible_and(visible, k_idx < kv_length)
  if kv_bound is not None:
    visible = visible_and(visible, k_idx < kv_bound)
  return visible


def visible_kv_range(q_lo, q_hi, *, kv_len, causal=False, window=None, q_offset=None,
                     kv_length=None, q_length=None):
  """Keys [k_lo, k_hi) outside which no query of rows [q_lo, q_hi) sees anything.

  Used for tile skipping (key blocks outside the range are never loaded) and to zero
  junk keys. Works on Python ints and traced int32 scalars. Segment ids and dense masks
  are not bounded here. With q_length, rows at or past it see nothing.
  """
  if q_length is not None:
    q_hi = jnp.minimum(q_hi, q_length)
  offset = 0 if q_offset is None else q_offset
  first_pos, last_pos = q_lo + offset, q_hi - 1 + offset
  k_lo, k_hi = 0, kv_len
  if causal:
    k_hi = jnp.minimum(k_hi, last_pos + 1)
  if window is not None:
    left, right = window
    if left is not None:
      k_lo = jnp.maximum(k_lo, first_pos - left)
    if right is not None:
      k_hi = jnp.minimum(k_hi, last_pos + right + 1)
  if kv_length is not None:
    k_hi = jnp.minimum(k_hi, kv_length)
  if q_length is not None:
    # Explicit int32 branches: Pallas' Triton lowering (JAX 0.11/0.12) turns a select
    # between two Python int literals into an i1 select, which Triton rejects.
    k_hi = jnp.where(q_hi > q_lo, jnp.asarray(k_hi, jnp.int32), jnp.int32(0))
  k_lo = jnp.clip(k_lo, 0, kv_len)
  return k_lo, jnp.clip(k_hi, k_lo, kv_len)


def keys_in_range(k_idx, key_range):
  """Bool: k_idx inside [k_lo, k_hi) = key_range (from `visible_kv_range`)."""
  k_lo, k_hi = key_range
  return jnp.logical_and(k_idx >= k_lo, k_idx < k_hi)


def visible_q_range(k_lo, k_hi, *, q_len, causal=False, window=None, q_offset=None,
                    q_length=None):
  """Query rows [q_lo, q_hi) outside which no row sees a key of [k_lo, k_hi) (the dual)."""
  offset = 0 if q_offset is None else q_offset
  q_lo, q_hi = 0, q_len
  if causal:
    q_lo = jnp.maximum(q_lo, k_lo - offset)
  if window is not None:
    left, right = window
    if right is not None:
      q_lo = jnp.maximum(q_lo, k_lo - right - offset)
    if left is not None:
      q_hi = jnp.minimum(q_hi, k_hi + left - offset)
  if q_length is not None:
    q_hi = jnp.minimum(q_hi, q_length)
  q_lo = jnp.clip(q_lo, 0, q_len)
  return q_lo, jnp.clip(q_hi, q_lo, q_len)


def tile_fully_visible(q_lo, q_hi, k_lo, k_hi, *, kv_len, causal=False, window=None,
                       q_offset=None, q_length=None, kv_length=None):
  """True when every (query, key) of the tile is visible under the positional rules.

  Such tiles skip the mask arithmetic. Segment ids and dense masks are not considered:
  a kernel with either must mask every tile (or precompute per-block information).
  """
  offset = 0 if q_offset is None else q_offset
  full = jnp.asarray(k_hi <= kv_len)
  if causal:
    full &= k_hi - 1 <= q_lo + offset
  if window is not None:
    left, right = window
    if left is not None:
      full &= k_lo >= q_hi - 1 + offset - left
    if right is not None:
      full &= k_hi - 1 <= q_lo + offset + right
  if q_length is not None:
    full &= q_hi <= q_length
  if kv_length is not None:
    full &= k_hi <= kv_length
  return full


def floor_bias(bias):
  """The bias in float32 (float64 stays), finite values below BIAS_FLOOR raised to it;
  -inf stays (hides the key)."""
  bias = bias.astype(jnp.promote_types(bias.dtype, jnp.float32))
  return jnp.where(jnp.logical_and(bias < BIAS_FLOOR, bias > -jnp.inf), BIAS_FLOOR, bias)


def bias_grad(ds, bias):
  """d loss / d bias from d loss / d logits: 0 where `floor_bias` raised the bias."""
  return jnp.where(bias.astype(jnp.promote_types(bias.dtype, jnp.float32)) < BIAS_FLOOR,
                   jnp.zeros((), ds.dtype), ds)


def transform_logits(s, *, scale, bias=None, softcap=None):
  """q.k^T (float32; float64 for float64 inputs) -> logits: scale, add bias, then soft-cap
  c * tanh(s / c).

  A -inf bias gives a -inf logit, also through the soft-cap (the key stays hidden).
  """
  s = s * scale
  if bias is not None:
    s = s + floor_bias(bias).astype(s.dtype)
  if softcap is not None:
    capped = softcap * jnp.tanh(s / softcap)
    s = capped if bias is None else jnp.where(s == -jnp.inf, s, capped)
  return s


def softcap_grad(logits, softcap):
  """d logits / d (pre-cap logits) written with the capped logits: 1 - tanh^2 (0 at a
  -inf logit, so that it times a zero probability stays 0)."""
  if softcap is None:
    return None
  t = jnp.clip(logits / softcap, -1.0, 1.0)
  return 1.0 - t * t


def masked_logits(logits, visible):
  """Replaces hidden logits by MASK_VALUE (finite: no -inf arithmetic)."""
  return logits if visible is None else jnp.where(visible, logits, MASK_VALUE)


def masked_exp(logits, row_max, visible, exp=jnp.exp):
  """exp(logits - row_max), exactly 0 where hidden, also on rows that see nothing.

  `exp` lets kernels that keep logits in base 2 pass their 2**x (same zeroing rule).
  """
  p = exp(logits - row_max)
  return p if visible is None else jnp.where(visible, p, 0.0)


# ---- dropout: a pure counter-based hash of (seed, batch, head, query, key) ---------------
# The same bits in forward and backward, in every implementation, the references
# included, so implementations can be compared exactly. A murmur3-style finalizer
# (fmix32) mixes each coordinate in; only uint32 multiply, xor and shifts are used,
# which Triton, Mosaic GPU, Mosaic TPU and XLA all lower.

def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _u32(x):
  return jnp.asarray(x).astype(jnp.uint32)


def dropout_keep(seed, batch_idx, head_idx, q_idx, k_idx, rate):
  """Bool keep-mask, True with probability 1 - rate; broadcasts its index arguments.

  Indices are global: batch b, query head h (0 <= h < Nq), query row i, key column j.
  """
  return dropout_keep_in_row(dropout_row_hash(seed, batch_idx, head_idx, q_idx), k_idx, rate)


def dropout_row_hash(seed, batch_idx, head_idx, q_idx):
  """uint32: the part of `dropout_keep`'s hash that depends on the query row only, so
  that a kernel can compute it once per row rather than once per (row, key)."""
  h = _fmix32(_u32(seed) ^ (_u32(batch_idx) * jnp.uint32(0x9E3779B1)))
  h = _fmix32(h ^ (_u32(head_idx) * jnp.uint32(0x85EBCA77)))
  return _fmix32(h ^ (_u32(q_idx) * jnp.uint32(0xC2B2AE3D)))


def dropout_keep_in_row(row_hash, k_idx, rate):
  """`dropout_keep` from a row's `dropout_row_hash` and the key column."""
  h = _fmix32(row_hash ^ (_u32(k_idx) * jnp.uint32(0x27D4EB2F)))
  # Compare the top 24 bits as int32: signed compares lower everywhere.
  threshold = int(round(rate * (1 << 24)))
  return (h >> 8).astype(jnp.int32) >= threshold


def dropout_multiplier(keep, rate, dtype=jnp.float32):
  """keep / (1 - rate) in `dtype` (float32, or float64 for float64 inputs), 0 where dropped."""
  return jnp.where(keep, jnp.asarray(1.0 / (1.0 - rate), dtype), jnp.asarray(0.0, dtype))
