"""dQ kernel (and dbias): FlashAttention-2 Algorithm 2, outer loop over query blocks.

One program per (query block, batch, query head) holds Q_i, dO_i, the forward's row max
m_i and log-sum log l_i, delta_i and a float32 dQ_i, and walks the same key tiles as the
forward pass (`TileMasking.kv_tiles`), recomputing P = exp(S - m) / l:

    dP = dO V_j^T      dS = P * (dP - delta)      dQ_i += dS K_j * scale

Splitting dQ from dK/dV costs a second recomputation of S but needs no atomics: every
program owns its output rows, so results are deterministic. With a bias, the program
also writes its dS tiles (= d loss / d bias) into a full-shape float32 dbias that
starts at zero; the caller sums it over the axes the bias broadcasts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flash_jax import masking
from flash_jax.spec import AttentionArrays, AttentionSpec

from flash_jax.kernels.triton import tile_math
from flash_jax.kernels.triton.config import TritonConfig, padded_head_dim
from flash_jax.kernels.triton.operands import Operand, Output, Refs, call, feature_operands
from flash_jax.kernels.triton.tile_masking import (TileMasking, cdiv, grid_mask, iota,
                                                    kv_load_mask, load, store, tile_mask,
                                                    visit_tiles)


def _dq_kernel(refs: Refs, *, spec: AttentionSpec, config: TritonConfig, interpret: bool):
  block_q, block_kv = config.block_q_dq, config.block_kv_dq
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  q_block, batch, head = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  if spec.causal:  # the longest rows first, as in the forward pass
    q_block = cdiv(spec.q_len, block_q) - 1 - q_block
  q_lo = q_block * block_q
  masks = TileMasking.create(spec, refs, batch, block_q=block_q, block_kv=block_kv,
                             bound_query_tail=False)

  row_mask = lambda width, padded: tile_mask(q_lo, block_q, spec.q_len, width, padded)
  q = load(refs.q.at[pl.ds(q_lo, block_q), :], row_mask(spec.head_dim, head_dim))  # [bq, H]
  dout = load(refs.dout.at[pl.ds(q_lo, block_q), :], row_mask(spec.head_dim_v, head_dim_v))
  # The forward's row max (kernel units) and log2-sum [bq, 1]: P = 2**((s - m) - log2 l)
  row_max = load(refs.row_max.at[pl.ds(q_lo, block_q)], row_mask(None, None))[:, None]
  log_sum = load(refs.log_sum.at[pl.ds(q_lo, block_q)], row_mask(None, None))[:, None]
  delta = load(refs.delta.at[pl.ds(q_lo, block_q)], row_mask(None, None))[:, None]
  q_idx = (q_lo + iota(block_q))[:, None]  # [bq, 1]
  q_segments = masks.q_segments(q_lo, block_q)
  q_segments = None if q_segments is None else q_segments[:, None]

  kv_tiles = masks.kv_tiles(q_lo, block_q, block_kv)

  def make_step(masked: bool):
    def step(kv_block, dq):
      k_lo = kv_block * block_kv
      load_mask = lambda width, padded: kv_load_mask(
          k_lo, block_kv, spec.kv_len, width, padded, masked=masked, keys=kv_tiles.keys)
      k = load(refs.k.at[pl.ds(k_lo, block_kv), :], load_mask(spec.head_dim, head_dim))  # [bk, H]
      v = load(refs.v.at[pl.ds(k_lo, block_kv), :], load_mask(spec.head_dim_v, head_dim_v))
      k_idx = (k_lo + iota(block_kv))[None, :]  # [1, bk]
      bias = masks.bias(head, q_lo, block_q, k_lo, block_kv)
      logits_k, logits = tile_math.kernel_logits(tile_math.dot_t(q, k), spec, bias)  # [bq, bk]
      visible = None
      if masked:
        kv_segments = masks.kv_segments(k_lo, block_kv)
        visible = masks.visible(
            q_idx, k_idx, q_segments=q_segments,
            kv_segments=None if kv_segments is None else kv_segments[None, :],
            dense=masks.dense_mask(head, q_lo, block_q, k_lo, block_kv))
      p = tile_math.recompute_probs(logits_k, row_max, log_sum, visible, spec, interpret)
      dp = tile_math.dot_t(dout, v)  # [bq, bk]
      dropout = masks.dropout(head, q_idx, k_idx)
      if dropout is not None:
        dp = dp * dropout
      ds = p * (dp - delta)  # d loss / d logits
      if spec.softcap is not None:
        ds = ds * masking.softcap_grad(logits, spec.softcap)
      if spec.computes_dbias:
        store(refs.dbias.at[pl.ds(q_lo, block_q), pl.ds(k_lo, block_kv)],
              masking.bias_grad(ds, bias),
              grid_mask(q_lo, block_q, spec.q_len, k_lo, block_kv, spec.kv_len))
      return dq + tile_math.dot(ds.astype(k.dtype), k)
    return step

  dq = visit_tiles(kv_tiles, make_step, jnp.zeros((block_q, head_dim), jnp.float32))
  store(refs.dq.at[pl.ds(q_lo, block_q), :], dq * spec.scale,
        row_mask(spec.head_dim, head_dim))


def backward_dq(q, k, v, bias, arrays: AttentionArrays, stats, dout, delta, spec: AttentionSpec,
                config: TritonConfig, interpret: bool):
  """-> dq [B, T, Nq, H] and, with a bias, the full-shape dbias [B, Nq, T, S] float32.

  stats: the forward's base-2 (row max, log2-sum), delta: [B, Nq, T] float32."""
  t, s, group = spec.q_len, spec.kv_len, spec.group_size
  head_dim, head_dim_v = padded_head_dim(spec.head_dim), padded_head_dim(spec.head_dim_v)
  kv_head = lambda h: jax.lax.div(h, jnp.int32(group))
  q_rows = lambda width: pl.BlockSpec((None, t, None, width), lambda i, b, h: (b, 0, h, 0))
  kv_rows = lambda width: pl.BlockSpec((None, s, None, width),
                                       lambda i, b, h: (b, 0, kv_head(h), 0))
  row_stats = pl.BlockSpec((None, None, t), lambda i, b, h: (b, h, 0))
  inputs = [
      Operand("q", q, q_rows(head_dim)),
      Operand("k", k, kv_rows(head_dim)),
      Operand("v", v, kv_rows(head_dim_v)),
      Operand("dout", dout, q_rows(head_dim_v)),
      Operand("row_max", stats[0], row_stats),
      Operand("log_sum", stats[1], row_stats),
      Operand("delta", delta, row_stats),
      *feature_operands(bias, arrays, spec),
  ]
  outputs = [Output("dq", jax.ShapeDtypeStruct(q.shape, q.dtype), q_rows(head_dim))]
  if spec.computes_dbias:
    full = (spec.batch, spec.num_q_heads, t, s)
    dbias_spec = pl.BlockSpec((None, None, t, s), lambda i, b, h: (b, h, 0, 0))
    # Tiles no program visits (hidden by position) keep this zero.
    inputs.append(Operand("dbias_init", jnp.zeros(full, jnp.float32), dbias_spec))
    outputs.append(Output("dbias", jax.ShapeDtypeStruct(full, jnp.float32), dbias_spec,
                          aliases="dbias_init"))
  results = call(functools.partial(_dq_kernel, spec=spec, config=config, interpret=interpret),
                 inputs=inputs, outputs=outputs,
                 grid=(cdiv(t, config.block_q_dq), spec.batch, spec.num_q_heads),
                 name="flash_jax_triton_bwd_dq", num_warps=config.num_warps_dq,
                 num_stages=config.num_stages_dq, interpret=interpret)
  return results if spec.computes_dbias else (results[0], None)
