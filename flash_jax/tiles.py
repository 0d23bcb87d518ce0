"""jnp tile computations shared by the reference, the chunked implementation and the
kernels' wrappers (padding to whole blocks).

A tile is all queries against the key columns [k_start, k_start + width), laid out in
the grouped frame [B, Nkv, G, T, width] (G = query heads per key/value head), so GQA
never materializes repeated K/V. Masking rules come from `masking`. Every operand of a
broadcasting op has the tile's rank (5), so calls pass under
`jax_numpy_rank_promotion="raise"`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax import masking
from flash_jax.spec import AttentionArrays, AttentionSpec


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return -(-n // multiple) * multiple


def pad_axis(x, axis: int, size: int, value=0):
  """x padded with `value` at the end of `axis` to length `size` (x itself if it has it)."""
  if x.shape[axis] == size:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad, constant_values=value)


def accumulation_dtype(spec: AttentionSpec) -> jnp.dtype:
  """The dtype of logits, softmax statistics, accumulators and lse: float32, or float64
  for float64 inputs (which only the jnp implementations serve)."""
  return jnp.promote_types(spec.jnp_dtype, jnp.float32)


def _frame_index(values, axis: int):
  """int32 1-D `values` as a 5-D [B, Nkv, G, T, w] frame index varying along `axis`."""
  shape = [1] * 5
  shape[axis] = values.shape[0]
  return values.reshape(shape)


def group_queries(q, spec: AttentionSpec):
  """[B, T, Nq, H] -> [B, T, Nkv, G, H]."""
  return q.reshape(spec.batch, spec.q_len, spec.num_kv_heads, spec.group_size, q.shape[-1])


def ungroup_queries(x, spec: AttentionSpec):
  """[B, T, Nkv, G, H] -> [B, T, Nq, H]."""
  return x.reshape(spec.batch, spec.q_len, spec.num_q_heads, x.shape[-1])


def pack_queries(q, spec: AttentionSpec):
  """[B, T, Nq, H] -> [B, Nkv, T * G, H]: the T tokens x G query heads that share a K/V
  head as the rows of one tile, token-major (GQA packing of the decode kernels)."""
  q5 = group_queries(q, spec)  # [B, T, Nkv, G, H]
  return jnp.transpose(q5, (0, 2, 1, 3, 4)).reshape(
      spec.batch, spec.num_kv_heads, spec.packed_rows, q.shape[-1])


def unpack_rows(x, spec: AttentionSpec):
  """[B, Nkv, T * G, ...] -> [B, T, Nq, ...] (pack_queries' inverse)."""
  x = x.reshape((spec.batch, spec.num_kv_heads, spec.q_len, spec.group_size) + x.shape[3:])
  x = jnp.moveaxis(x, 2, 1)  # [B, T, Nkv, G, ...]
  return x.reshape((spec.batch, spec.q_len, spec.num_q_heads) + x.shape[4:])


def to_grouped_frame(x, spec: AttentionSpec):
  """A 4-D [B?, Nq?, T?, S?] bias or mask -> 5-D [B?, Nkv?, G?, T?, S?]."""
  b, n, t, s = x.shape
  if n == 1:
    return x.reshape(b, 1, 1, t, s)
  return x.reshape(b, spec.num_kv_heads, spec.group_size, t, s)


def sum_to_shape(x, shape):
  """Sums the axes of `x` that `shape` broadcasts (size 1): the gradient of a broadcast."""
  axes = tuple(i for i, (got, want) in enumerate(zip(x.shape, shape)) if want == 1 and got != 1)
  return jnp.sum(x, axis=axes, keepdims=True)


def from_grouped_frame(x, shape4):
  """Inverse of `to_grouped_frame`, summing any axis that was broadcast."""
  x = x.reshape(x.shape[0], -1, x.shape[3], x.shape[4])
  return sum_to_shape(x, tuple(shape4)).reshape(shape4)


def columns(x, k_start, width):
  """Key columns [k_start, k_start + width) of a grouped bias/mask (broadcast S stays)."""
  if x is None or x.shape[-1] == 1:
    return x
  return jax.lax.dynamic_slice_in_dim(x, k_start, width, axis=x.ndim - 1)


def tile_logits(q5, k, bias5, spec: AttentionSpec):
  """q5 [B, T, Nkv, G, H], k [B, w, Nkv, H] -> logits [B, Nkv, G, T, w] in the
  accumulation dtype, at the call's matmul precision (`spec.precision`)."""
  s = jnp.einsum("btkgh,bskh->bkgts", q5, k, precision=spec.precision,
                 preferred_element_type=accumulation_dtype(spec))
  return masking.transform_logits(s, scale=spec.scale, bias=bias5, softcap=spec.softcap)


def tile_visibility(spec: AttentionSpec, arrays: AttentionArrays, mask5, k_start, width,
                    kv_bound=None):
  """Bool [B|1, Nkv|1, G|1, T, w] (or None): positional rules, segment ids and dense mask."""
  col = lambda x: None if x is None else _frame_index(x, 0)  # [B] -> [B, 1, 1, 1, 1]
  q_idx = _frame_index(jnp.arange(spec.q_len, dtype=jnp.int32), 3)  # [1, 1, 1, T, 1]
  k_idx = k_start + _frame_index(jnp.arange(width, dtype=jnp.int32), 4)  # [1, 1, 1, 1, w]
  q_seg = kv_seg = None
  if arrays.q_segment_ids is not None:
    q_seg = arrays.q_segment_ids[:, None, None, :, None]  # [B, 1, 1, T, 1]
    kv_seg = jax.lax.dynamic_slice_in_dim(arrays.kv_segment_ids, k_start, width, axis=1)
    kv_seg = kv_seg[:, None, None, None, :]  # [B, 1, 1, 1, w]
  visible = masking.key_visibility(
      q_idx, k_idx, causal=spec.causal, window=spec.window, q_offset=col(arrays.q_offset),
      q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_length=col(arrays.q_lengths),
      kv_length=col(arrays.kv_lengths), kv_bound=kv_bound)
  if mask5 is not None:
    dense = columns(mask5, k_start, width)
    visible = masking.visible_and(visible, dense)
  return visible


def hide_unseen_keys(visible, *xs):
  """Zeroes the rows of k/v-shaped `xs` ([B, w, Nkv, D]) whose key no query row of the
  tile sees, so that junk there (NaN, inf) cannot reach a product: P = 0 times NaN is NaN.
  `visible` is a tile's visibility ([B|1, Nkv|1, G|1, T, w], or fewer leading dims)."""
  if visible is None:
    return xs
  visible = visible.reshape((1,) * (5 - visible.ndim) + visible.shape)
  seen = jnp.swapaxes(jnp.any(visible, axis=(2, 3)), 1, 2)[..., None]  # [B|1, w, Nkv|1, 1]
  return tuple(jnp.where(seen, x, jnp.zeros((), x.dtype)) for x in xs)


def zero_keys_no_row_sees(spec: AttentionSpec, arrays: AttentionArrays, *xs):
  """Zeroes the rows of k/v-shaped `xs` ([B, S, Nkv, D]) whose key no query row of the
  call sees by position (`masking.visible_kv_range` over all rows: lengths, causal with
  q_offset, window), for kernels that load whole key blocks unmasked (TMA): junk there
  (NaN, inf) would otherwise meet P = 0 in a matmul. One elementwise pass, and only when
  the positional rules can hide a key."""
  can_hide = (spec.has_kv_lengths or spec.has_q_lengths or spec.has_q_offset
              or spec.window is not None or (spec.causal and spec.kv_len > spec.q_len))
  if not can_hide:
    return xs
  col = lambda x: None if x is None else x[:, None]  # [B] -> [B, 1]
  key_range = masking.visible_kv_range(
      0, spec.q_len, kv_len=spec.kv_len, causal=spec.causal, window=spec.window,
      q_offset=col(arrays.q_offset), kv_length=col(arrays.kv_lengths),
      q_length=col(arrays.q_lengths))
  seen = masking.keys_in_range(jnp.arange(spec.kv_len, dtype=jnp.int32)[None, :], key_range)
  seen = jnp.broadcast_to(seen, (spec.batch, spec.kv_len))[:, :, None, None]  # [B, S, 1, 1]
  return tuple(jnp.where(seen, x, jnp.zeros((), x.dtype)) for x in xs)


def tile_dropout(spec: AttentionSpec, arrays: AttentionArrays, k_start, width):
  """Multiplier keep / (1 - rate) on [B, Nkv, G, T, w] in the accumulation dtype, or None
  without dropout."""
  if not spec.has_dropout:
    return None
  b = _frame_index(jnp.arange(spec.batch, dtype=jnp.int32), 0)  # [B, 1, 1, 1, 1]
  h = jnp.arange(spec.num_q_heads, dtype=jnp.int32).reshape(
      1, spec.num_kv_heads, spec.group_size, 1, 1)
  i = _frame_index(jnp.arange(spec.q_len, dtype=jnp.int32), 3)  # [1, 1, 1, T, 1]
  j = k_start + _frame_index(jnp.arange(width, dtype=jnp.int32), 4)  # [1, 1, 1, 1, w]
  keep = masking.dropout_keep(arrays.dropout_seed, b, h, i, j, spec.dropout_rate)
  return masking.dropout_multiplier(keep, spec.dropout_rate, accumulation_dtype(spec))


def lse_from_stats(row_max, row_sum):
  """Natural-log log-sum-exp from the running max and sum; -inf where the row saw nothing."""
  seen = row_sum > 0
  return jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), -jnp.inf)


def backward_stats(row_max, row_sum, log=jnp.log):
  """(m, log l) for `BlockwiseImplementation.forward_with_stats`; (0, 0) on rows that saw
  nothing, so that no inf enters the backward (their P is 0 through the mask anyway).
  `log` lets base-2 kernels pass log2."""
  seen = row_sum > 0
  return jnp.where(seen, row_max, 0.0), jnp.where(seen, log(jnp.where(seen, row_sum, 1.0)), 0.0)


def stats_or_lse(stats, lse):
  """The backward's (m, log l): the forward's stats, or (lse, 0) when there are none
  (lse -inf on rows that saw nothing becomes 0, as in `backward_stats`)."""
  if stats is not None:
    return stats
  return jnp.where(jnp.isfinite(lse), lse, 0.0), jnp.zeros_like(lse)


def grouped_stats_to_heads(x, spec: AttentionSpec):
  """[B, Nkv, G, T] -> [B, Nq, T]."""
  return x.reshape(spec.batch, spec.num_q_heads, spec.q_len)


def heads_to_grouped_stats(x, spec: AttentionSpec):
  """[B, Nq, T] -> [B, Nkv, G, T]."""
  return x.reshape(spec.batch, spec.num_kv_heads, spec.group_size, spec.q_len)
