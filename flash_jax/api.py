"""Public entry points. They normalize arguments into one spec and dispatch; nothing more."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flash_jax import dispatch, paged, sharding, sinks as sinks_lib, spec as spec_lib


def flash_attention(q, k, v, *, causal=False, scale=None, bias=None, mask=None,
                    segment_ids=None, q_offset=None, window=None, softcap=None,
                    dropout_rate=0.0, dropout_rng=None, return_lse=False,
                    implementation=None, block_sizes=None, interpret=False,
                    q_lengths=None, kv_lengths=None, sinks=None, deterministic=None):
  """Exact attention, computed blockwise: softmax(q k^T * scale + bias) v.

  Args:
    q: [B, T, Nq, H] queries. k: [B, S, Nkv, H] keys. v: [B, S, Nkv, Hv] values.
      Nq must be a multiple of Nkv: query head h reads key/value head h // (Nq // Nkv)
      (GQA; MQA when Nkv == 1), without materializing repeated k/v.
    causal: Python bool; query i sees key j only when j <= i + q_offset.
    scale: logit scale; default 1 / sqrt(H).
    bias: additive float logits bias broadcastable to [B, Nq, T, S]; differentiable (the
      kernels compute d bias, a float32 [B, Nq, T, S], only when a gradient flows to it).
      A finite bias is a logit however negative (a row of -1e30 attends uniformly, lse
      finite; values below -1e38 count as -1e38); -inf hides the key like a False mask.
    mask: bool, broadcastable to [B, Nq, T, S]; True = attend.
    segment_ids: int [B, T] (self-attention, T == S) or a pair (q_ids [B, T],
      kv_ids [B, S]): a query sees only keys of its own segment (packed documents).
    q_offset: int or int [B] in [-2**29, 2**29]: key position of query 0 (default 0,
      top-left aligned like jax.nn; chunked prefill passes S - T for bottom-right
      alignment). Host values outside raise ValueError; device arrays are clipped.
    window: (left, right) keys i+q_offset-left ... i+q_offset+right (None side, or one
      >= 2**30, = unbounded); an int w means (w, w), and (w, 0) with causal.
    softcap: logits = softcap * tanh(logits / softcap), after scale and bias (inf: none).
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
      keys >= kv_lengths[b] are hidden. A key no row sees by position (lengths, causal,
      window) may hold junk, NaN and inf included: it affects no output or gradient.
    sinks: float [Nq] (float32 recommended): attention sinks (gpt-oss, StreamingLLM),
      one logit per query head that joins the softmax's denominator and adds nothing to
      the output: p_ij = exp(s_ij) / (exp(sinks[h]) + sum_j exp(s_ij)). Differentiable;
      lse includes it. See flash_jax/sinks.py.
    deterministic: True: gradients are bitwise reproducible from run to run. False
      allows an implementation a faster backward that accumulates in no fixed order.
      None (default): True exactly when XLA_FLAGS sets --xla_gpu_deterministic_ops, the
      switch that makes XLA's own (and cuDNN's) backward reproducible. What False
      allows is a backward that adds dQ up across key blocks with atomics (`atomic_dq`
      in the Mosaic GPU and Triton configs); the shipped tables use it for mosaic_gpu at
      head dim 64 on the H200, where it is faster. See docs/performance_mosaic_gpu.md
      for its figures and the measured price of cuDNN's reproducibility.

  Returns:
    out [B, T, Nq, Hv] in q's dtype, and lse if return_lse. A query row that sees no
    key returns 0 (lse -inf, or sinks[h] with sinks; zero q/k/v gradients), never NaN.
    Second-order derivatives work on "xla" and "chunked"; the Pallas kernels raise
    NotImplementedError.
  """
  return_lse = spec_lib.check_bool("return_lse", return_lse)
  spec, q, k, v, bias, arrays = spec_lib.normalize(
      q, k, v, causal=causal, scale=scale, bias=bias, mask=mask, segment_ids=segment_ids,
      q_offset=q_offset, window=window, softcap=softcap, dropout_rate=dropout_rate,
      dropout_rng=dropout_rng, q_lengths=q_lengths, kv_lengths=kv_lengths,
      deterministic=deterministic)
  sinks = sinks_lib.check_sinks(sinks, spec.num_q_heads)
  # Under jit with sharded inputs, each device runs the implementation on its shard.
  impl = sharding.partitioned(dispatch.select(spec, implementation, interpret=interpret))
  config = _config(impl, spec, block_sizes)
  out, lse = _named_call(impl, spec, config, interpret)(q, k, v, bias, arrays, sinks)
  return (out, lse) if return_lse else out


# Bounded: each entry holds a jitted function and its compiled executables (code memory
# the process maps); a program uses few distinct calls, a long-lived one must not grow.
COMPILED_CALLS = 256


@functools.lru_cache(maxsize=COMPILED_CALLS)
def _named_call(impl, spec, config, interpret):
  """`impl` under a jit named flash_jax_<implementation>: the jaxpr shows which one ran,
  and eager calls reuse the compiled function of an identical call. Sinks merge into
  the implementation's (out, lse) here, once, unless it folds them itself."""
  def call(q, k, v, bias, arrays, sinks):
    if sinks is not None and impl.folds_sinks:
      return impl(q, k, v, bias, arrays, spec, config, interpret, sinks=sinks)
    out, lse = impl(q, k, v, bias, arrays, spec, config, interpret)
    return (out, lse) if sinks is None else sinks_lib.apply_sinks(out, lse, sinks)
  call.__name__ = f"flash_jax_{impl.name}"
  return jax.jit(call)


def paged_attention(q, k_pages, v_pages, block_tables, kv_lengths, *, causal=True,
                    q_offset=None, scale=None, window=None, softcap=None, sinks=None,
                    return_lse=False, implementation=None, block_sizes=None,
                    interpret=False):
  """Attention of new query tokens over a paged K/V cache (decoding, chunked prefill).

  Args:
    q: [B, T, Nq, H], the T newest tokens of each sequence (T = 1 when decoding).
    k_pages: [P, page_size, Nkv, H], v_pages: [P, page_size, Nkv, Hv]: the page pool,
      token-major. Nq must be a multiple of Nkv (GQA/MQA as in flash_attention).
    block_tables: int32 [B, pages_per_seq]: key j of sequence b lives at
      k_pages[block_tables[b, j // page_size], j % page_size]. Entries past a
      sequence's last page may hold anything (unused, out of range): never read.
    kv_lengths: int32 [B]: tokens in each sequence's cache, the new ones included.
      Whatever lies past them (NaN, inf, stale tokens) never reaches the output;
      kv_lengths[b] == 0 gives zeros.
    causal: query i sees key j <= i + q_offset.
    q_offset: int or int [B]; default kv_lengths - T (bottom-right alignment: the T
      queries are the newest T tokens, already written to the cache):

        T=2, kv_lengths=5 (q_offset 3)   keys 0 1 2 3 4
                              q0 (p=3)        x x x x .
                              q1 (p=4)        x x x x x
    scale, window, softcap, sinks: as in flash_attention.
    return_lse: also return lse [B, Nq, T] float32 (with the sinks, if any).
    implementation: None (the fastest that serves the call) or a name; block_sizes,
      interpret: as in flash_attention.

  Returns out [B, T, Nq, Hv] in q's dtype (and lse). Forward only: differentiating it
  raises. Write new tokens with `write_kv_pages` first.
  """
  return_lse = spec_lib.check_bool("return_lse", return_lse)
  spec, q, k_pages, v_pages, arrays = paged.normalize_paged(
      q, k_pages, v_pages, block_tables, kv_lengths, causal=causal, q_offset=q_offset,
      scale=scale, window=window, softcap=softcap)
  sinks = sinks_lib.check_sinks(sinks, spec.num_q_heads)
  impl = sharding.partitioned(dispatch.select(spec, implementation, interpret=interpret))
  config = _config(impl, spec, block_sizes)
  out, lse = _forward_only_call(impl, spec, config, interpret)(q, k_pages, v_pages, arrays)
  if sinks is not None:  # once, after the kernels' split-KV combine
    out, lse = sinks_lib.apply_sinks(out, lse, sinks)
  return (out, lse) if return_lse else out


def _config(impl, spec, block_sizes):
  if block_sizes is None:
    return impl.default_config(spec)
  impl.check_config(block_sizes)
  return block_sizes


@functools.lru_cache(maxsize=COMPILED_CALLS)
def _forward_only_call(impl, spec, config, interpret):
  """`impl`'s forward under a jit named flash_jax_paged_<implementation>; any attempt to
  differentiate it raises (its jvp rule is the error)."""
  @jax.custom_jvp
  def call(q, k_pages, v_pages, arrays):
    return impl.forward_only(q, k_pages, v_pages, None, arrays, spec, config, interpret)

  @call.defjvp
  def _no_derivatives(primals, tangents):
    raise TypeError("flash_jax.paged_attention is forward-only (inference over a paged K/V "
                    "cache): it has no gradients; differentiate flash_attention on "
                    "contiguous K/V instead")

  named = lambda *args: call(*args)
  named.__name__ = f"flash_jax_paged_{impl.name}"
  return jax.jit(named)


def clear_caches() -> None:
  """Drops flash_jax's compiled calls and JAX's caches (`jax.clear_caches`)."""
  _named_call.cache_clear()
  _forward_only_call.cache_clear()
  sharding.clear_caches()
  jax.clear_caches()


def which_implementation(q, k, v, *, implementation=None, interpret=False, **kwargs) -> str:
  """The name of the implementation `flash_attention` would use for these arguments."""
  kwargs.pop("sinks", None)  # every implementation serves sinks: they change no choice
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
