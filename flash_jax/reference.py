"""The materializing reference: the whole [T, S] score matrix, differentiated by JAX.

It defines the semantics every other implementation is tested against. With float32
inputs at HIGHEST matmul precision (`spec.precision`, the `jax.default_matmul_precision`
of the call) it is the accuracy yardstick; with the inputs' own dtype and default
precision it is the "same-precision" reference whose error the tolerance rule scales
(kernel error <= 2x / 3x of its error, plus a floor). float64 inputs compute in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flash_jax import masking, tiles
from flash_jax.implementation import Implementation
from flash_jax.spec import AttentionArrays, AttentionSpec


def reference_attention(q, k, v, bias, arrays: AttentionArrays, spec: AttentionSpec):
  """q [B, T, Nq, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv] -> (out [B, T, Nq, Hv], lse [B, Nq, T]).

  Softmax statistics in float32 (float64 for float64 inputs); the probabilities are cast
  to v's dtype for the PV product, as `jax.nn.dot_product_attention` does. Both products
  run at `spec.precision`. Fully differentiable (lse too).
  """
  probs, lse = _probabilities(q, k, bias, arrays, spec)  # [B, Nkv, G, T, S], [B, Nkv, G, T]
  dropout = tiles.tile_dropout(spec, arrays, 0, spec.kv_len)
  if dropout is not None:
    probs = probs * dropout
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, precision=spec.precision,
                   preferred_element_type=tiles.accumulation_dtype(spec))
  return (tiles.ungroup_queries(out, spec).astype(q.dtype),
          tiles.grouped_stats_to_heads(lse, spec))


def attention_weights(q, k, bias, arrays: AttentionArrays, spec: AttentionSpec):
  """The softmax weights [B, Nq, T, S] before dropout, in the accumulation dtype: 0 on
  rows that see no key. Materializes T x S: what Flax sows as 'attention_weights'."""
  probs, _ = _probabilities(q, k, bias, arrays, spec)
  return probs.reshape(spec.batch, spec.num_q_heads, spec.q_len, spec.kv_len)


def _probabilities(q, k, bias, arrays: AttentionArrays, spec: AttentionSpec):
  """-> (softmax weights [B, Nkv, G, T, S] before dropout, lse [B, Nkv, G, T])."""
  q5 = tiles.group_queries(q, spec)
  bias5 = None if bias is None else tiles.to_grouped_frame(bias, spec)
  mask5 = None if arrays.mask is None else tiles.to_grouped_frame(arrays.mask, spec)
  logits = tiles.tile_logits(q5, k, bias5, spec)  # [B, Nkv, G, T, S]
  visible = tiles.tile_visibility(spec, arrays, mask5, 0, spec.kv_len)
  logits = masking.masked_logits(logits, visible)
  row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  p = masking.masked_exp(logits, row_max, visible)
  row_sum = jnp.sum(p, axis=-1, keepdims=True)
  probs = p / jnp.where(row_sum > 0, row_sum, 1.0)
  return probs, tiles.lse_from_stats(row_max[..., 0], row_sum[..., 0])


class XlaImplementation(Implementation):
  """The reference as an implementation: materializes [T, S]; gradients by autodiff."""

  name = "xla"
  platforms = ("cpu", "gpu", "tpu")
  dtypes = ("bfloat16", "float16", "float32", "float64")

  def __call__(self, q, k, v, bias, arrays, spec, config, interpret):
    return reference_attention(q, k, v, bias, arrays, spec)


IMPLEMENTATION = XlaImplementation()
