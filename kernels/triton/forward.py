"""Forward kernel: FlashAttention-2 Algorithm 1, one program per (query block, batch, head).

Each program keeps its query tile [block_q, H] in registers and walks the key/value
tiles that `TileMasking.kv_tiles` says its rows can see (causal, window and lengths
bound the loop; tiles outside it are never loaded). Per key tile it updates the online
softmax (FlashAttention-2 section 3.1.1): running row max m and row sum l in float32,
the float32 accumulator rescaled by exp(m_old - m_new), and divides by l only once at
the end. Logits are kept in base 2 (`tile_math`), so each exponent is one ex2. Only
boundary tiles build a visibility mask. It writes O and the natural-log
lse = m + log(l) (-inf for rows that saw nothing, whose O is 0).

GQA: query head h reads key/value head h // G through the BlockSpec index map, so K/V
are never repeated in memory.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flash_jax import masking, tiles
from flash_jax.spec import AttentionArrays, AttentionSpec

from flash_jax.kernels.triton import tile_math
from flash_jax.kernels.triton.config import TritonConfig, padded_head_dim
from flash_jax.kernels.triton.operands import Operand, Output, Refs, call, feature_operands
from flash_jax.kernels.triton.tile_masking import (TileMasking, cdiv, iota, kv_load_mask,
                                                    load, store, tile_mask, visit_tiles)


def _forward_kernel(refs: Refs, *, spec: AttentionSpec, config: TritonConfig, interpret: bool):
  block_q, block_kv = config.block_q, config.block_kv
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  q_block, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if spec.causal:  # the longest rows first: better balance over the tail of the grid
    q_block = cdiv(spec.q_len, block_q) - 1 - q_block
  q_lo = q_block * block_q
  masks = TileMasking.create(spec, refs, batch, block_q=block_q, block_kv=block_kv,
                             bound_query_tail=False)

  q = load(refs.q.at[pl.ds(q_lo, block_q), :],
           tile_mask(q_lo, block_q, spec.q_len, spec.head_dim, head_dim))  # [bq, H]
  q_idx = (q_lo + iota(block_q))[:, None]  # [bq, 1]
  q_segments = masks.q_segments(q_lo, block_q)
  q_segments = None if q_segments is None else q_segments[:, None]

  kv_tiles = masks.kv_tiles(q_lo, block_q, block_kv)

  def make_step(masked: bool):
    def step(kv_block, carry):
      row_max, row_sum, acc = carry  # [bq], [bq], [bq, Hv]
      k_lo = kv_block * block_kv
      load_mask = lambda width, padded: kv_load_mask(
          k_lo, block_kv, spec.kv_len, width, padded, masked=masked, keys=kv_tiles.keys)
      k = load(refs.k.at[pl.ds(k_lo, block_kv), :], load_mask(spec.head_dim, head_dim))  # [bk, H]
      v = load(refs.v.at[pl.ds(k_lo, block_kv), :], load_mask(spec.head_dim_v, head_dim_v))
      k_idx = (k_lo + iota(block_kv))[None, :]  # [1, bk]
      scores = tile_math.dot_t(q, k)  # [bq, bk] float32
      bias = masks.bias(head, q_lo, block_q, k_lo, block_kv)
      if not masked and bias is None and spec.softcap is None and spec.scale > 0:
        # Plain logits c * scores (c = scale * log2 e > 0): max(c s) = c max(s), so the
        # scale is applied once, fused with the max subtraction into one FMA.
        c = spec.scale * tile_math.LOG2E
        new_max = jnp.maximum(row_max, jnp.max(scores, axis=1) * c)
        p = tile_math.exp2(scores * c - new_max[:, None], interpret)
      else:
        logits, _ = tile_math.kernel_logits(scores, spec, bias)  # [bq, bk]
        visible = None
        if masked:
          kv_segments = masks.kv_segments(k_lo, block_kv)
          visible = masks.visible(
              q_idx, k_idx, q_segments=q_segments,
              kv_segments=None if kv_segments is None else kv_segments[None, :],
              dense=masks.dense_mask(head, q_lo, block_q, k_lo, block_kv))
          logits = masking.masked_logits(logits, visible)
        new_max = jnp.maximum(row_max, jnp.max(logits, axis=1))
        p = tile_math.masked_exp2(logits, new_max[:, None], visible, spec, interpret)
      rescale = tile_math.exp2_of_difference(row_max - new_max, spec, interpret)
      row_sum = rescale * row_sum + jnp.sum(p, axis=1)
      dropout = masks.dropout(head, q_idx, k_idx)
      if dropout is not None:  # the normalizer l counts every key; dropout scales P only
        p = p * dropout
      acc = acc * rescale[:, None] + tile_math.dot(p.astype(v.dtype), v)
      return new_max, row_sum, acc
    return step

  init = (jnp.full((block_q,), masking.MASK_VALUE, jnp.float32),
          jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, head_dim_v), jnp.float32))
  row_max, row_sum, acc = visit_tiles(kv_tiles, make_step, init)

  out = acc / jnp.where(row_sum > 0, row_sum, 1.0)[:, None]  # rows that saw nothing: 0
  store(refs.out.at[pl.ds(q_lo, block_q), :], out,
        tile_mask(q_lo, block_q, spec.q_len, spec.head_dim_v, head_dim_v))
  row_mask = tile_mask(q_lo, block_q, spec.q_len)
  lse = tiles.lse_from_stats(tile_math.to_natural(row_max, spec), row_sum)
  store(refs.lse.at[pl.ds(q_lo, block_q)], lse, row_mask)
  # The backward's (m, log2 l), m in the kernel's units (see flash_jax/implementation.py).
  stat_max, stat_log_sum = tiles.backward_stats(row_max, row_sum, log=jnp.log2)
  store(refs.row_max.at[pl.ds(q_lo, block_q)], stat_max, row_mask)
  store(refs.log_sum.at[pl.ds(q_lo, block_q)], stat_log_sum, row_mask)


def forward(q, k, v, bias, arrays: AttentionArrays, spec: AttentionSpec, config: TritonConfig,
            interpret: bool):
  """q [B, T, Nq, H], k [B, S, Nkv, H], v [B, S, Nkv, Hv] -> out [B, T, Nq, Hv], lse [B, Nq, T],
  and the backward's base-2 row max and log2-sum [B, Nq, T]."""
  t, s, group = spec.q_len, spec.kv_len, spec.group_size
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  kv_head = lambda h: jax.lax.div(h, jnp.int32(group))
  inputs = [
      Operand("q", q, pl.BlockSpec((None, t, None, head_dim), lambda i, b, h: (b, 0, h, 0))),
      Operand("k", k, pl.BlockSpec((None, s, None, head_dim),
                                   lambda i, b, h: (b, 0, kv_head(h), 0))),
      Operand("v", v, pl.BlockSpec((None, s, None, head_dim_v),
                                   lambda i, b, h: (b, 0, kv_head(h), 0))),
      *feature_operands(bias, arrays, spec),
  ]
  outputs = [
      Output("out", jax.ShapeDtypeStruct((spec.batch, t, spec.num_q_heads, spec.head_dim_v),
                                         q.dtype),
             pl.BlockSpec((None, t, None, head_dim_v), lambda i, b, h: (b, 0, h, 0))),
      *(Output(name, jax.ShapeDtypeStruct((spec.batch, spec.num_q_heads, t), jnp.float32),
               pl.BlockSpec((None, None, t), lambda i, b, h: (b, h, 0)))
        for name in ("lse", "row_max", "log_sum")),
  ]
  return call(functools.partial(_forward_kernel, spec=spec, config=config, interpret=interpret),
              inputs=inputs, outputs=outputs,
              grid=(cdiv(t, config.block_q), spec.batch, spec.num_q_heads),
              name="flash_jax_triton_fwd", num_warps=config.num_warps,
              num_stages=config.num_stages, interpret=interpret)
