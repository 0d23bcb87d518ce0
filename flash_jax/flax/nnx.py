"""`FlashAttention` for flax.nnx: multi-head attention with projections, on flash_jax.

Its parameters are laid out as `flax.nnx.MultiHeadAttention`'s (query, key, value:
LinearGeneral in -> [heads, head_dim]; out: LinearGeneral [heads, head_dim] -> out;
query_ln/key_ln with normalize_qk), and it draws them from `rngs` in the same order, so
an MHA checkpoint loads into it (and the same seed gives the same parameters). With
num_kv_heads < num_heads (GQA) key/value project to num_kv_heads heads, as MHA does.
Decode-free: there is no KV cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flash_jax.config import BlockSizes
from flash_jax.flax.attention_fn import make_attention_fn


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
    rngs, keep_rngs: parameter init; a dropout stream is kept when dropout_rate > 0.
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
               interpret: bool = False, rngs: nnx.Rngs, keep_rngs: bool = True):
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
        block_sizes=block_sizes, interpret=interpret)

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

  def __call__(self, inputs_q: jax.Array, inputs_k: jax.Array | None = None,
               inputs_v: jax.Array | None = None, *, mask: jax.Array | None = None,
               segment_ids=None, deterministic: bool | None = None, rngs=None) -> jax.Array:
    """inputs_q [batch..., T, in_features] -> [batch..., T, out_features].

    inputs_k, inputs_v [batch..., S, in_kv_features]: default inputs_q (self-attention);
      inputs_v defaults to inputs_k.
    mask: broadcastable to [batch..., Nq, T, S], True = attend (read for every tile:
      prefer causal/window/segment_ids).
    segment_ids: int [batch..., T] (self-attention) or a pair ([batch..., T], [batch..., S]).
    deterministic: overrides the constructor's; needed when dropout_rate > 0.
    rngs: an nnx.Rngs (its dropout stream) or RngStream; default the kept stream.
    """
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
    x = self.attention_fn(query, key, value, mask=mask, segment_ids=segment_ids,
                          dropout_rng=dropout_rng, dropout_rate=self.dropout_rate,
                          broadcast_dropout=self.broadcast_dropout,
                          deterministic=dropout_rng is None, dtype=self.dtype,
                          sinks=None if self.sinks is None else self.sinks[...])
    return self.out(x)  # [batch..., T, out_features]
