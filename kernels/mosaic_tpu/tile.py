"""What one [block_q, block_kv] tile computes inside a kernel, shared by all three kernels.

Logits, visibility and dropout are built from the rules in `flash_jax.masking` on global
indices, so a tile computes exactly what the reference computes on the same entries.
Indices are 2-D iotas of the full tile shape (Mosaic lays out 2-D vectors natively).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_jax import masking

from flash_jax.kernels.mosaic_tpu import layout
from flash_jax.kernels.mosaic_tpu.config import LANES
from flash_jax.kernels.mosaic_tpu.layout import Geometry


@dataclasses.dataclass(frozen=True)
class TilePosition:
  """Where a tile sits: traced int32 scalars (batch, global query head, first row/column)."""

  batch: jax.Array
  q_head: jax.Array
  q_start: jax.Array
  k_start: jax.Array

  def indices(self, shape):
    """Global (query row [bq, bk], key column [bq, bk]) indices of the tile."""
    q_idx = self.q_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    k_idx = self.k_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return q_idx, k_idx


def widen(x, width: int):
  """A lane-replicated [rows, 128] value -> [rows, width] (width a multiple of 128).

  Per-row statistics live replicated across the 128 lanes (as in splash attention), so
  they broadcast against a tile by whole-vreg copies, never through a [rows, 1] column.
  """
  return jnp.tile(x, (1, width // LANES))


def _matmul(a, b, contract_a: int, contract_b: int):
  """float32-accumulated product at an explicit precision: float32 operands (float32 and
  float16 inputs) ask for full float32 products, as the Triton kernels do; bfloat16 ones
  are exact at DEFAULT. Explicit, so a caller's jax.default_matmul_precision never reaches
  the kernel (Mosaic lowers only DEFAULT and HIGHEST)."""
  precision = (jax.lax.Precision.HIGHEST if a.dtype == jnp.float32
               else jax.lax.Precision.DEFAULT)
  return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                             precision=precision, preferred_element_type=jnp.float32)


def matmul_nt(a, b):
  """a [m, k] . b [n, k]^T -> float32 [m, n] (contracts the lane dims: no transpose)."""
  return _matmul(a, b, 1, 1)


def matmul_tn(a, b):
  """a [k, m]^T . b [k, n] -> float32 [m, n] (dK = dS^T Q, dV = P^T dO)."""
  return _matmul(a, b, 0, 0)


def matmul_nn(a, b):
  """a [m, k] . b [k, n] -> float32 [m, n]."""
  return _matmul(a, b, 1, 0)


def logits(q, k, bias, geo: Geometry):
  """q [bq, H_pad], k [bk, H_pad], bias [bq|1, bk|1] or None -> float32 logits [bq, bk]."""
  return masking.transform_logits(matmul_nt(q, k), scale=geo.spec.scale, bias=bias,
                                  softcap=geo.spec.softcap)


def batch_scalar(batch_ref, batch, field: int):
  return batch_ref[batch * layout.NUM_BATCH_SCALARS + field]


def visibility(geo: Geometry, pos: TilePosition, shape, batch_ref, q_segment_ids=None,
               kv_segment_ids=None, mask=None):
  """Bool [bq, bk] (or None: all visible): the positional rules, segment ids, dense mask.

  q_segment_ids [bq, bk], kv_segment_ids [1, bk], mask [bq|1, bk] are tile values.
  """
  spec = geo.spec
  scalar = lambda used, field: batch_scalar(batch_ref, pos.batch, field) if used else None
  q_idx, k_idx = pos.indices(shape)
  visible = masking.key_visibility(
      q_idx, k_idx, causal=spec.causal, window=spec.window,
      q_offset=scalar(spec.has_q_offset, layout.Q_OFFSET),
      q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
      q_length=scalar(spec.has_q_lengths, layout.Q_LENGTH),
      kv_length=scalar(spec.has_kv_lengths, layout.KV_LENGTH), kv_bound=geo.kv_bound)
  if mask is not None:
    # Compared as int32: TPU v4 has no int8 vector compare.
    dense = jnp.broadcast_to(mask.astype(jnp.int32) != 0, shape)
    visible = masking.visible_and(visible, dense)
  return visible


def hide_unseen_keys(geo: Geometry, pos: TilePosition, batch_ref, *blocks):
  """Zeroes the rows of [block_kv, D] K/V blocks whose key no query row of the tile sees
  by position (lengths, causal, window), so that junk there (the unused tail of a KV
  cache, NaN or inf) cannot turn P = 0 times V into NaN. Used on PARTIAL tiles: a FULL
  tile's keys are all seen."""
  spec = geo.spec
  if not (spec.causal or spec.window is not None or spec.has_q_lengths or spec.has_kv_lengths):
    return blocks
  scalar = lambda used, field: batch_scalar(batch_ref, pos.batch, field) if used else None
  q_end = jnp.minimum(pos.q_start + geo.block_q, spec.q_len)  # padded rows see nothing
  key_range = masking.visible_kv_range(
      pos.q_start, q_end, kv_len=spec.kv_len, causal=spec.causal, window=spec.window, q_offset=scalar(spec.has_q_offset, layout.Q_OFFSET),
      kv_length=scalar(spec.has_kv_lengths, layout.KV_LENGTH),
      q_length=scalar(spec.has_q_lengths, layout.Q_LENGTH))
  keep = lambda x: masking.keys_in_range(
      pos.k_start + jax.lax.broadcasted_iota(jnp.int32, x.shape, 0), key_range)
  return tuple(jnp.where(keep(x), x, jnp.zeros((), x.dtype)) for x in blocks)


def dropout_multiplier(geo: Geometry, pos: TilePosition, shape, seed_ref):
  """float32 [bq, bk] keep / (1 - rate) from the shared counter-based hash, or None."""
  spec = geo.spec
  if not spec.has_dropout:
    return None
  q_idx, k_idx = pos.indices(shape)
  seed = seed_ref[0].astype(jnp.uint32)  # the uint32 seed's bits, stored as int32
  keep = masking.dropout_keep(seed, pos.batch, pos.q_head, q_idx, k_idx, spec.dropout_rate)
  return masking.dropout_multiplier(keep, spec.dropout_rate)
