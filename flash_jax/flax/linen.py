"""`FlashAttention` for flax.linen: multi-head attention with projections, on flash_jax.

Its parameters are laid out as `flax.linen.MultiHeadDotProductAttention`'s (query, key,
value: DenseGeneral -> [heads, head_dim]; out: DenseGeneral over the last two axes;
query_ln/key_ln with normalize_qk), so its checkpoints load. With num_kv_heads <
num_heads (GQA) key/value project to num_kv_heads heads. With decode=True it keeps linen's
autoregressive cache ('cache' collection), any number of new tokens per call, attending
through flash attention's decode path (flash_jax/flax/decode.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flash_jax.config import BlockSizes
from flash_jax.flax import decode as decode_lib
from flash_jax.flax.attention_fn import make_attention_fn


class FlashAttention(nn.Module):
  """Multi-head self/cross attention whose core is flash attention.

  Attributes (as flax.linen.MultiHeadDotProductAttention where names coincide):
    num_heads: query heads Nq. num_kv_heads: key/value heads Nkv (default Nq; GQA/MQA).
    qkv_features: Nq * head_dim (default: inputs_q's features). out_features: default
      inputs_q's features.
    causal, window, softcap: structured masking, as `flash_jax.flash_attention`.
    dtype, param_dtype: computation and parameter dtypes.
    dropout_rate, deterministic, broadcast_dropout: attention dropout; the default
      broadcast_dropout=False draws a keep-mask per (batch, head, query, key) inside the
      kernel; True shares one [T, S] mask over batch and heads, as Flax's default, at
      the cost of one kernel launch per (batch, head). Uses the 'dropout' rng stream.
    kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias, normalize_qk: as Flax.
    use_sinks: learn attention sinks (gpt-oss, StreamingLLM): a parameter `sinks`
      [num_heads] (param_dtype, zeros init), one logit per query head that joins the
      softmax's denominator (see `flash_jax.flash_attention`).
    implementation, block_sizes, interpret: which flash_jax implementation runs, and how.
    deterministic_backward: `flash_jax.flash_attention`'s `deterministic` (reproducible
      gradients; None follows XLA_FLAGS). Named apart from Flax's `deterministic`, which
      switches dropout off.
    decode: keep an autoregressive cache, as MultiHeadDotProductAttention's decode.

  Decoding (linen's conventions): with decode=True, `init` (an input of the full length,
  [batch..., max_length, features]) creates the 'cache' collection: cached_key,
  cached_value [batch..., max_length, num_kv_heads, head_dim] in the computation
  dtype and cache_index (int32 scalar), attending over its input as without decode.
  Afterwards `apply(variables, x, mutable=['cache'])` writes x's T new tokens at
  cache_index, attends, and advances the index by T. T may be anything (a prompt as
  prefill, then one token at a time); attention is flash_attention's decode path
  (kv_lengths = cache_index + T, q_offset = cache_index, bottom-right causal), so keys
  past the index are never read and no mask over max_length is built. Writing past
  max_length raises ValueError at trace time (T > max_length) or on eager calls; under
  jit it is the clamp that flash_jax.flax.nnx.FlashAttention documents (later tokens
  dropped, the index records the overflow).
  """

  num_heads: int
  num_kv_heads: int | None = None
  qkv_features: int | None = None
  out_features: int | None = None
  causal: bool = False
  window: Any = None
  softcap: float | None = None
  dtype: Any = None
  param_dtype: Any = jnp.float32
  broadcast_dropout: bool = False
  dropout_rate: float = 0.0
  deterministic: bool | None = None
  kernel_init: Any = nn.initializers.lecun_normal()
  out_kernel_init: Any = None
  bias_init: Any = nn.initializers.zeros_init()
  out_bias_init: Any = None
  use_bias: bool = True
  normalize_qk: bool = False
  use_sinks: bool = False
  implementation: str | None = None
  block_sizes: BlockSizes | None = None
  interpret: bool = False
  deterministic_backward: bool | None = None
  decode: bool = False

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, mask: jax.Array | None = None,
               segment_ids=None, deterministic: bool | None = None,
               dropout_rng: jax.Array | None = None) -> jax.Array:
    """inputs_q [batch..., T, F] -> [batch..., T, out_features].

    inputs_k, inputs_v [batch..., S, F_kv]: default inputs_q (self-attention); inputs_v
      defaults to inputs_k.
    mask: broadcastable to [batch..., Nq, T, S], True = attend (read for every tile:
      prefer causal/window/segment_ids).
    segment_ids: int [batch..., T] (self-attention) or a pair ([batch..., T], [batch..., S]).
    deterministic: merged with the attribute; needed when dropout_rate > 0.
    dropout_rng: default self.make_rng('dropout').

    With decode=True (and the cache initialized), inputs are the T new tokens: mask is
    then broadcastable to [batch..., Nq, T, max_length]; segment_ids and dropout are not
    available.
    """
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_k cannot be None when inputs_v is given")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    if num_kv_heads <= 0 or self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of {num_kv_heads=}")
    qkv_features = self.qkv_features or inputs_q.shape[-1]
    if qkv_features % self.num_heads:
      raise ValueError(f"qkv_features={qkv_features} must be a multiple of "
                       f"num_heads={self.num_heads}")
    head_dim = qkv_features // self.num_heads

    def projection(features, name, **kwargs):
      return nn.DenseGeneral(features=features, dtype=self.dtype, param_dtype=self.param_dtype,
                             use_bias=self.use_bias, name=name, **kwargs)

    # Same submodule names as linen.MultiHeadDotProductAttention.
    qkv_inits = dict(kernel_init=self.kernel_init, bias_init=self.bias_init)
    query = projection((self.num_heads, head_dim), "query", **qkv_inits)(inputs_q)
    key = projection((num_kv_heads, head_dim), "key", **qkv_inits)(inputs_k)
    value = projection((num_kv_heads, head_dim), "value", **qkv_inits)(inputs_v)
    if self.normalize_qk:
      # QK normalization (ViT-22B, arxiv.org/abs/2302.05442), as Flax's normalize_qk.
      norm = lambda name: nn.LayerNorm(use_bias=False, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
      query, key = norm("query_ln")(query), norm("key_ln")(key)

    deterministic_now = True
    if self.dropout_rate > 0.0:
      deterministic_now = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic_now and dropout_rng is None:
        dropout_rng = self.make_rng("dropout")
    attention_fn = make_attention_fn(
        causal=self.causal, window=self.window, softcap=self.softcap,
        implementation=self.implementation, block_sizes=self.block_sizes,
        interpret=self.interpret, deterministic_backward=self.deterministic_backward)
    sinks = None
    if self.use_sinks:
      sinks = self.param("sinks", nn.initializers.zeros_init(), (self.num_heads,),
                         self.param_dtype)
    if self.decode and self.has_variable("cache", "cached_key"):
      x = self._attend_with_cache(attention_fn, query, key, value, mask, segment_ids,
                                  deterministic_now, sinks)
    else:
      if self.decode:  # initializing: the input's length sizes the cache, as linen's
        self._cache_variables(key, value)
      x = attention_fn(query, key, value, mask=mask, segment_ids=segment_ids,
                       dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                       broadcast_dropout=self.broadcast_dropout,
                       deterministic=deterministic_now, dtype=self.dtype, sinks=sinks)
    out = nn.DenseGeneral(features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                          kernel_init=self.out_kernel_init or self.kernel_init,
                          bias_init=self.out_bias_init or self.bias_init,
                          use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="out")
    return out(x)  # [batch..., T, out_features]

  def _cache_variables(self, key, value):
    """The 'cache' collection, created from the full-length key/value [batch..., L, Nkv, H]."""
    return (self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype),
            self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype),
            self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32)))

  def _attend_with_cache(self, attention_fn, query, key, value, mask, segment_ids,
                         deterministic, sinks):
    if segment_ids is not None:
      raise ValueError("FlashAttention decode: segment_ids cannot be combined with decode (each "
                       "cache row holds one sequence; use a mask)")
    if not deterministic:
      raise NotImplementedError("FlashAttention decode runs without dropout: pass "
                                "deterministic=True")
    cached_key, cached_value, cache_index = self._cache_variables(key, value)
    x, cached_key.value, cached_value.value, cache_index.value = decode_lib.attend_with_cache(
        attention_fn, query, key, value, cached_key.value, cached_value.value,
        cache_index.value, mask=mask, dtype=self.dtype, sinks=sinks)
    return x  # [batch..., T, Nq, head_dim]
