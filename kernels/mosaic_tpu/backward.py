"""Backward kernels: dK/dV and dQ, recomputing P from the saved lse (FlashAttention-2,
Algorithm 2, split in two passes so that every accumulator is owned by one grid row).

    P  = exp((logits - m) - log l)  dV += P_kept^T dO        dP = (dO V^T) * dropout
    dS = P * (dP - delta)           (* softcap' = 1 - tanh^2 when soft-capped)
    dK += (scale dS)^T Q            dQ += (scale dS) K       dbias = dS

delta = rowsum(dO * O) - dlse comes from `BlockwiseImplementation`. The dK/dV grid is
(batch, K/V head, key block, G * query blocks): its "arbitrary" last axis walks the G
query heads that share the K/V head (GQA) and their query blocks, so dK and dV sum over
the group in VMEM without repeated K/V or a later reduction. The dQ grid has the layout
of the forward. Skipped tiles load nothing: their Q (dK/dV pass) or K/V (dQ pass) index
maps repeat the previous live block, exactly as in the forward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from flash_jax import masking
from flash_jax.spec import AttentionArrays

from flash_jax.kernels.mosaic_tpu import block_info, launch, layout, operands, tile
from flash_jax.kernels.mosaic_tpu.config import LANES
from flash_jax.kernels.mosaic_tpu.layout import Geometry


def _tile_grads(refs, scalars: launch.Scalars, geo: Geometry, pos: tile.TilePosition,
                masked: bool):
  """Recomputes one tile -> (P with dropout applied [bq, bk], dS [bq, bk], K [bk, H_pad]) in
  float32 (K with the keys no row sees zeroed)."""
  shape = (geo.block_q, geo.block_kv)
  extra = operands.load_mask_tiles(refs, geo)
  k, v = refs["k"][...], refs["v"][...]
  if masked:
    k, v = tile.hide_unseen_keys(geo, pos, scalars.batch, k, v)
  s = tile.logits(refs["q"][...], k, extra.bias, geo)  # [bq, bk]
  visible = None
  if masked:
    visible = tile.visibility(geo, pos, shape, scalars.batch, extra.q_segment_ids,
                              extra.kv_segment_ids, extra.mask)
  # P = exp((s - m) - log l) from the forward's row statistics ([bq, 128] -> [bq, bk])
  row_max = tile.widen(refs["row_max"][...], geo.block_kv)
  p = masking.masked_exp(s - row_max, tile.widen(refs["log_sum"][...], geo.block_kv), visible)
  dp = tile.matmul_nt(refs["dout"][...], v)  # [bq, bk]
  dropout = tile.dropout_multiplier(geo, pos, shape, scalars.seed)
  p_kept = p
  if dropout is not None:
    p_kept, dp = p * dropout, dp * dropout
  ds = p * (dp - tile.widen(refs["delta"][...], geo.block_kv))  # d loss / d logits
  if geo.spec.softcap is not None:
    ds = ds * masking.softcap_grad(s, geo.spec.softcap)
  return p_kept, ds, k


def _dkv_kernel(scalars: launch.Scalars, refs, *, geo: Geometry, table_shape):
  """One (batch, K/V head, key block, group step) grid step: dK, dV of a [block_kv] block."""
  batch, kv_head, kv_block, step = (pl.program_id(axis) for axis in range(4))
  group, num_q_blocks = geo.spec.group_size, geo.num_q_blocks
  head = kv_head * group + step // num_q_blocks
  q_block = step % num_q_blocks
  state = scalars.states[block_info.table_offset(table_shape, batch, kv_head, kv_block, step)]

  @pl.when(step == 0)
  def _init():
    refs["dk_acc"][...] = jnp.zeros(refs["dk_acc"].shape, jnp.float32)
    refs["dv_acc"][...] = jnp.zeros(refs["dv_acc"].shape, jnp.float32)

  def accumulate(masked: bool):
    pos = tile.TilePosition(batch, head, q_block * geo.block_q, kv_block * geo.block_kv)
    p_kept, ds, _ = _tile_grads(refs, scalars, geo, pos, masked)
    q, dout = refs["q"][...], refs["dout"][...]
    refs["dv_acc"][...] += tile.matmul_tn(p_kept.astype(dout.dtype), dout)  # [bk, Hv_pad]
    refs["dk_acc"][...] += tile.matmul_tn((ds * geo.spec.scale).astype(q.dtype), q)

  pl.when(state == block_info.FULL)(lambda: accumulate(masked=False))
  pl.when(state == block_info.PARTIAL)(lambda: accumulate(masked=True))

  @pl.when(step == group * num_q_blocks - 1)
  def _finish():
    refs["dk"][...] = refs["dk_acc"][...].astype(refs["dk"].dtype)
    refs["dv"][...] = refs["dv_acc"][...].astype(refs["dv"].dtype)


def _dq_kernel(scalars: launch.Scalars, refs, *, geo: Geometry, table_shape):
  """One (batch, head, query block, key block) grid step: dQ of a [block_q] block, dS tile."""
  batch, head, q_block, kv_block = (pl.program_id(axis) for axis in range(4))
  state = scalars.states[block_info.table_offset(table_shape, batch, head, q_block, kv_block)]
  has_bias = "dbias" in refs

  @pl.when(kv_block == 0)
  def _init():
    refs["dq_acc"][...] = jnp.zeros(refs["dq_acc"].shape, jnp.float32)

  def accumulate(masked: bool):
    pos = tile.TilePosition(batch, head, q_block * geo.block_q, kv_block * geo.block_kv)
    _, ds, k = _tile_grads(refs, scalars, geo, pos, masked)
    refs["dq_acc"][...] += tile.matmul_nn((ds * geo.spec.scale).astype(k.dtype), k)
    if has_bias:
      refs["dbias"][...] = masking.bias_grad(ds, refs["bias"][...])

  pl.when(state == block_info.FULL)(lambda: accumulate(masked=False))
  pl.when(state == block_info.PARTIAL)(lambda: accumulate(masked=True))
  if has_bias:  # every dbias block is written back: a skipped tile must write its zeros
    @pl.when(state == block_info.SKIP)
    def _zero_dbias():
      refs["dbias"][...] = jnp.zeros(refs["dbias"].shape, jnp.float32)

  @pl.when(kv_block == geo.num_kv_blocks - 1)
  def _finish():
    refs["dq"][...] = refs["dq_acc"][...].astype(refs["dq"].dtype)


def _row_inputs(q, dout, stats, delta, geo: Geometry, coords) -> list[launch.Operand]:
  """q, dO, the forward's (row max, log-sum) and delta in kernel layout (rows that saw
  nothing hold (0, 0): their P is 0 through the mask anyway, and no inf enters)."""
  hp, hvp = geo.head_dim_padded, geo.head_dim_v_padded
  row_max, log_sum = stats
  return [
      launch.Operand("q", layout.to_heads_major(q, geo.q_len_padded, hp),
                     launch.q_rows(geo, coords, hp)),
      launch.Operand("dout", layout.to_heads_major(dout, geo.q_len_padded, hvp),
                     launch.q_rows(geo, coords, hvp)),
      launch.Operand("row_max", layout.row_stats(row_max, geo), launch.q_rows(geo, coords, LANES)),
      launch.Operand("log_sum", layout.row_stats(log_sum, geo), launch.q_rows(geo, coords, LANES)),
      launch.Operand("delta", layout.row_stats(delta, geo), launch.q_rows(geo, coords, LANES)),
  ]


def _kv_inputs(k, v, geo: Geometry, coords) -> list[launch.Operand]:
  hp, hvp = geo.head_dim_padded, geo.head_dim_v_padded
  return [
      launch.Operand("k", layout.to_heads_major(k, geo.kv_len_padded, hp),
                     launch.kv_rows(geo, coords, hp)),
      launch.Operand("v", layout.to_heads_major(v, geo.kv_len_padded, hvp),
                     launch.kv_rows(geo, coords, hvp)),
  ]


def _scalars(states, fetch, arrays: AttentionArrays, geo: Geometry):
  return (states.reshape(-1), fetch.reshape(-1), layout.batch_scalars(arrays, geo.spec),
          layout.seed_scalar(arrays))


def backward_dkv(q, k, v, bias, arrays: AttentionArrays, stats, dout, delta, geo: Geometry, *,
                 interpret, vmem_limit_bytes=None):
  """-> (dk [B, S, Nkv, H], dv [B, S, Nkv, Hv]) in k's and v's dtypes."""
  spec = geo.spec
  group, num_q_blocks = spec.group_size, geo.num_q_blocks
  states = block_info.kv_major(block_info.block_states(spec, arrays, geo), spec)
  fetch = block_info.fetch_indices(states)  # along G * nq: (query head, query block)
  table_shape = states.shape

  def coords(grid, scalars: launch.Scalars) -> launch.TileCoords:
    batch, kv_head, kv_block, step = grid
    load = scalars.fetch[block_info.table_offset(table_shape, batch, kv_head, kv_block, step)]
    return launch.TileCoords(batch, kv_head * group + load // num_q_blocks,
                             load % num_q_blocks, kv_block)

  hp, hvp = geo.head_dim_padded, geo.head_dim_v_padded
  inputs = [*_row_inputs(q, dout, stats, delta, geo, coords), *_kv_inputs(k, v, geo, coords),
            *operands.mask_operands(bias, arrays, geo, coords)]
  kv_shape = (spec.batch, spec.num_kv_heads, geo.kv_len_padded)
  own_block = lambda width: pl.BlockSpec(  # by the grid itself: dK/dV of this key block
      (None, None, geo.block_kv, width), lambda b, h, j, r, *_: (b, h, j, 0))
  outputs = [
      launch.Operand("dk", jax.ShapeDtypeStruct(kv_shape + (hp,), k.dtype), own_block(hp)),
      launch.Operand("dv", jax.ShapeDtypeStruct(kv_shape + (hvp,), v.dtype), own_block(hvp)),
  ]
  scratch = [("dk_acc", pltpu.VMEM((geo.block_kv, hp), jnp.float32)),
             ("dv_acc", pltpu.VMEM((geo.block_kv, hvp), jnp.float32))]
  dk, dv = launch.call(
      functools.partial(_dkv_kernel, geo=geo, table_shape=table_shape),
      name="flash_jax_mosaic_tpu_bwd_dkv",
      grid=(spec.batch, spec.num_kv_heads, geo.num_kv_blocks, group * num_q_blocks),
      scalars=_scalars(states, fetch, arrays, geo), inputs=inputs, outputs=outputs,
      scratch=scratch,
      cost=launch.cost_estimate(geo, matmuls_qk=2, matmuls_v=2, exps=1,
                                operands=inputs + outputs),
      interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)
  return (layout.from_heads_major(dk, spec.kv_len, spec.head_dim),
          layout.from_heads_major(dv, spec.kv_len, spec.head_dim_v))


def backward_dq(q, k, v, bias, arrays: AttentionArrays, stats, dout, delta, geo: Geometry, *,
                interpret, vmem_limit_bytes=None):
  """-> (dq [B, T, Nq, H] in q's dtype, dS [B, Nq, T, S] float32 when there is a bias, else None).

  dS is the bias gradient before any reduction over the bias's broadcast dimensions.
  """
  spec = geo.spec
  states = block_info.block_states(spec, arrays, geo)
  fetch = block_info.fetch_indices(states)
  table_shape = states.shape

  def coords(grid, scalars: launch.Scalars) -> launch.TileCoords:
    batch, head, q_block, kv_block = grid
    offset = block_info.table_offset(table_shape, batch, head, q_block, kv_block)
    return launch.TileCoords(batch, head, q_block, scalars.fetch[offset])

  hp = geo.head_dim_padded
  inputs = [*_row_inputs(q, dout, stats, delta, geo, coords), *_kv_inputs(k, v, geo, coords),
            *operands.mask_operands(bias, arrays, geo, coords)]
  rows = (spec.batch, spec.num_q_heads, geo.q_len_padded)
  outputs = [launch.Operand("dq", jax.ShapeDtypeStruct(rows + (hp,), q.dtype),
                            launch.q_rows(geo, coords, hp))]
  if spec.computes_dbias:  # every tile, skipped ones too, owns its dS block
    outputs.append(launch.Operand(
        "dbias", jax.ShapeDtypeStruct(rows + (geo.kv_len_padded,), jnp.float32),
        pl.BlockSpec((None, None, geo.block_q, geo.block_kv), lambda b, h, i, j, *_: (b, h, i, j))))
  results = launch.call(
      functools.partial(_dq_kernel, geo=geo, table_shape=table_shape),
      name="flash_jax_mosaic_tpu_bwd_dq",
      grid=(spec.batch, spec.num_q_heads, geo.num_q_blocks, geo.num_kv_blocks),
      scalars=_scalars(states, fetch, arrays, geo), inputs=inputs, outputs=outputs,
      scratch=[("dq_acc", pltpu.VMEM((geo.block_q, hp), jnp.float32))],
      cost=launch.cost_estimate(geo, matmuls_qk=2, matmuls_v=1, exps=1,
                                operands=inputs + outputs),
      interpret=interpret, vmem_limit_bytes=vmem_limit_bytes)
  dq = layout.from_heads_major(results[0], spec.q_len, spec.head_dim)
  dbias_full = results[1][:, :, :spec.q_len, :spec.kv_len] if spec.computes_dbias else None
  return dq, dbias_full
