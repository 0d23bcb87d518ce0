"""The autoregressive K/V cache of flash_jax's Flax modules: append new tokens, attend.

Flax's decode convention (flax.nnx.MultiHeadAttention, flax.linen.MultiHeadDotProductAttention):
a cache of cached_key [batch..., max_length, Nkv, H], cached_value [batch..., max_length,
Nkv, Hv] and cache_index (int32 scalar: the tokens already cached). A decode call writes
the new tokens' keys and values at cache_index, attends, and advances the index.

Flax takes one token per call and attends with a dense mask over max_length. Here a call
takes any number T of new tokens (a whole prompt as prefill, then one at a time), and
attention is flash_attention's decode path, bottom-right causal over the cache's filled
part:

    kv_lengths = cache_index + T,  q_offset = cache_index

    cache_index=3, T=2   keys 0 1 2 3 4 5 ... max_length-1
          q0 (position 3)     x x x x . .      (unfilled: never read)
          q1 (position 4)     x x x x x .

so kernels read only the first kv_lengths keys (split-KV kernels on GPU), never a mask
over max_length, and whatever lies past the index (zeros, stale tokens) never matters.

Ragged batches (an extension): cache_index may be int32 [batch...], one length per row,
and `lengths` [batch...] says how many of the T new tokens each row adds (the rest are
padding: not written, their outputs 0). Rows then hold and add different numbers of
tokens: prefill of one sequence beside decode steps of the others.

Writing past max_length:
  * T > max_length: ValueError at trace time (the shapes say so).
  * cache_index concrete (eager calls): ValueError before anything is written.
  * cache_index traced (under jit): a documented clamp. Tokens at positions >=
    max_length are not written (earlier tokens are never overwritten), their queries
    attend to the max_length cached keys, and the index still advances, so
    `cache_index > max_length` afterwards records the overflow: check it on the host.
    (No in-graph report: checkify.debug_check and jax.debug.callback are effects, which
    flax.linen's nn.scan rejects in a scanned cache's layer under newer JAX.)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import api
from flash_jax.flax.attention_fn import AttentionFn


def cache_shape(input_shape, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
  """[batch..., max_length, features] -> the cache's [batch..., max_length, Nkv, head_dim]."""
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) < 2 or input_shape[-2] <= 0:
    raise ValueError(f"input_shape must be [batch..., max_length, features] with max_length >= 1, "
                     f"got {input_shape}")
  return input_shape[:-1] + (num_kv_heads, head_dim)


def index_shape(input_shape, ragged: bool) -> tuple[int, ...]:
  """cache_index's shape: a scalar as Flax's, or one length per row when ragged."""
  return tuple(int(d) for d in input_shape[:-2]) if ragged else ()


def attend_with_cache(attention_fn: AttentionFn, query, key, value, cached_key, cached_value,
                      cache_index, *, lengths=None, mask=None, dtype=None, sinks=None):
  """Appends the new tokens to the cache and attends over it (see the module docstring).

  Args:
    attention_fn: the module's masking and implementation (causal, window, softcap,
      scale, implementation, block_sizes, interpret).
    query [batch..., T, Nq, H], key [batch..., T, Nkv, H], value [batch..., T, Nkv, Hv]:
      the T new tokens' projections.
    cached_key [batch..., L, Nkv, H], cached_value [batch..., L, Nkv, Hv]: the cache.
    cache_index: int [] or [batch...]: tokens already in the cache.
    lengths: int [batch...] (needs a per-row cache_index): new tokens each row adds.
    mask: bool broadcastable to [batch..., Nq, T, L], True = attend (a dense mask is
      read for every tile: the slow route, for what causal/window cannot say).
    dtype: computation dtype; default: query's and the cache's promoted.
    sinks: float [Nq] attention sinks (the module's `sinks` parameter), or None.

  Returns:
    (out [batch..., T, Nq, Hv], cached_key, cached_value, cache_index), the last three
    updated.
  """
  *batch_shape, max_length, num_kv_heads, head_dim = cached_key.shape
  batch_shape = tuple(batch_shape)
  new_tokens = query.shape[-3] if query.ndim >= 3 else 0
  _check_shapes(query, key, value, cached_key, cached_value, batch_shape, new_tokens)
  if new_tokens > max_length:
    raise ValueError(f"decode: {new_tokens} new tokens cannot fit a cache of "
                     f"max_length={max_length}")
  index = jnp.asarray(cache_index)
  if not jnp.issubdtype(index.dtype, jnp.integer):
    raise TypeError(f"cache_index must be an integer array, got dtype {index.dtype}")
  if index.shape not in ((), batch_shape):
    raise ValueError(f"cache_index must be a scalar or [batch...]={batch_shape}, got shape "
                     f"{index.shape}")
  if lengths is not None:
    if index.ndim == 0 and batch_shape:
      raise ValueError("lengths (rows adding different numbers of tokens) needs one cache_index "
                       "per row: init_cache(..., ragged=True)")
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer) or lengths.shape != batch_shape:
      raise ValueError(f"lengths must be an int array of shape [batch...]={batch_shape}, got "
                       f"{lengths.dtype}{list(lengths.shape)}")
  added = new_tokens if lengths is None else lengths  # [] or [batch...]
  _check_capacity(index, added, max_length)

  batch = math.prod(batch_shape)
  flat = lambda x: x.reshape((batch,) + x.shape[len(batch_shape):])
  row_index = jnp.broadcast_to(index, batch_shape).reshape(batch).astype(jnp.int32)  # [B]
  row_added = jnp.broadcast_to(jnp.asarray(added, jnp.int32), batch_shape).reshape(batch)  # [B]

  # Write: token t of row b goes to position index[b] + t. Padding tokens and positions
  # past max_length aim at max_length + t, out of range, where mode="drop" discards them
  # (dynamic_update_slice would instead clamp the start and overwrite earlier tokens).
  t = jnp.arange(new_tokens, dtype=jnp.int32)[None, :]  # [1, T]
  position = row_index[:, None] + t  # [B, T]
  written = (t < row_added[:, None]) & (position < max_length)
  position = jnp.where(written, position, max_length + t)  # unique and sorted per row
  rows = jnp.arange(batch, dtype=jnp.int32)[:, None]  # [B, 1]

  def write(cache, new):  # [B, L, Nkv, H] <- [B, T, Nkv, H]
    return cache.at[rows, position].set(new.astype(cache.dtype), mode="drop",
                                        unique_indices=True, indices_are_sorted=True)

  k_cache = write(flat(cached_key), flat(key))
  v_cache = write(flat(cached_value), flat(value))

  if dtype is None:
    dtype = jnp.result_type(query.dtype, cached_key.dtype)
  fn = attention_fn
  out = api.flash_attention(
      flat(query).astype(dtype), k_cache.astype(dtype), v_cache.astype(dtype),
      causal=fn.causal, window=fn.window, softcap=fn.softcap, scale=fn.scale,
      q_offset=row_index, kv_lengths=jnp.minimum(row_index + row_added, max_length),
      q_lengths=None if lengths is None else row_added,
      mask=_flatten_mask(mask, batch_shape, batch), sinks=sinks,
      implementation=fn.implementation, block_sizes=fn.block_sizes, interpret=fn.interpret,
      deterministic=fn.deterministic_backward)
  new_index = (index + added).astype(index.dtype)
  return (out.reshape(batch_shape + out.shape[1:]), k_cache.reshape(cached_key.shape),
          v_cache.reshape(cached_value.shape), new_index)


def _check_shapes(query, key, value, cached_key, cached_value, batch_shape, new_tokens):
  if query.ndim != len(batch_shape) + 3 or query.shape[:-3] != batch_shape:
    raise ValueError(f"decode: query {query.shape} must be [batch..., T, heads, head_dim] with "
                     f"the cache's batch dims {batch_shape} (cache {cached_key.shape}; "
                     f"init_cache sizes it)")
  if cached_value.shape[:-1] != cached_key.shape[:-1]:
    raise ValueError(f"cached_key {cached_key.shape} and cached_value {cached_value.shape} must "
                     f"share [batch..., max_length, kv_heads]")
  for name, new, cache in (("key", key, cached_key), ("value", value, cached_value)):
    expected = batch_shape + (new_tokens,) + cache.shape[-2:]
    if new.shape != expected:
      raise ValueError(f"decode: the new tokens' {name} {new.shape} must be {expected}: as many "
                       f"tokens as the query, the cache's heads and head_dim (cache "
                       f"{cache.shape})")


def _concrete(x):
  """x as a numpy array, or None when it is traced (under jit)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_capacity(index, added, max_length):
  index_now, added_now = _concrete(index), _concrete(added)
  if index_now is not None and added_now is not None:
    if np.any(index_now + added_now > max_length):
      raise ValueError(f"decode: writing {added_now} new tokens at cache_index {index_now} "
                       f"passes the cache's max_length={max_length}; init_cache with a longer "
                       f"input_shape")
  # Traced: the clamp (see the module docstring).


def _flatten_mask(mask, batch_shape, batch):
  """mask broadcastable to [batch..., N, T, L] -> [B, N', T, L] (N' is N or 1)."""
  if mask is None:
    return None
  mask = jnp.asarray(mask).astype(jnp.bool_)
  rank = len(batch_shape) + 3
  if not 3 <= mask.ndim <= rank:
    raise ValueError(f"mask must be broadcastable to [batch..., heads, T, max_length] with batch "
                     f"dims {batch_shape}, got shape {mask.shape}")
  mask = mask.reshape((1,) * (rank - mask.ndim) + mask.shape)
  try:
    mask = jnp.broadcast_to(mask, batch_shape + mask.shape[-3:])
  except ValueError as e:
    raise ValueError(f"mask {mask.shape} does not broadcast to the batch dims {batch_shape}") from e
  return mask.reshape((batch,) + mask.shape[-3:])
