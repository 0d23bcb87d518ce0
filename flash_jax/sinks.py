"""Attention sinks: one learnable logit per query head in the softmax's denominator.

gpt-oss and StreamingLLM give every query head h a logit `sink_h` that joins the
softmax over the keys but carries no value, so it absorbs probability mass and adds
nothing to the output:

    p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij)),    out_i = sum_j p_ij v_j

The sink is one more key, with value 0, so merging it into a finished softmax over the
keys is the same two-set merge as the ring's lse merge (FlashAttention-2 section
3.1.1, one level up). From the (out, lse) any implementation returns:

    lse' = logaddexp(lse, sink),    out' = out * exp(lse - lse') = out * sigmoid(lse - sink)

This is exact, costs one elementwise pass over the output, and is differentiable
through the lse, so every implementation's own backward (which already takes the
cotangent of lse) yields dq, dk and dv, and autodiff of these two lines yields d(sinks).
A row that sees no key (lse -inf) puts all its mass on the sink: out' = 0, lse' = sink,
d lse'/d sink = 1, d out'/d sink = 0, and its q/k/v gradients stay zero.

Apply it once, after whatever combined the keys: `flash_attention` after the
implementation call (which runs sharded under jit: the merge is plain jnp, so XLA keeps
sinks [Nq] split with the heads), the ring after its lse merge, and paged / split-KV
decode after their combine step. Applied per block instead, the sink would count once
per block. An implementation may instead fold the sink into its softmax (the "xla"
reference does, as an extra logit column, so that tests check this route against an
independent softmax); it says so with `Implementation.folds_sinks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_sinks(sinks, num_q_heads: int) -> jax.Array | None:
  """Validates user `sinks` (None, or a float array [Nq]); returns it as a jax array."""
  if sinks is None:
    return None
  if np.ndim(sinks) != 1 or np.shape(sinks)[0] != num_q_heads:
    raise ValueError(f"sinks must have shape [Nq] = ({num_q_heads},) (one logit per query "
                     f"head), got shape {tuple(np.shape(sinks))}")
  sinks = jnp.asarray(sinks)
  if not jnp.issubdtype(sinks.dtype, jnp.floating):
    raise TypeError(f"sinks must be a float array (float32 recommended), got dtype {sinks.dtype}")
  return sinks


def apply_sinks(out, lse, sinks):
  """Merges one sink logit per query head into a finished attention result.

  Args:
    out: [B, T, Nq, Hv], the attention output over the keys (any float dtype).
    lse: [B, Nq, T] float32, its log-sum-exp over the keys; -inf on rows that see no key.
    sinks: [Nq] float, the sink logits (a sink of -inf is no sink).

  Returns:
    (out [B, T, Nq, Hv] in out's dtype, lse [B, Nq, T] float32), both including the sink.
    Finite, with finite gradients, on rows that see no key.
  """
  lse = lse.astype(jnp.float32)
  sink = sinks.astype(jnp.float32)[None, :, None]  # [1, Nq, 1]
  # The merged lse does not depend on `top` (it cancels), so its gradient is stopped;
  # `top` is finite whenever either side is, so the exps below see no inf - inf.
  top = jax.lax.stop_gradient(jnp.maximum(lse, sink))
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  # exp(-inf - top) = 0 with derivative 0: a row that sees no key needs no where() here,
  # so no NaN can leak into the gradients of the branch not taken.
  keys_weight = jnp.exp(lse - top)  # [B, Nq, T]
  sink_weight = jnp.exp(sink - top)
  total = keys_weight + sink_weight  # >= 1 unless both lse and sink are -inf
  seen = total > 0
  total = jnp.where(seen, total, 1.0)
  merged_lse = jnp.where(seen, top + jnp.log(total), -jnp.inf)
  scale = jnp.swapaxes(keys_weight / total, 1, 2)[..., None]  # [B, T, Nq, 1]
  merged_out = (out.astype(jnp.float32) * scale).astype(out.dtype)
  return merged_out, merged_lse
