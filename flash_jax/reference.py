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

from flash_jax import masking, paged, tiles
from flash_jax.implementation import Implementation
from flash_jax.spec import AttentionArrays, AttentionSpec


def reference_attention(q, k, v, bias, arrays: AttentionArrays, spec: AttentionSpec,
                        sinks=None):
  """q [B, T, Nq, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv] -> (out [B, T, Nq, Hv], lse [B, Nq, T]).

  Softmax statistics in float32 (float64 for float64 inputs); the probabilities are cast
  to v's dtype for the PV product, as `jax.nn.dot_product_attention` does. Both products
  run at `spec.precision`. Fully differentiable (lse too). sinks [Nq] (optional): one
  more logit column per query head, with no value (its probability joins the denominator
  only); computed here independently of `flash_jax.sinks.apply_sinks`, the route every
  other implementation takes.
  """
  probs, lse, visible = _probabilities(q, k, bias, arrays, spec, sinks)
  (v,) = tiles.hide_unseen_keys(visible, v)  # junk in keys no row sees stays out
  dropout = tiles.tile_dropout(spec, arrays, 0, spec.kv_len)
  if dropout is not None:
    probs = probs * dropout
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, precision=spec.precision,
                   preferred_element_type=tiles.accumulation_dtype(spec))
  return (tiles.ungroup_queries(out, spec).astype(q.dtype),
          tiles.grouped_stats_to_heads(lse, spec))


def attention_weights(q, k, bias, arrays: AttentionArrays, spec: AttentionSpec, sinks=None):
  """The softmax weights [B, Nq, T, S] before dropout, in the accumulation dtype: 0 on
  rows that see no key; with sinks, each row's sink takes its share of the denominator
  (the weights then sum to less than 1). Materializes T x S: what Flax sows as
  'attention_weights'."""
  probs, _, _ = _probabilities(q, k, bias, arrays, spec, sinks)
  return probs.reshape(spec.batch, spec.num_q_heads, spec.q_len, spec.kv_len)


def _probabilities(q, k, bias, arrays: AttentionArrays, spec: AttentionSpec, sinks=None):
  """-> (softmax weights [B, Nkv, G, T, S] before dropout, lse [B, Nkv, G, T], the
  visibility [B|1, Nkv|1, G|1, T, S] or None)."""
  q5 = tiles.group_queries(q, spec)
  bias5 = None if bias is None else tiles.to_grouped_frame(bias, spec)
  mask5 = None if arrays.mask is None else tiles.to_grouped_frame(arrays.mask, spec)
  visible = tiles.tile_visibility(spec, arrays, mask5, 0, spec.kv_len)
  (k,) = tiles.hide_unseen_keys(visible, k)  # junk in keys no row sees stays out
  logits = tiles.tile_logits(q5, k, bias5, spec)  # [B, Nkv, G, T, S]
  logits = masking.masked_logits(logits, visible)
  # Floored like the kernels' running max: a row of -inf logits (a -inf bias on every
  # key) then gives exp(-inf - MASK_VALUE) = 0, not exp(-inf + inf) = NaN.
  row_max = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), masking.MASK_VALUE)
  if sinks is not None:
    sink = sinks.astype(row_max.dtype).reshape(1, spec.num_kv_heads, spec.group_size, 1, 1)
    row_max = jnp.maximum(row_max, sink)
  row_max = jax.lax.stop_gradient(row_max)
  p = masking.masked_exp(logits, row_max, visible)
  row_sum = jnp.sum(p, axis=-1, keepdims=True)
  if sinks is not None:
    row_sum = row_sum + jnp.exp(sink - row_max)  # the sink column
  probs = p / jnp.where(row_sum > 0, row_sum, 1.0)
  return probs, tiles.lse_from_stats(row_max[..., 0], row_sum[..., 0]), visible


class XlaImplementation(Implementation):
  """The reference as an implementation: materializes [T, S]; gradients by autodiff."""

  name = "xla"
  platforms = ("cpu", "gpu", "tpu")
  folds_sinks = True  # the sink is a logit column of its softmax
  dtypes = ("bfloat16", "float16", "float32", "float64")

  def __call__(self, q, k, v, bias, arrays, spec, config, interpret, sinks=None):
    if spec.paged:  # the whole cache gathered: the reference may, the kernels never do
      k, v, arrays, spec = paged.gather_all(k, v, arrays, spec)
    return reference_attention(q, k, v, bias, arrays, spec, sinks=sinks)


IMPLEMENTATION = XlaImplementation()
