"""Tile arithmetic of the kernels: matrix products and the base-2 softmax exponent.

Products accumulate in float32; bf16/fp16 operands multiply in their own precision,
float32 operands ask for full float32 precision (Triton would otherwise take TF32).

The kernels keep logits in base 2 (natural logits x log2(e)) so that the softmax
exponent is one `ex2.approx` instruction per element and the scale folds into the one
multiply that the logits need anyway (FlashAttention-2's implementation does the same).
Masking still follows `flash_jax.masking`: logits are masked with `masked_logits`
*after* the change of base (MASK_VALUE x log2(e) would overflow to -inf), and
`masked_exp2` is `masking.masked_exp` in base 2: exactly 0 where hidden.

With a bias the logits stay natural and only their difference to the row max goes to
base 2 (`to_exponent`): a bias can make logits huge (-1e20 on a whole row), and there
logits x log2(e) would keep neither the difference to the max nor one rounding (a fused
multiply-add of x log2(e) - max is off the stored max by up to 2**44 ulps of nothing).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu

from flash_jax import masking
from flash_jax.spec import AttentionSpec

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def dot(a, b):
  """a [m, k] @ b [k, n] -> float32 [m, n]."""
  return _dot(a, b, 1, 0)


def dot_tn(a, b):
  """a [k, m]^T @ b [k, n] -> float32 [m, n] (e.g. dS K from dS^T)."""
  return _dot(a, b, 0, 0)


def dot_t(a, b):
  """a [m, k] @ b [n, k]^T -> float32 [m, n] (e.g. q k^T)."""
  return _dot(a, b, 1, 1)


def exp2(x, interpret: bool):
  """2**x in float32: PTX ex2.approx on the GPU (~2 ulp), jnp.exp2 when interpreted."""
  if interpret:
    return jnp.exp2(x)
  [y] = plgpu.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def natural_units(spec: AttentionSpec) -> bool:
  """True when the kernels keep natural logits (with a bias), False for base 2."""
  return spec.has_bias


def kernel_logits(scores, spec: AttentionSpec, bias):
  """float32 q.k^T -> (logits in the kernel's units, natural logits or None).

  The natural logits come back only with a softcap (its gradient needs them); without
  bias and softcap the scale and log2(e) fold into one multiply.
  """
  if bias is None and spec.softcap is None:
    return scores * (spec.scale * LOG2E), None
  logits = masking.transform_logits(scores, scale=spec.scale, bias=bias, softcap=spec.softcap)
  softcapped = logits if spec.softcap is not None else None
  return (logits if natural_units(spec) else logits * LOG2E), softcapped


def to_exponent(x, spec: AttentionSpec):
  """A difference of logits in the kernel's units -> base 2."""
  return x * LOG2E if natural_units(spec) else x


def to_natural(x, spec: AttentionSpec):
  """A logit (row max) in the kernel's units -> natural units."""
  return x if natural_units(spec) else x * LN2


def from_natural(x, spec: AttentionSpec):
  return x if natural_units(spec) else x * LOG2E


def exp2_of_difference(x, spec: AttentionSpec, interpret: bool):
  """2**x for a difference x of logits in the kernel's units (a rescale factor)."""
  return exp2(to_exponent(x, spec), interpret)


def masked_exp2(logits, row_max, visible, spec: AttentionSpec, interpret: bool):
  """exp(logits - row_max) through 2**, exactly 0 where hidden (masking.masked_exp)."""
  return masking.masked_exp(logits, row_max, visible,
                            exp=lambda x: exp2_of_difference(x, spec, interpret))


def recompute_probs(logits, row_max, log2_sum, visible, spec: AttentionSpec, interpret: bool):
  """The backward's P = 2**(base2(logits - m) - log2 l), exactly 0 where hidden; m and
  log2 l are the forward's statistics (`flash_jax.implementation`)."""
  p = exp2(to_exponent(logits - row_max, spec) - log2_sum, interpret)
  return p if visible is None else jnp.where(visible, p, 0.0)
