"""The "chunked" implementation: blockwise online softmax in pure jnp, any platform.

Forward (FlashAttention-2, Algorithm 1, with all queries as one row block): scan over
key/value chunks of `block_kv` columns keeping the running max m, running sum l and a
rescaled float32 accumulator, so memory is O(T * block_kv) instead of O(T * S).
Backward (FlashAttention-2, Algorithm 2): recompute each chunk's probabilities from the
saved lse, P = exp(logits - lse); dV += P^T dO, dP = dO V^T, dS = P * (dP - delta),
dQ += dS K, dK = dS^T Q. Key/value chunks are independent, so dK, dV (and dbias
columns) are scan outputs and dQ the only carry. Every product runs at the call's
matmul precision (`spec.precision`), in the forward and in the backward alike;
float64 inputs compute in float64.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flash_jax import masking, paged, tiles
from flash_jax.config import BlockSizes
from flash_jax.implementation import BlockwiseImplementation
from flash_jax.spec import AttentionArrays, AttentionSpec

DEFAULT_BLOCK_KV = 512


@dataclasses.dataclass(frozen=True)
class _Chunks:
  """Inputs padded to a whole number of key/value chunks, in the grouped frame."""

  width: int
  count: int
  k: jax.Array  # [B, S_pad, Nkv, H]
  v: jax.Array  # [B, S_pad, Nkv, Hv]
  bias5: jax.Array | None  # [B?, Nkv?, G?, T?, S_pad or 1]
  mask5: jax.Array | None  # same frame, bool
  arrays: AttentionArrays  # kv_segment_ids padded to S_pad
  kv_bound: int | None  # S when padding was added, so padded columns stay hidden
  page_size: int | None = None  # paged K/V: k, v are page pools, a chunk is whole pages

  def columns(self, index):
    start = index * self.width
    if self.page_size is not None:  # this chunk's pages, gathered: [B, width, Nkv, H]
      pages = self.width // self.page_size
      take = lambda x: paged.gather_keys(x, self.arrays.block_tables, self.arrays.kv_lengths,
                                         index * pages, pages)
    else:
      take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, self.width, axis=1)
    return start, take(self.k), take(self.v), tiles.columns(self.bias5, start, self.width)


def _pad_axis(x, axis, size, value=0):
  """tiles.pad_axis, passing None and broadcast (size-1) axes through."""
  if x is None or x.shape[axis] == 1:
    return x
  return tiles.pad_axis(x, axis, size, value)


def _chunk_inputs(k, v, bias, arrays: AttentionArrays, spec: AttentionSpec, config) -> _Chunks:
  width = min(config.block_kv, spec.kv_len)
  if spec.paged:  # whole pages per chunk; the table is padded with entries never read
    width = tiles.round_up(width, spec.page_size)
  count = -(-spec.kv_len // width)
  padded = count * width
  if spec.paged:
    tables = tiles.pad_axis(arrays.block_tables, 1, padded // spec.page_size)
    return _Chunks(width=width, count=count, k=k, v=v, bias5=None, mask5=None,
                   arrays=dataclasses.replace(arrays, block_tables=tables),
                   kv_bound=spec.kv_len if padded > spec.kv_len else None,
                   page_size=spec.page_size)
  bias5 = None if bias is None else tiles.to_grouped_frame(bias, spec)
  mask5 = None if arrays.mask is None else tiles.to_grouped_frame(arrays.mask, spec)
  arrays = dataclasses.replace(arrays, kv_segment_ids=_pad_axis(arrays.kv_segment_ids, 1, padded))
  return _Chunks(
      width=width, count=count, k=_pad_axis(k, 1, padded), v=_pad_axis(v, 1, padded),
      bias5=_pad_axis(bias5, 4, padded), mask5=_pad_axis(mask5, 4, padded, False),
      arrays=arrays, kv_bound=spec.kv_len if padded > spec.kv_len else None)


class ChunkedImplementation(BlockwiseImplementation):
  name = "chunked"
  platforms = ("cpu", "gpu", "tpu")
  dtypes = ("bfloat16", "float16", "float32", "float64")

  def default_config(self, spec: AttentionSpec) -> BlockSizes:
    return BlockSizes(block_kv=DEFAULT_BLOCK_KV)

  def _resolve(self, config) -> BlockSizes:
    return config.fill(block_kv=DEFAULT_BLOCK_KV)

  def forward(self, q, k, v, bias, arrays, spec, config, interpret):
    out, lse, _ = self.forward_with_stats(q, k, v, bias, arrays, spec, config, interpret)
    return out, lse

  def forward_with_stats(self, q, k, v, bias, arrays, spec, config, interpret):
    chunks = _chunk_inputs(k, v, bias, arrays, spec, self._resolve(config))
    q5 = tiles.group_queries(q, spec)  # [B, T, Nkv, G, H]
    stat_shape = (spec.batch, spec.num_kv_heads, spec.group_size, spec.q_len, 1)
    acc_dtype = tiles.accumulation_dtype(spec)

    def step(carry, index):
      row_max, row_sum, acc = carry
      start, k_c, v_c, bias_c = chunks.columns(index)
      visible = tiles.tile_visibility(spec, chunks.arrays, chunks.mask5, start, chunks.width,
                                      chunks.kv_bound)
      k_c, v_c = tiles.hide_unseen_keys(visible, k_c, v_c)
      logits = tiles.tile_logits(q5, k_c, bias_c, spec)  # [B, Nkv, G, T, w]
      logits = masking.masked_logits(logits, visible)
      new_max = jnp.maximum(row_max, jnp.max(logits, axis=-1, keepdims=True))
      rescale = jnp.exp(row_max - new_max)
      p = masking.masked_exp(logits, new_max, visible)
      row_sum = rescale * row_sum + jnp.sum(p, axis=-1, keepdims=True)
      dropout = tiles.tile_dropout(spec, chunks.arrays, start, chunks.width)
      if dropout is not None:
        p = p * dropout
      pv = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v_c, precision=spec.precision,
                      preferred_element_type=acc_dtype)
      return (new_max, row_sum, rescale * acc + pv), None

    # Carries are built from q5 so that, inside shard_map, they vary over the same mesh
    # axes as the inputs (check_vma).
    init = (jnp.full_like(q5, masking.MASK_VALUE, acc_dtype, shape=stat_shape),
            jnp.zeros_like(q5, acc_dtype, shape=stat_shape),
            jnp.zeros_like(q5, acc_dtype, shape=stat_shape[:-1] + (spec.head_dim_v,)))
    (row_max, row_sum, acc), _ = jax.lax.scan(step, init, jnp.arange(chunks.count))
    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)  # [B, Nkv, G, T, Hv]
    out = tiles.ungroup_queries(jnp.moveaxis(out, 3, 1), spec).astype(q.dtype)
    lse = tiles.lse_from_stats(row_max[..., 0], row_sum[..., 0])
    stats = tiles.backward_stats(row_max[..., 0], row_sum[..., 0])
    heads = lambda x: tiles.grouped_stats_to_heads(x, spec)
    return out, heads(lse), tuple(heads(x) for x in stats)

  def backward(self, q, k, v, bias, arrays, out, lse, dout, delta, spec, config, interpret,
               stats=None):
    chunks = _chunk_inputs(k, v, bias, arrays, spec, self._resolve(config))
    q5 = tiles.group_queries(q, spec)  # [B, T, Nkv, G, H]
    do5 = tiles.group_queries(dout, spec)  # [B, T, Nkv, G, Hv]
    # P = exp((s - m) - log l), [B, Nkv, G, T, 1] each (see implementation.py)
    m5, log_l5 = (tiles.heads_to_grouped_stats(x, spec)[..., None]
                  for x in tiles.stats_or_lse(stats, lse))
    delta5 = tiles.heads_to_grouped_stats(delta, spec)[..., None]
    bias_cols_broadcast = chunks.bias5 is not None and chunks.bias5.shape[-1] == 1
    acc_dtype = tiles.accumulation_dtype(spec)
    einsum = lambda *a: jnp.einsum(*a, precision=spec.precision, preferred_element_type=acc_dtype)

    def step(carry, index):
      dq, dbias_acc = carry
      start, k_c, v_c, bias_c = chunks.columns(index)
      visible = tiles.tile_visibility(spec, chunks.arrays, chunks.mask5, start, chunks.width,
                                      chunks.kv_bound)
      k_c, v_c = tiles.hide_unseen_keys(visible, k_c, v_c)
      logits = tiles.tile_logits(q5, k_c, bias_c, spec)  # [B, Nkv, G, T, w]
      p = masking.masked_exp(logits - m5, log_l5, visible)
      dp = einsum("btkgh,bskh->bkgts", do5, v_c)
      dropout = tiles.tile_dropout(spec, chunks.arrays, start, chunks.width)
      p_kept = p if dropout is None else p * dropout
      dp = dp if dropout is None else dp * dropout
      dv_c = einsum("bkgts,btkgh->bskh", p_kept.astype(dout.dtype), do5)
      ds = p * (dp - delta5)  # d loss / d logits
      if spec.softcap is not None:
        ds = ds * masking.softcap_grad(logits, spec.softcap)
      dbias_c = (None if bias_c is None
                 else tiles.sum_to_shape(masking.bias_grad(ds, bias_c), bias_c.shape))
      ds = (ds * spec.scale).astype(q.dtype)
      dq = dq + einsum("bkgts,bskh->btkgh", ds, k_c)
      dk_c = einsum("bkgts,btkgh->bskh", ds, q5)
      if bias_cols_broadcast:
        dbias_acc, dbias_c = dbias_acc + dbias_c, None
      return (dq, dbias_acc), (dk_c, dv_c, dbias_c)

    dbias_init = (jnp.zeros_like(chunks.bias5, acc_dtype) if bias_cols_broadcast else None)
    init = (jnp.zeros_like(q5, acc_dtype), dbias_init)
    (dq, dbias_acc), (dk, dv, dbias_cols) = jax.lax.scan(step, init, jnp.arange(chunks.count))

    def join_columns(x, axis):  # [n, ..., w at axis, ...] -> [..., S at axis, ...]
      x = jnp.moveaxis(x, 0, axis)
      x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
      return jax.lax.slice_in_dim(x, 0, spec.kv_len, axis=axis)

    dk, dv = join_columns(dk, 1).astype(k.dtype), join_columns(dv, 1).astype(v.dtype)
    dbias = None
    if bias is not None:
      dbias5 = dbias_acc if bias_cols_broadcast else join_columns(dbias_cols, 4)
      dbias = tiles.from_grouped_frame(dbias5, bias.shape).astype(bias.dtype)
    return tiles.ungroup_queries(dq, spec).astype(q.dtype), dk, dv, dbias


IMPLEMENTATION = ChunkedImplementation()
