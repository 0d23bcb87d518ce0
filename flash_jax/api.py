"""Public entry points. They normalize arguments into one spec and dispatch; nothing more."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import dispatch, sharding, spec as spec_lib


def flash_attention(q, k, v, *, causal=False, scale=None, bias=None, mask=None,
                    segment_ids=None, q_offset=None, window=None, softcap=None,
                    dropout_rate=0.0, dropout_rng=None, return_lse=False,
                    implementation=None, block_sizes=None, interpret=False,
                    q_lengths=None, kv_lengths=None):
  """Exact attention, computed blockwise: softmax(q k^T * scale + bias) v.

  Args:
    q: [B, T, Nq, H] queries. k: [B, S, Nkv, H] keys. v: [B, S, Nkv, Hv] values.
      Nq must be a multiple of Nkv: query head h reads key/value head h // (Nq // Nkv)
      (GQA; MQA when Nkv == 1), without materializing repeated k/v.
    causal: query i sees key j only when j <= i + q_offset.
    scale: logit scale; default 1 / sqrt(H).
    bias: additive float logits bias broadcastable to [B, Nq, T, S]; differentiable.
    mask: bool, broadcastable to [B, Nq, T, S]; True = attend.
    segment_ids: int [B, T] (self-attention, T == S) or a pair (q_ids [B, T],
      kv_ids [B, S]): a query sees only keys of its own segment (packed documents).
    q_offset: int or int [B]: key position of query 0 (default 0, top-left aligned
      like jax.nn; chunked prefill passes S - T for bottom-right alignment).
    window: (left, right) keys i+q_offset-left ... i+q_offset+right (None side =
      unbounded); an int w means (w, w), and (w, 0) with causal.
    softcap: logits = softcap * tanh(logits / softcap), after scale and bias.
    dropout_rate, dropout_rng: dropout on the attention probabilities with a
      counter-based keep-mask of (rng, batch, head, query, key), identical in every
      implementation.
    return_lse: also return the natural-log log-sum-exp [B, Nq, T] float32
      (-inf on rows that see no key). It is differentiable.
    implementation: None (the fastest that serves the call on this platform, see
      `which_implementation`), or one of "xla", "chunked", "triton", "mosaic_gpu",
      "mosaic_tpu" (see `implementation_names()`); a named implementation that cannot
      serve the call raises NotImplementedError.
    block_sizes: a `BlockSizes` (or the implementation's own config subclass).
    interpret: run a Pallas implementation in interpret mode (on CPU).
    q_lengths, kv_lengths: int [B]: query rows >= q_lengths[b] see nothing (output 0);
      keys >= kv_lengths[b] are hidden.

  Returns:
    out [B, T, Nq, Hv] in q's dtype, and lse if return_lse. A query row that sees no
    key returns 0 (lse -inf, zero gradients), never NaN.
  """
  spec, q, k, v, bias, arrays = spec_lib.normalize(
      q, k, v, causal=causal, scale=scale, bias=bias, mask=mask, segment_ids=segment_ids,
      q_offset=q_offset, window=window, softcap=softcap, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng, q_lengths=q_lengths, kv_lengths=kv_lengths)
  # Under jit with sharded inputs, each device runs the implementation on its shard.
  impl = sharding.partitioned(dispatch.select(spec, implementation, interpret=interpret))
  if block_sizes is None:
    config = impl.default_config(spec)
  else:
    impl.check_config(block_sizes)
    config = block_sizes
  out, lse = _named_call(impl, spec, config, interpret)(q, k, v, bias, arrays)
  return (out, lse) if return_lse else out


@functools.cache
def _named_call(impl, spec, config, interpret):
  """`impl` under a jit named flash_jax_<implementation>: the jaxpr shows which one ran,
  and eager calls reuse the compiled function of an identical call."""
  def call(q, k, v, bias, arrays):
    return impl(q, k, v, bias, arrays, spec, config, interpret)
  call.__name__ = f"flash_jax_{impl.name}"
  return jax.jit(call)


def which_implementation(q, k, v, *, implementation=None, interpret=False, **kwargs) -> str:
  """The name of the implementation `flash_attention` would use for these arguments."""
  spec, *_ = spec_lib.normalize(q, k, v, **kwargs)
  return dispatch.select(spec, implementation, interpret=interpret).name


def dot_product_attention(query, key, value, bias=None, mask=None, *, scale=None,
                          is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                          local_window_size=None, implementation=None,
                          return_residual=False):
  """Drop-in for `jax.nn.dot_product_attention`: same arguments, shapes and defaults.

  query [B, T, N, H] or [T, N, H]; key/value [B, S, K, H] or [S, K, H]; bfloat16,
  float16, float32, or float64 (with jax_enable_x64: implementation None, "xla" or
  "chunked"). `implementation` takes flash_jax's names (None picks the fastest) and
  "cudnn", which runs jax.nn's own cuDNN path unchanged. The residual (lse [B, T, N] in
  the output dtype) carries no gradient, as in jax.nn. The one difference: a query row
  that sees no key returns zeros, where jax.nn's XLA path returns the mean of value (and
  its lse residual here is -inf there).
  """
  if implementation == "cudnn":  # jax.nn's own cuDNN path, exactly as jax.nn runs it
    return jax.nn.dot_product_attention(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation="cudnn",
        return_residual=return_residual)
  unbatched = np.ndim(query) == 3
  if unbatched:
    query, key, value = (jnp.asarray(x)[None] for x in (query, key, value))
  if isinstance(local_window_size, (int, np.integer)):
    local_window_size = (int(local_window_size), int(local_window_size))
  result = flash_attention(
      query, key, value, causal=is_causal, scale=scale, bias=bias, mask=mask,
      window=local_window_size, q_lengths=query_seq_lengths, kv_lengths=key_value_seq_lengths,
      implementation=implementation, return_lse=return_residual)
  if return_residual:
    out, lse = result
    # [B, T, N] in the output dtype, without gradient: as jax.nn returns it.
    residual = jax.lax.stop_gradient(jnp.transpose(lse, (0, 2, 1)).astype(out.dtype))
    return (out[0], residual[0]) if unbatched else (out, residual)
  return result[0] if unbatched else result
