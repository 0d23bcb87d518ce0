"""Forward kernel: online softmax over key blocks (FlashAttention-2, Algorithm 1).

Grid (batch, query head, query block, key block); the key-block axis is last and
"arbitrary", so the running max m, running sum l and the unnormalized output
accumulator stay in float32 VMEM scratch across it (FlashAttention-2 section 3.1.1:
rescale by exp(m_old - m_new) only, divide by l once at the end). O and lse are
written on the last key block. Per tile the prefetched block state picks the work:
SKIP does nothing (and its K/V index map repeats the previous block: no DMA), FULL
skips the mask arithmetic, PARTIAL builds the element mask.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax import masking, tiles
from flash_jax.spec import AttentionArrays

from flash_jax.kernels.mosaic_tpu import block_info, launch, layout, operands, tile
from flash_jax.kernels.mosaic_tpu.config import LANES
from flash_jax.kernels.mosaic_tpu.layout import Geometry


STAT_LSE, STAT_MAX, STAT_LOG_SUM = 0, 1, 2  # lanes of the forward's row statistics


def _forward_kernel(scalars: launch.Scalars, refs, *, geo: Geometry, table_shape):
  """One (batch, head, query block, key block) grid step: O, lse of a [block_q] row block."""
  batch, head, q_block, kv_block = (pl.program_id(axis) for axis in range(4))
  state = scalars.states[block_info.table_offset(table_shape, batch, head, q_block, kv_block)]
  stats_shape = (geo.block_q, LANES)  # m and l, replicated across lanes (`tile.widen`)

  @pl.when(kv_block == 0)
  def _init():
    refs["row_max"][...] = jnp.full(stats_shape, masking.MASK_VALUE, jnp.float32)
    refs["row_sum"][...] = jnp.zeros(stats_shape, jnp.float32)
    refs["acc"][...] = jnp.zeros(refs["acc"].shape, jnp.float32)

  def accumulate(masked: bool):
    pos = tile.TilePosition(batch, head, q_block * geo.block_q, kv_block * geo.block_kv)
    shape = (geo.block_q, geo.block_kv)
    extra = operands.load_mask_tiles(refs, geo)
    k, v = refs["k"][...], refs["v"][...]  # [bk, H_pad], [bk, Hv_pad]
    if masked:
      k, v = tile.hide_unseen_keys(geo, pos, scalars.batch, k, v)
    s = tile.logits(refs["q"][...], k, extra.bias, geo)  # [bq, bk] float32
    visible = None
    if masked:
      visible = tile.visibility(geo, pos, shape, scalars.batch, extra.q_segment_ids,
                                extra.kv_segment_ids, extra.mask)
      s = masking.masked_logits(s, visible)
    row_max = refs["row_max"][...]  # [bq, 128]
    new_max = jnp.maximum(row_max, jnp.max(s, axis=-1, keepdims=True))
    rescale = jnp.exp(row_max - new_max)
    p = masking.masked_exp(s, tile.widen(new_max, geo.block_kv), visible)  # 0 where hidden
    refs["row_sum"][...] = rescale * refs["row_sum"][...] + jnp.sum(p, axis=-1, keepdims=True)
    refs["row_max"][...] = new_max
    dropout = tile.dropout_multiplier(geo, pos, shape, scalars.seed)
    if dropout is not None:  # the sum l stays undropped: dropout acts on normalized P
      p = p * dropout
    pv = tile.matmul_nn(p.astype(v.dtype), v)  # [bq, Hv_pad]
    refs["acc"][...] = tile.widen(rescale, geo.head_dim_v_padded) * refs["acc"][...] + pv

  pl.when(state == block_info.FULL)(lambda: accumulate(masked=False))
  pl.when(state == block_info.PARTIAL)(lambda: accumulate(masked=True))

  @pl.when(kv_block == geo.num_kv_blocks - 1)
  def _finish():
    row_max, row_sum = refs["row_max"][...], refs["row_sum"][...]  # [bq, 128]
    norm = tile.widen(jnp.where(row_sum > 0, row_sum, 1.0), geo.head_dim_v_padded)
    refs["out"][...] = (refs["acc"][...] / norm).astype(refs["out"].dtype)  # unseen rows: 0
    # Lane 0: lse (-inf where nothing was seen); lanes 1, 2: the backward's row max and
    # log-sum (flash_jax/implementation.py), in the lanes of one output.
    lse = tiles.lse_from_stats(row_max, row_sum)
    stat_max, stat_log_sum = tiles.backward_stats(row_max, row_sum)
    lane = jax.lax.broadcasted_iota(jnp.int32, stats_shape, 1)
    refs["lse"][...] = jnp.where(lane == STAT_LSE, lse,
                                 jnp.where(lane == STAT_MAX, stat_max, stat_log_sum))


def forward(q, k, v, bias, arrays: AttentionArrays, geo: Geometry, *, interpret,
            vmem_limit_bytes=None):
  """q [B, T, Nq, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv] -> (out [B, T, Nq, Hv], lse [B, Nq, T],
  (row max, log-sum) [B, Nq, T] for the backward)."""
  spec = geo.spec
  states = block_info.block_states(spec, arrays, geo)  # [Bi, Ni, nq, nk]
  fetch = block_info.fetch_indices(states)
  table_shape = states.shape

  def coords(grid, scalars: launch.Scalars) -> launch.TileCoords:
    batch, head, q_block, kv_block = grid
    offset = block_info.table_offset(table_shape, batch, head, q_block, kv_block)
    return launch.TileCoords(batch, head, q_block, scalars.fetch[offset])

  hp, hvp = geo.head_dim_padded, geo.head_dim_v_padded
  inputs = [
      launch.Operand("q", layout.to_heads_major(q, geo.q_len_padded, hp),
                     launch.q_rows(geo, coords, hp)),
      launch.Operand("k", layout.to_heads_major(k, geo.kv_len_padded, hp),
                     launch.kv_rows(geo, coords, hp)),
      launch.Operand("v", layout.to_heads_major(v, geo.kv_len_padded, hvp),
                     launch.kv_rows(geo, coords, hvp)),
      *operands.mask_operands(bias, arrays, geo, coords),
  ]
  rows = (spec.batch, spec.num_q_heads, geo.q_len_padded)
  outputs = [
      launch.Operand("out", jax.ShapeDtypeStruct(rows + (hvp,), q.dtype),
                     launch.q_rows(geo, coords, hvp)),
      launch.Operand("lse", jax.ShapeDtypeStruct(rows + (LANES,), jnp.float32),
                     launch.q_rows(geo, coords, LANES)),
  ]
  scratch = [
      ("row_max", pltpu.VMEM((geo.block_q, LANES), jnp.float32)),
      ("row_sum", pltpu.VMEM((geo.block_q, LANES), jnp.float32)),
      ("acc", pltpu.VMEM((geo.block_q, hvp), jnp.float32)),
  ]
  out, lse = launch.call(
      functools.partial(_forward_kernel, geo=geo, table_shape=table_shape),
      name="flash_jax_mosaic_tpu_fwd",
      grid=(spec.batch, spec.num_q_heads, geo.num_q_blocks, geo.num_kv_blocks),
      scalars=(states.reshape(-1), fetch.reshape(-1), layout.batch_scalars(arrays, spec),
               layout.seed_scalar(arrays)),
      inputs=inputs, outputs=outputs, scratch=scratch,
      cost=launch.cost_estimate(geo, matmuls_qk=1, matmuls_v=1, exps=1,
                                operands=inputs + outputs),
      interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)
  stat = lambda lane: layout.row_stats_from_kernel(lse, geo, lane)
  return (layout.from_heads_major(out, spec.q_len, spec.head_dim_v), stat(STAT_LSE),
          (stat(STAT_MAX), stat(STAT_LOG_SUM)))
