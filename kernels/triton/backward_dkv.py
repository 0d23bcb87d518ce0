"""dK/dV kernel: FlashAttention-2 Algorithm 2, outer loop over key/value blocks.

One program per (key block, batch, key/value head) holds K_j, V_j and the float32
accumulators dK_j, dV_j, and walks the query tiles `TileMasking.q_tiles` says can see
its keys, for every query head of its GQA group (so dK/dV are summed over the group
without atomics: each program owns its rows, results are deterministic). Per query
tile it recomputes P from the forward's row statistics instead of storing it (section
3.2; m and l, kept apart so that a huge row max cannot round l away):

    P^T = exp(S^T - m) / l        dV_j += P^T dO
    dP^T = V_j dO^T               dS^T = P^T * (dP^T - delta),  delta = rowsum(dO * O)
    dK_j += dS^T Q * scale

Tiles are computed transposed, [keys, queries], so P^T and dS^T are the left operands
of the two products as they come out of the registers, with no transpose.

Fused dQ (`fused_dq`, the unordered backward): the program also adds its key block's
share of dQ, dS K, into a float32 buffer with atomic adds, as FlashAttention-2's
sequence-parallel backward does, so the dQ kernel and its second recomputation of S and
dP (2 of the backward's 7 products) are not needed. The order of the adds varies from
run to run, so the sums do too, in their last bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from flash_jax import masking
from flash_jax.spec import AttentionArrays, AttentionSpec

from flash_jax.kernels.triton import tile_math
from flash_jax.kernels.triton.config import TritonConfig, padded_head_dim
from flash_jax.kernels.triton.operands import Operand, Output, Refs, call, feature_operands
from flash_jax.kernels.triton.tile_masking import (TileMasking, cdiv, iota, kv_load_mask,
                                                    load, store, tile_mask, visit_tiles)


def _transpose(x):
  return None if x is None else x.T


def _dkv_kernel(refs: Refs, *, spec: AttentionSpec, config: TritonConfig, interpret: bool,
                fused_dq: bool):
  block_q, block_kv = config.block_q_dkv, config.block_kv_dkv
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  kv_block, batch, kv_head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k_lo = kv_block * block_kv
  masks = TileMasking.create(spec, refs, batch, block_q=block_q, block_kv=block_kv,
                             bound_query_tail=True)

  # Keys no query row sees by position load as zeros: junk there reaches no gradient.
  load_mask = lambda width, padded: kv_load_mask(
      k_lo, block_kv, spec.kv_len, width, padded, masked=True,
      keys=masks.seen_keys(0, spec.q_len))
  k = load(refs.k.at[pl.ds(k_lo, block_kv), :], load_mask(spec.head_dim, head_dim))  # [bk, H]
  v = load(refs.v.at[pl.ds(k_lo, block_kv), :], load_mask(spec.head_dim_v, head_dim_v))
  k_idx = (k_lo + iota(block_kv))[:, None]  # [bk, 1]
  kv_segments = masks.kv_segments(k_lo, block_kv)
  kv_segments = None if kv_segments is None else kv_segments[:, None]
  q_tiles = masks.q_tiles(k_lo, block_kv, block_q)

  def for_group_head(g, carry):
    head = kv_head * spec.group_size + g  # global query head

    def make_step(masked: bool):
      def step(q_block, carry):
        dk, dv = carry  # [bk, H], [bk, Hv] float32
        q_lo = q_block * block_q
        row_mask = lambda width, padded: tile_mask(q_lo, block_q, spec.q_len, width, padded,
                                                   check_rows=masked)
        q = load(refs.q.at[pl.ds(q_lo, block_q), g, :], row_mask(spec.head_dim, head_dim))
        dout = load(refs.dout.at[pl.ds(q_lo, block_q), g, :],
                    row_mask(spec.head_dim_v, head_dim_v))  # [bq, Hv]
        # The forward's row max (kernel units) and log2-sum [bq]: P = 2**((s - m) - log2 l)
        row_max = load(refs.row_max.at[g, pl.ds(q_lo, block_q)], row_mask(None, None))
        log_sum = load(refs.log_sum.at[g, pl.ds(q_lo, block_q)], row_mask(None, None))
        delta = load(refs.delta.at[g, pl.ds(q_lo, block_q)], row_mask(None, None))
        q_idx = (q_lo + iota(block_q))[None, :]  # [1, bq]
        logits_kt, logits_t = tile_math.kernel_logits(  # [bk, bq] float32
            tile_math.dot_t(k, q), spec,
            _transpose(masks.bias(head, q_lo, block_q, k_lo, block_kv)))
        visible_t = None
        if masked:
          q_segments = masks.q_segments(q_lo, block_q)
          visible_t = masks.visible(
              q_idx, k_idx, kv_segments=kv_segments,
              q_segments=None if q_segments is None else q_segments[None, :],
              dense=_transpose(masks.dense_mask(head, q_lo, block_q, k_lo, block_kv)))
        p_t = tile_math.recompute_probs(logits_kt, row_max[None, :], log_sum[None, :],
                                        visible_t, spec, interpret)  # [bk, bq]
        dp_t = tile_math.dot_t(v, dout)  # [bk, bq]
        dropout = masks.dropout(head, q_idx, k_idx)
        p_kept_t = p_t
        if dropout is not None:
          p_kept_t, dp_t = p_t * dropout, dp_t * dropout
        dv = dv + tile_math.dot(p_kept_t.astype(dout.dtype), dout)
        ds_t = p_t * (dp_t - delta[None, :])  # d loss / d logits
        if spec.softcap is not None:
          ds_t = ds_t * masking.softcap_grad(logits_t, spec.softcap)
        ds_t = ds_t.astype(q.dtype)
        dk = dk + tile_math.dot(ds_t, q)
        if fused_dq:  # this key block's share of dQ = dS K (scaled afterwards)
          plgpu.atomic_add(refs.dq_sum, (pl.ds(q_lo, block_q), g, slice(None)),
                           tile_math.dot_tn(ds_t, k))
        return dk, dv
      return step

    return visit_tiles(q_tiles, make_step, carry)

  init = (jnp.zeros((block_kv, head_dim), jnp.float32),
          jnp.zeros((block_kv, head_dim_v), jnp.float32))
  if spec.group_size == 1:
    dk, dv = for_group_head(jnp.int32(0), init)
  else:
    dk, dv = jax.lax.fori_loop(0, spec.group_size, for_group_head, init)
  store(refs.dk.at[pl.ds(k_lo, block_kv), :], dk * spec.scale,
        tile_mask(k_lo, block_kv, spec.kv_len, spec.head_dim, head_dim))
  store(refs.dv.at[pl.ds(k_lo, block_kv), :], dv,
        tile_mask(k_lo, block_kv, spec.kv_len, spec.head_dim_v, head_dim_v))


def backward_dkv(q, k, v, bias, arrays: AttentionArrays, stats, dout, delta,
                 spec: AttentionSpec, config: TritonConfig, interpret: bool,
                 fused_dq: bool = False):
  """-> dk [B, S, Nkv, H], dv [B, S, Nkv, Hv], and dq [B, T, Nq, H] where `fused_dq`
  (None otherwise); stats: the forward's base-2 (row max, log2-sum), delta: [B, Nq, T]
  float32."""
  t, s, group = spec.q_len, spec.kv_len, spec.group_size
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  group_rows = lambda width: pl.BlockSpec((None, t, group, width), lambda j, b, h: (b, 0, h, 0))
  group_stats = pl.BlockSpec((None, group, t), lambda j, b, h: (b, h, 0))
  kv_rows = lambda width: pl.BlockSpec((None, s, None, width), lambda j, b, h: (b, 0, h, 0))
  inputs = [
      Operand("q", q, group_rows(head_dim)),
      Operand("k", k, kv_rows(head_dim)),
      Operand("v", v, kv_rows(head_dim_v)),
      Operand("dout", dout, group_rows(head_dim_v)),
      Operand("row_max", stats[0], group_stats),
      Operand("log_sum", stats[1], group_stats),
      Operand("delta", delta, group_stats),
      *feature_operands(bias, arrays, spec),
  ]
  outputs = [
      Output("dk", jax.ShapeDtypeStruct(k.shape, k.dtype), kv_rows(head_dim)),
      Output("dv", jax.ShapeDtypeStruct(v.shape, v.dtype), kv_rows(head_dim_v)),
  ]
  if fused_dq:
    # Every key block adds into its group's rows: float32 sums [B, T_pad, Nq, H_pad] that
    # start at zero, padded so that no atomic needs a mask (padded rows add zeros).
    t_pad = cdiv(t, config.block_q_dkv) * config.block_q_dkv
    zeros = jnp.zeros((spec.batch, t_pad, spec.num_q_heads, head_dim), jnp.float32)
    sum_rows = pl.BlockSpec((None, t_pad, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    inputs.append(Operand("dq_zeros", zeros, sum_rows))
    outputs.append(Output("dq_sum", jax.ShapeDtypeStruct(zeros.shape, zeros.dtype), sum_rows,
                          aliases="dq_zeros"))
  dk, dv, *dq_sum = call(
      functools.partial(_dkv_kernel, spec=spec, config=config, interpret=interpret,
                        fused_dq=fused_dq),
      inputs=inputs, outputs=outputs,
      grid=(cdiv(s, config.block_kv_dkv), spec.batch, spec.num_kv_heads),
      name="flash_jax_triton_bwd_dkv" + ("_dq" if fused_dq else ""),
      num_warps=config.num_warps_dkv, num_stages=config.num_stages_dkv, interpret=interpret)
  if not fused_dq:
    return dk, dv, None
  dq = dq_sum[0][:, :t, :, :spec.head_dim] * spec.scale
  return dk, dv, dq.astype(q.dtype)
