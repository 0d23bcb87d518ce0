"""`FlashAttention` for flax.nnx: multi-head attention with projections, on flash_jax.

Its parameters are laid out as `flax.nnx.MultiHeadAttention`'s (query, key, value:
LinearGeneral in -> [heads, head_dim]; out: LinearGeneral [heads, head_dim] -> out;
query_ln/key_ln with normalize_qk), and it draws them from `rngs` in the same order, so
an MHA checkpoint loads into it (and the same seed gives the same parameters). With
num_kv_heads < num_heads (GQA) key/value project to num_kv_heads heads, as MHA does.

Decoding follows MHA's API (decode=True, init_cache, cached_key / cached_value /
cache_index as nnx.Cache), with any number of new tokens per call and flash attention's
decode path instead of a dense mask over the cache (flash_jax/flax/decode.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flash_jax.config import BlockSizes
from flash_jax.flax import decode as decode_lib
from flash_jax.flax.attention_fn import make_attention_fn

# nnx.data marks an attribute that will hold arrays (flax >= 0.12 checks it); a plain
# value where this Flax has no such marker.
_data = getattr(nnx, "data", lambda value: value)


class FlashAttention(nnx.Module):
  """Multi-head self/cross attention whose core is flash attention.

  Args (as flax.nnx.MultiHeadAttention where names coincide):
    num_heads: query heads Nq. num_kv_heads: key/value heads Nkv (default Nq; Nq must
      be a multiple: GQA, MQA when 1).
    in_features, qkv_features (default in_features; Nq * head_dim), out_features
      (default in_features), in_kv_features (default in_features).
    causal, window, softcap: structured masking, as `flash_jax.flash_attention`.
    dtype, param_dtype: computation and parameter dtypes.
    dropout_rate, deterministic, broadcast_dropout: attention dropout. The default
      broadcast_dropout=False draws a keep-mask per (batch, head, query, key) inside the
      kernel; True shares one [T, S] mask over batch and heads, as Flax's default, at
      the cost of one kernel launch per (batch, head).
    kernel_init, out_kernel_init, bias_init, out_bias_init, use_bias, normalize_qk: as MHA.
    use_sinks: learn attention sinks (gpt-oss, StreamingLLM): a parameter `sinks`
      [num_heads] (param_dtype, zeros init), one logit per query head that joins the
      softmax's denominator (see `flash_jax.flash_attention`).
    implementation, block_sizes, interpret: which flash_jax implementation runs, and how.
    deterministic_backward: `flash_jax.flash_attention`'s `deterministic` (reproducible
      gradients; None follows XLA_FLAGS). Named apart from Flax's `deterministic`, which
      switches dropout off.
    decode: decode with the autoregressive cache by default (a call's `decode` overrides
      it); `init_cache` (or `nnx.view(model, decode=True, batch_size=..., max_length=...)`)
      creates the cache first.
    rngs, keep_rngs: parameter init; a dropout stream is kept when dropout_rate > 0.

  Decoding (as nnx.MultiHeadAttention, and more): `init_cache([batch..., max_length,
  features], dtype)` creates cached_key, cached_value [batch..., max_length,
  num_kv_heads, head_dim] and cache_index (int32 scalar) as nnx.Cache variables. A
  call with decode=True writes the T new tokens' keys and values at cache_index,
  attends, and advances the index by T. Unlike MHA, T may be anything (a whole prompt
  as prefill, then one token at a time), and attention runs flash_attention's decode
  path: kv_lengths = cache_index + T, q_offset = cache_index (bottom-right causal; with
  causal=False each token also sees the other new ones), so keys past the index are
  never read and no [T, max_length] mask is built. `init_cache(..., ragged=True)`
  gives one cache_index per row, and a call's `lengths` [batch...] lets rows add
  different numbers of tokens (continuous batching).

  Writing past max_length raises ValueError where it can be known: at trace time when
  T > max_length, and on eager calls (a concrete cache_index). Under jit it is a
  documented clamp: tokens past max_length are dropped (nothing earlier is
  overwritten), their queries see the max_length cached keys, and cache_index still
  advances past max_length, recording the overflow (`cache_index > max_length`: check
  it on the host).

  Example:
    attention = FlashAttention(8, 512, num_kv_heads=2, causal=True, rngs=nnx.Rngs(0))
    attention.init_cache((batch, max_length, 512), jnp.bfloat16)
    y = attention(prompt, decode=True)       # [batch, prompt_len, 512], all at once
    y = attention(next_token, decode=True)   # [batch, 1, 512], and so on
  """

  def __init__(self, num_heads: int, in_features: int, qkv_features: int | None = None,
               out_features: int | None = None, num_kv_heads: int | None = None,
               in_kv_features: int | None = None, *, causal: bool = False, window=None,
               softcap: float | None = None, dtype=None, param_dtype=jnp.float32,
               broadcast_dropout: bool = False, dropout_rate: float = 0.0,
               deterministic: bool | None = None,
               kernel_init=nnx.initializers.lecun_normal(), out_kernel_init=None,
               bias_init=nnx.initializers.zeros_init(), out_bias_init=None,
               use_bias: bool = True, normalize_qk: bool = False, use_sinks: bool = False,
               implementation: str | None = None, block_sizes: BlockSizes | None = None,
               interpret: bool = False, deterministic_backward: bool | None = None,
               decode: bool = False, rngs: nnx.Rngs,
               keep_rngs: bool = True):
    self.num_heads = num_heads
    self.num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    self.in_features = in_features
    self.qkv_features = in_features if qkv_features is None else qkv_features
    self.out_features = in_features if out_features is None else out_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    if self.num_kv_heads <= 0 or num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.qkv_features % num_heads:
      raise ValueError(f"qkv_features={self.qkv_features} must be a multiple of {num_heads=}")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    self.head_dim = self.qkv_features // num_heads
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.broadcast_dropout = broadcast_dropout
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.normalize_qk = normalize_qk
    self.attention_fn = make_attention_fn(
        causal=causal, window=window, softcap=softcap, implementation=implementation,
        block_sizes=block_sizes, interpret=interpret,
        deterministic_backward=deterministic_backward)

    def projection(in_features, out_features, **kwargs):
      return nnx.LinearGeneral(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                               use_bias=use_bias, rngs=rngs, **kwargs)

    # Same submodules, names and rng order as nnx.MultiHeadAttention.
    self.query = projection(in_features, (num_heads, self.head_dim), kernel_init=kernel_init,
                            bias_init=bias_init)
    self.key = projection(self.in_kv_features, (self.num_kv_heads, self.head_dim),
                          kernel_init=kernel_init, bias_init=bias_init)
    self.value = projection(self.in_kv_features, (self.num_kv_heads, self.head_dim),
                            kernel_init=kernel_init, bias_init=bias_init)
    if normalize_qk:
      # QK normalization (ViT-22B, arxiv.org/abs/2302.05442), as MHA's normalize_qk.
      norm = lambda: nnx.LayerNorm(self.head_dim, use_bias=False, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)
      self.query_ln, self.key_ln = norm(), norm()
    else:
      self.query_ln = self.key_ln = None
    self.out = projection((num_heads, self.head_dim), self.out_features, axis=(-2, -1),
                          kernel_init=out_kernel_init or kernel_init,
                          bias_init=out_bias_init or bias_init)
    # Zeros draw no rng: the other parameters stay those MHA draws from the same seed.
    self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if use_sinks else None
    self.rngs = rngs.dropout.fork() if keep_rngs and dropout_rate > 0 else None
    self.decode = decode
    # The autoregressive cache, as MHA's: created by init_cache.
    self.cached_key = _data(None)
    self.cached_value = _data(None)
    self.cache_index = _data(None)

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, mask: jax.Array | None = None,
               segment_ids=None, deterministic: bool | None = None, rngs=None,
               decode: bool | None = None, lengths: jax.Array | None = None) -> jax.Array:
    """inputs_q [batch..., T, in_features] -> [batch..., T, out_features].

    inputs_k, inputs_v [batch..., S, in_kv_features]: default inputs_q (self-attention);
      inputs_v defaults to inputs_k.
    mask: broadcastable to [batch..., Nq, T, S], True = attend (read for every tile:
      prefer causal/window/segment_ids).
    segment_ids: int [batch..., T] (self-attention) or a pair ([batch..., T], [batch..., S]).
    deterministic: overrides the constructor's; needed when dropout_rate > 0.
    rngs: an nnx.Rngs (its dropout stream) or RngStream; default the kept stream.
    decode: overrides the constructor's: append the T new tokens to the cache and
      attend over it (see the class docstring). mask is then broadcastable to
      [batch..., Nq, T, max_length]; segment_ids and dropout are not available.
    lengths: int [batch...], with decode and a ragged cache: how many of the T new
      tokens each row adds (the rest are padding: not written, their outputs 0).
    """
    decode = self.decode if decode is None else decode
    if lengths is not None and not decode:
      raise ValueError("lengths applies to decode calls only (decode=True)")
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError("inputs_k cannot be None when inputs_v is given")
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    if inputs_q.shape[-1] != self.in_features:
      raise ValueError(f"inputs_q has {inputs_q.shape[-1]} features, the module expects "
                       f"in_features={self.in_features}")
    query = self.query(inputs_q)  # [batch..., T, Nq, head_dim]
    key = self.key(inputs_k)  # [batch..., S, Nkv, head_dim]
    value = self.value(inputs_v)  # [batch..., S, Nkv, head_dim]
    if self.normalize_qk:
      query, key = self.query_ln(query), self.key_ln(key)

    dropout_rng = None
    if self.dropout_rate > 0.0:
      deterministic = self.deterministic if deterministic is None else deterministic
      if deterministic is None:
        raise ValueError("FlashAttention with dropout_rate > 0 needs `deterministic`, as a "
                         "call or constructor argument")
      if not deterministic:
        stream = rngs.dropout if isinstance(rngs, nnx.Rngs) else rngs
        stream = self.rngs if stream is None else stream
        if stream is None:
          raise ValueError("FlashAttention built with keep_rngs=False needs `rngs` in the call "
                           "for dropout")
        dropout_rng = stream()
    if decode:
      return self.out(self._attend_with_cache(query, key, value, mask, segment_ids,
                                              dropout_rng, lengths))
    x = self.attention_fn(query, key, value, mask=mask, segment_ids=segment_ids,
                          dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                          broadcast_dropout=self.broadcast_dropout,
                          deterministic=dropout_rng is None, dtype=self.dtype,
                          sinks=None if self.sinks is None else self.sinks[...])
    return self.out(x)  # [batch..., T, out_features]

  def _attend_with_cache(self, query, key, value, mask, segment_ids, dropout_rng, lengths):
    if self.cached_key is None or self.cached_value is None or self.cache_index is None:
      raise ValueError("FlashAttention decode: the cache is not initialized; call init_cache "
                       "first")
    if segment_ids is not None:
      raise ValueError("FlashAttention decode: segment_ids cannot be combined with decode (each "
                       "cache row holds one sequence; use a mask)")
    if dropout_rng is not None:
      raise NotImplementedError("FlashAttention decode runs without dropout: pass "
                                "deterministic=True")
    x, self.cached_key[...], self.cached_value[...], self.cache_index[...] = (
        decode_lib.attend_with_cache(
            self.attention_fn, query, key, value, self.cached_key[...], self.cached_value[...],
            self.cache_index[...], lengths=lengths, mask=mask, dtype=self.dtype,
            sinks=None if self.sinks is None else self.sinks[...]))
    return x  # [batch..., T, Nq, head_dim]

  def init_cache(self, input_shape, dtype=jnp.float32, *, ragged: bool = False):
    """Creates the decode cache, as nnx.MultiHeadAttention.init_cache.

    input_shape: [batch..., max_length, features] (features is not read).
    dtype: the cache's dtype (keys and values are cast to it when written).
    ragged: cache_index int32 [batch...], one length per row (rows may hold and add
      different numbers of tokens, see `lengths`), instead of Flax's int32 scalar.
    """
    shape = decode_lib.cache_shape(input_shape, self.num_kv_heads, self.head_dim)
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(
        jnp.zeros(decode_lib.index_shape(input_shape, ragged), jnp.int32))

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None,
               batch_size: int | tuple[int, ...] | None = None,
               max_length: int | None = None):
    """`nnx.view(model, decode=True, batch_size=..., max_length=...)`, as MHA's: switches
    decoding on or off and, when switching on without a cache, creates one (dtype: the
    module's computation dtype, else its param_dtype)."""
    if deterministic is not None:
      self.deterministic = deterministic
    if decode is not None:
      self.decode = decode
      if decode and self.cached_key is None:
        if batch_size is None or max_length is None:
          raise TypeError("nnx.view(decode=True) needs batch_size and max_length to create "
                          "FlashAttention's cache")
        batch = (batch_size,) if isinstance(batch_size, int) else tuple(batch_size)
        self.init_cache(batch + (max_length, self.in_features),
                        self.param_dtype if self.dtype is None else self.dtype)
