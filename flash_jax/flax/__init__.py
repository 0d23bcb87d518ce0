"""Flax integration: drop-in attention functions and flash attention modules.

  * `dot_product_attention`: Flax's signature and semantics (dense mask, bias, dropout);
    pass it as `attention_fn=` to `flax.nnx.MultiHeadAttention` or
    `flax.linen.MultiHeadDotProductAttention`: a one-line change.
  * `make_attention_fn(causal=..., window=..., softcap=...)`: the same, with structured
    masking that lets kernels skip tiles (the fast path).
  * `flash_jax.flax.nnx.FlashAttention`, `flash_jax.flax.linen.FlashAttention`:
    multi-head self/cross attention with GQA, causal, window, softcap, segment ids and
    dropout, whose parameters match Flax's MultiHeadAttention (checkpoints load).

This subpackage imports flax; `import flash_jax` alone does not.
"""

from flash_jax.flax import linen, nnx
from flash_jax.flax.attention_fn import AttentionFn, dot_product_attention, make_attention_fn

__all__ = ["AttentionFn", "dot_product_attention", "linen", "make_attention_fn", "nnx"]
