"""The units of the forward kernels' online softmax (forward.py, split_kv.py).

Softmax statistics are kept in base 2 so that exp2 does the work, and the row max in
"max units" (FlashAttention-2 section 3.1.1's online softmax, FlashAttention-3's
softmax_scale_log2):
  * q.k^T itself when the logits are a positive multiple of it (no softcap, no bias): the
    scale then enters exp2's argument, s * c - max * c, one fused multiply-add per score
    (-8% forward time at d128 s16384);
  * the natural logits with a bias: exp2 then takes (s - max) * log2(e), the difference
    first, exact where s is the max. A fused s * c - max * c would subtract a rounded
    product from an unrounded one, off by up to half an ulp of the product: 1e13 for a
    row of -1e20 biases, and 2**1e13 = inf;
  * the base-2 logits otherwise (softcap, or a scale <= 0).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from flash_jax import masking
from flash_jax.spec import AttentionSpec

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class SoftmaxUnits:
  """How a kernel's scores, row maxima and lse relate to the call's logits."""

  scale: float
  softcap: float | None
  fold_scale: bool  # max units are q.k^T; exp2 takes its argument times `exp2_scale`
  natural: bool  # max units are the natural logits (with a bias)

  @classmethod
  def of(cls, spec: AttentionSpec) -> "SoftmaxUnits":
    fold_scale = spec.softcap is None and spec.scale > 0 and not spec.has_bias
    return cls(spec.scale, spec.softcap, fold_scale, spec.has_bias)

  @property
  def exp2_scale(self) -> float:
    return self.scale * LOG2E if self.fold_scale else 1.0

  def max_units(self, qk, bias=None):
    """float32 q.k^T [rows, n] (and its bias tile) -> scores in max units."""
    if self.fold_scale:
      return qk
    if self.natural:
      return masking.transform_logits(qk, scale=self.scale, bias=bias, softcap=self.softcap)
    if self.softcap is None:
      return masking.transform_logits(qk, scale=self.scale * LOG2E)
    return masking.transform_logits(qk, scale=self.scale, softcap=self.softcap) * LOG2E

  def base2(self, x):
    """Max units -> base-2 logits."""
    return x * self.exp2_scale if self.fold_scale else x

  def base2_row_max(self, row_max):
    """[rows] max units -> base 2, kept finite (MASK_VALUE * c may overflow)."""
    return jnp.maximum(self.base2(row_max), masking.MASK_VALUE)

  def exp2_minus(self, s, row_max):
    """2 ** (s - row max) in base 2: s [rows, n] and row_max [rows] in max units
    (row_max finite)."""
    if self.natural:
      return jnp.exp2((s - lax.broadcast_in_dim(row_max, s.shape, [0])) * LOG2E)
    return jnp.exp2(self.base2(s) - lax.broadcast_in_dim(self.base2_row_max(row_max),
                                                         s.shape, [0]))

  def rescale_of(self, old_max, new_max):
    """2 ** (old - new row max) [rows], the online softmax's correction factor."""
    if self.natural:
      return jnp.exp2(jnp.maximum((old_max - new_max) * LOG2E, masking.MASK_VALUE))
    return jnp.exp2(self.base2_row_max(old_max) - self.base2_row_max(new_max))

  def step(self, s, visible, row_max, row_sum):
    """One key block of the online softmax (FlashAttention-2 section 3.1.1): scores s
    [rows, n] in max units, their visibility (bool [rows, n], or None on a block every
    row fully sees), the running row max and sum [rows] -> (P [rows, n] float32, new row
    max, rescale of the old accumulator, new row sum)."""
    if visible is not None:
      s = masking.masked_logits(s, visible)
    new_max = jnp.maximum(row_max, s.max(axis=1))
    rescale = self.rescale_of(row_max, new_max)
    p = self.exp2_minus(s, new_max)
    if visible is not None:  # rows that saw nothing yet have p = 1 otherwise
      p = jnp.where(visible, p, 0.0)
    return p, new_max, rescale, row_sum * rescale + p.sum(axis=1)

  def lse(self, row_max, row_sum):
    """Natural-log lse [rows] of rows with a positive `row_sum` (others: the caller's)."""
    if self.natural:
      return row_max + jnp.log2(row_sum) * LN2
    return (self.base2(row_max) + jnp.log2(row_sum)) * LN2
