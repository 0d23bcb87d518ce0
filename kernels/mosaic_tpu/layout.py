"""The kernels' memory layout: heads-major, padded to whole blocks and 128 lanes.

The kernels read q, k, v as [B, N, L_pad, D_pad] so that one block is a contiguous
[block, D_pad] slab of one head: L is padded to whole blocks (padded keys are masked,
padded query rows are sliced off) and the head dims to a multiple of 128 lanes with
zeros (zeros change neither q.k nor p.v). Everything the kernels need besides q, k, v
(bias, dense mask, segment ids, row statistics) is put in a matching padded layout here,
so the kernels themselves never see a ragged edge.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_jax.spec import AttentionArrays, AttentionSpec
from flash_jax.tiles import round_up

from flash_jax.kernels.mosaic_tpu.config import LANES, SUBLANES


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Static tiling of one call: the spec and one pair of block sizes."""

  spec: AttentionSpec
  block_q: int
  block_kv: int

  @property
  def q_len_padded(self) -> int:
    return round_up(self.spec.q_len, self.block_q)

  @property
  def kv_len_padded(self) -> int:
    return round_up(self.spec.kv_len, self.block_kv)

  @property
  def num_q_blocks(self) -> int:
    return self.q_len_padded // self.block_q

  @property
  def num_kv_blocks(self) -> int:
    return self.kv_len_padded // self.block_kv

  @property
  def head_dim_padded(self) -> int:
    return round_up(self.spec.head_dim, LANES)

  @property
  def head_dim_v_padded(self) -> int:
    return round_up(self.spec.head_dim_v, LANES)

  @property
  def kv_bound(self) -> int | None:
    """S when padded key columns exist (they must be masked), else None."""
    return self.spec.kv_len if self.kv_len_padded > self.spec.kv_len else None


def _pad_to(x, shape, value=0):
  pads = [(0, want - got) for got, want in zip(x.shape, shape)]
  return jnp.pad(x, pads, constant_values=value) if any(p for _, p in pads) else x


def to_heads_major(x, length_padded: int, dim_padded: int):
  """[B, L, N, D] -> [B, N, L_pad, D_pad], zero padded."""
  x = jnp.swapaxes(x, 1, 2)
  return _pad_to(x, x.shape[:2] + (length_padded, dim_padded))


def from_heads_major(x, length: int, dim: int):
  """[B, N, L_pad, D_pad] -> [B, L, N, D]."""
  return jnp.swapaxes(x[:, :, :length, :dim], 1, 2)


def pad_pairwise(x, geo: Geometry, value=0):
  """A [B?, Nq?, T?, S?] bias or mask -> [B?, Nq?, T_pad | 1, S_pad].

  The key axis is always materialized (a broadcast S is expanded): tiles then read
  [block_q | 1, block_kv] blocks, lane-dense, never a [block_q, 1] column. A broadcast T
  stays 1 (a [1, block_kv] row broadcasts over the tile's query rows).
  """
  b, n, t, s = x.shape
  x = jnp.broadcast_to(x, (b, n, t, geo.spec.kv_len))
  return _pad_to(x, (b, n, geo.q_len_padded if t > 1 else 1, geo.kv_len_padded), value)


def dense_mask(mask, geo: Geometry):
  """bool mask -> int8 (Mosaic has no bool memory), padding hidden (0). A mask broadcast
  over T becomes int32 instead: a single-row int8 block would not fill a packed tile."""
  dtype = jnp.int8 if mask.shape[2] > 1 else jnp.int32
  return pad_pairwise(mask.astype(dtype), geo)


def segment_ids(arrays: AttentionArrays, geo: Geometry):
  """(q ids [B, T_pad, 128] lane-replicated, kv ids [B, 8, S_pad] sublane-replicated), int32.

  The layouts put each id where a [block_q, block_kv] tile broadcasts it without a
  transpose (as splash attention does). Padding ids differ (-1 and -2) so that padded
  keys never match, even before `kv_bound`.
  """
  q_ids = _pad_to(arrays.q_segment_ids, (geo.spec.batch, geo.q_len_padded), -1)
  kv_ids = _pad_to(arrays.kv_segment_ids, (geo.spec.batch, geo.kv_len_padded), -2)
  return (jnp.broadcast_to(q_ids[:, :, None], q_ids.shape + (LANES,)),
          jnp.broadcast_to(kv_ids[:, None, :], (kv_ids.shape[0], SUBLANES, kv_ids.shape[1])))


def row_stats(x, geo: Geometry):
  """[B, Nq, T] per-row float32 statistic (lse, delta) -> [B, Nq, T_pad, 128], replicated
  across lanes like the kernels' running statistics (padded rows hold 0)."""
  x = _pad_to(x.astype(jnp.float32), x.shape[:2] + (geo.q_len_padded,))
  return jnp.broadcast_to(x[..., None], x.shape + (LANES,))


def row_stats_from_kernel(x, geo: Geometry, lane: int = 0):
  """[B, Nq, T_pad, 128] -> [B, Nq, T], the statistic in `lane`."""
  return x[:, :, :geo.spec.q_len, lane]


# Per-batch scalars live in SMEM (scalar prefetch) as one flat int32 array, three a batch.
Q_OFFSET, Q_LENGTH, KV_LENGTH = 0, 1, 2
NUM_BATCH_SCALARS = 3


def batch_scalars(arrays: AttentionArrays, spec: AttentionSpec):
  """int32 [B * 3]: (q_offset, q_length, kv_length) of each batch; unused ones hold defaults."""
  full = lambda x, default: (jnp.full((spec.batch,), default, jnp.int32) if x is None
                             else x.astype(jnp.int32))
  columns = (full(arrays.q_offset, 0), full(arrays.q_lengths, spec.q_len),
             full(arrays.kv_lengths, spec.kv_len))
  return jnp.stack(columns, axis=1).reshape(-1)


def seed_scalar(arrays: AttentionArrays):
  """int32 [1]: the dropout seed's bits (SMEM holds 32-bit words), 0 without dropout."""
  if arrays.dropout_seed is None:
    return jnp.zeros((1,), jnp.int32)
  return jax.lax.bitcast_convert_type(arrays.dropout_seed.astype(jnp.uint32), jnp.int32)[None]
