"""Tile matrix products with float32 accumulation, as Triton's tensor-core dot.

bf16/fp16 operands multiply in their own precision; float32 operands ask for full
float32 precision (Triton would otherwise take TF32, ~1e-3 relative error).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _precision(dtype):
  return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _dot(a, b, contract_a: int, contract_b: int):
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             precision=_precision(a.dtype), preferred_element_type=jnp.float32)


def dot(a, b):
  """a [m, k] @ b [k, n] -> float32 [m, n]."""
  return _dot(a, b, 1, 0)


def dot_t(a, b):
  """a [m, k] @ b[n, k]^T -> float32 [m, n] (e.g. q k^T)."""
  return _dot(a, b, 1, 1)
